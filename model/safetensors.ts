import { closeSync, existsSync, fstatSync, openSync, readFileSync, readSync, readdirSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { StrataError } from './errors.ts';
import { storedAsFloat32 } from './dtype.ts';
import { alignedSpan, DirectReadAhead, openDirect, readSpan, worthDirect } from './direct-read.ts';

export type StDType = 'F32' | 'F16' | 'BF16';

/**
 * The bytes that open a safetensors file holding `tensors` back to back in this order: the header's length (u64 LE),
 * then the JSON header (`__metadata__` first when given) padded with spaces to a multiple of 8.
 */
export function safetensorsHeader(tensors: { key: string; dtype: string; shape: number[]; bytes: number }[], metadata?: Record<string, string>): Buffer {
  const header: Record<string, unknown> = metadata ? { __metadata__: metadata } : {};
  let offset = 0;
  for (const t of tensors) {
    header[t.key] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.bytes] };
    offset += t.bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([len, Buffer.from(json)]);
}
const SUPPORTED: Record<string, number> = { F32: 4, F16: 2, BF16: 2 };

export interface TensorInfo {
  key: string;
  dtype: StDType;
  shape: number[];
  file: string;
  /** Absolute byte offset in `file`. */
  offset: number;
  length: number;
}

interface Shard {
  path: string;
  fd: number;
  /** The same file opened with O_DIRECT once a tensor is worth it (model/direct-read.ts); null where it cannot be. */
  direct?: number | null;
  header: Buffer;
  size: number;
}

/**
 * A safetensors checkpoint (one file or a sharded index), read lazily: only the header is parsed up front and a
 * tensor's bytes are read from disk when asked for, so a 24 GB checkpoint never sits in memory and a stage reads
 * only its own tensors.
 */
export class Checkpoint {
  private readonly tensors = new Map<string, TensorInfo>();
  private readonly shards: Shard[] = [];
  /** Per tensor: read with O_DIRECT (it was not in the page cache when first read)? */
  private readonly direct = new Map<string, boolean>();
  /** Reads the next chunk of a tensor read in chunks with O_DIRECT while the caller works on this one. */
  private readAhead: DirectReadAhead | null = null;

  private constructor(readonly dir: string) {}

  static open(dir: string): Checkpoint {
    const ck = new Checkpoint(dir);
    const index = join(dir, 'model.safetensors.index.json');
    const single = join(dir, 'model.safetensors');
    if (existsSync(index)) {
      let weightMap: Record<string, string>;
      try {
        weightMap = JSON.parse(readFileSync(index, 'utf8')).weight_map;
      } catch (e) {
        throw new StrataError('weights_invalid', `${index} is not valid JSON: ${(e as Error).message}`);
      }
      if (!weightMap || typeof weightMap !== 'object') throw new StrataError('weights_invalid', `${index} has no "weight_map"`);
      for (const file of [...new Set(Object.values(weightMap))].sort()) ck.addShard(join(dir, file));
      for (const [key, file] of Object.entries(weightMap)) {
        const info = ck.tensors.get(key);
        if (!info || info.file !== join(dir, file)) throw new StrataError('weights_invalid', `${index} maps "${key}" to ${file}, but that shard does not hold it`);
      }
    } else if (existsSync(single)) {
      ck.addShard(single);
    } else {
      const bin = readdirSync(dir).find((f) => /^pytorch_model.*\.bin$/.test(f) || f.endsWith('.pt'));
      const fix = `convert it once with: python -c "from transformers import AutoModel; AutoModel.from_pretrained('${dir}').save_pretrained('${dir}', safe_serialization=True)"`;
      throw new StrataError(
        'weights_missing',
        bin ? `${dir} has only ${bin} (PyTorch pickle); strata reads safetensors only, ${fix}` : `${dir} has no model.safetensors or model.safetensors.index.json`,
      );
    }
    return ck;
  }

  private addShard(path: string): void {
    if (!existsSync(path)) throw new StrataError('weights_missing', `weights shard ${path} is missing`);
    const fd = openSync(path, 'r');
    const size = fstatSync(fd).size;
    const lenBuf = Buffer.alloc(8);
    readSync(fd, lenBuf, 0, 8, 0);
    const headerLen = Number(lenBuf.readBigUInt64LE(0));
    if (size < 8 || headerLen > size - 8 || headerLen > 100 * 1024 * 1024) {
      closeSync(fd);
      throw new StrataError('weights_invalid', `${path} is not a safetensors file (bad header length)`);
    }
    const header = Buffer.alloc(headerLen);
    readSync(fd, header, 0, headerLen, 8);
    let entries: Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
    try {
      entries = JSON.parse(header.toString('utf8'));
    } catch {
      closeSync(fd);
      throw new StrataError('weights_invalid', `${path} has a corrupt safetensors header`);
    }
    const base = 8 + headerLen;
    for (const [key, e] of Object.entries(entries)) {
      if (key === '__metadata__') continue;
      const [begin, end] = e.data_offsets;
      if (end > size - base) throw new StrataError('weights_invalid', `${path}: tensor "${key}" lies past the end of the file (truncated download?)`);
      this.tensors.set(key, { key, dtype: e.dtype as StDType, shape: e.shape, file: path, offset: base + begin, length: end - begin });
    }
    this.shards.push({ path, fd, header, size });
  }

  has(key: string): boolean {
    return this.tensors.has(key);
  }

  keys(): string[] {
    return [...this.tensors.keys()];
  }

  info(key: string): TensorInfo | undefined {
    return this.tensors.get(key);
  }

  /** Reads one tensor as float32, checking it exists and has the shape the model config implies. */
  readFloat32(key: string, expectedShape: number[]): Float32Array {
    const { dtype, bytes } = this.readRaw(key, expectedShape);
    // F32 bytes already are the result (read into a fresh buffer: no second copy).
    return storedAsFloat32(bytes, dtype);
  }

  /**
   * One tensor's stored bytes as they are on disk (after the same checks as readFloat32): a stage whose dtype is
   * the checkpoint's copies them through without converting (F16 → F32 → F16 was most of a float16 build).
   */
  readRaw(key: string, expectedShape: number[]): { dtype: StDType; bytes: Uint8Array } {
    const info = this.checked(key, expectedShape);
    // A fresh ArrayBuffer (not Buffer's pool) sized to 4-byte multiples, so typed-array views over it are aligned.
    const bytes = new Uint8Array(new ArrayBuffer(info.length));
    this.read(info, bytes, 0);
    return { dtype: info.dtype, bytes };
  }

  /**
   * Stored bytes of one tensor from byte `from` on, as many as `into` holds (after readRaw's checks): a quantizer
   * streams a large tensor through a small buffer this way instead of holding all of it.
   */
  readInto(key: string, expectedShape: number[], from: number, into: Uint8Array): void {
    const info = this.checked(key, expectedShape);
    if (from < 0 || from + into.byteLength > info.length) throw new RangeError(`readInto: bytes [${from}, ${from + into.byteLength}) of "${key}" are outside its ${info.length}`);
    this.read(info, into, from);
  }

  /** Bytes [from, from + into.length) of a tensor, bypassing the page cache when it does not hold the tensor (model/direct-read.ts). */
  private read(info: TensorInfo, into: Uint8Array, from: number): void {
    const shard = this.shards.find((s) => s.path === info.file)!;
    let direct = this.direct.get(info.key);
    if (direct === undefined) {
      direct = worthDirect(shard.fd, info.offset, info.length);
      if (direct && shard.direct === undefined) shard.direct = openDirect(shard.path);
      direct &&= shard.direct !== null;
      this.direct.set(info.key, direct);
    }
    const dfd = direct ? (shard.direct ?? null) : null;
    if (dfd !== null) {
      const here = alignedSpan(info.offset + from, into.byteLength);
      const got = this.readAhead?.take(info.file, here.start, here.length) ?? null;
      // The slot is copied out before the next read is scheduled: that read may go into the same slot.
      if (got) into.set(got.subarray(here.skip, here.skip + into.byteLength));
      const rest = info.length - from - into.byteLength;
      if (rest > 0) {
        // Streamed in chunks (readInto): the next one, of the same size or what is left, is read in the background.
        const next = alignedSpan(info.offset + info.length - rest, Math.min(into.byteLength, rest));
        (this.readAhead ??= new DirectReadAhead()).schedule(info.file, dfd, next.start, next.length);
      }
      if (got) return;
    }
    const r = readSpan(dfd, shard.fd, into, info.offset + from);
    if (r.directFailed && shard.direct) {
      closeSync(shard.direct);
      shard.direct = null;
    }
    if (r.bytes < into.byteLength) throw new StrataError('weights_invalid', `${info.file}: tensor "${info.key}" is cut short (truncated file?)`);
  }

  /** Where one tensor's bytes are on disk (after readRaw's checks), for a graph that points at them instead of copying. */
  locate(key: string, expectedShape: number[]): { dtype: StDType; file: string; offset: number } {
    const info = this.checked(key, expectedShape);
    return { dtype: info.dtype, file: info.file, offset: info.offset };
  }

  private checked(key: string, expectedShape: number[]): TensorInfo {
    const info = this.tensors.get(key);
    const want = `[${expectedShape.join(', ')}]`;
    if (!info) throw new StrataError('weight_missing', `checkpoint ${this.dir} has no tensor "${key}" (expected shape ${want}); is config.json from the same checkpoint as the weights?`);
    if (info.shape.length !== expectedShape.length || info.shape.some((d, i) => d !== expectedShape[i])) {
      throw new StrataError('weight_shape_mismatch', `tensor "${key}" has shape [${info.shape.join(', ')}] but config.json implies ${want}; the config and weights are from different checkpoints`);
    }
    if (!(info.dtype in SUPPORTED)) throw new StrataError('weight_dtype_unsupported', `tensor "${key}" has dtype ${info.dtype}; supported: F32, F16, BF16`);
    return info;
  }

  /**
   * Identity of the checkpoint for caches and the stage handshake: config + every shard's header, size and the first
   * and last MiB of its data. Cheap on a 24 GB checkpoint, and different for any re-trained or re-sharded copy.
   */
  fingerprint(): string {
    const h = createHash('sha256');
    const config = join(this.dir, 'config.json');
    if (existsSync(config)) h.update(readFileSync(config));
    for (const s of this.shards) {
      h.update(s.header).update(String(s.size));
      const span = Math.min(1 << 20, s.size);
      const head = Buffer.alloc(span);
      const tail = Buffer.alloc(span);
      readSync(s.fd, head, 0, span, 0);
      readSync(s.fd, tail, 0, span, s.size - span);
      h.update(head).update(tail);
    }
    return h.digest('hex').slice(0, 16);
  }

  close(): void {
    this.readAhead?.close();
    this.readAhead = null;
    for (const s of this.shards) {
      closeSync(s.fd);
      if (s.direct) closeSync(s.direct);
    }
    this.shards.length = 0;
  }
}
