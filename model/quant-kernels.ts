import { QUANT_KERNELS_WASM } from './quant-kernels.wasm.ts';
import { f16Table } from './dtype.ts';

/**
 * The quantizer's inner loops in WebAssembly SIMD (model/quant-kernels.wat): the same codes, scales and zero points as
 * the JavaScript loops in quantize.ts, bit for bit (test/quant-kernels.test.ts), several times faster. An int8 build
 * of GPT-J's F16 checkpoint was those loops at ~80 M weights/s on one core, most of a stage's build, and int4's
 * search ran at ~3 M/s (16 minutes a stage); V8 has no SIMD for JavaScript, and a native addon would need a compiler
 * on every install, so the loops are hand-written WebAssembly. STRATA_QUANT_SIMD=0 runs the JavaScript loops instead.
 */
interface Kernels {
  memory: WebAssembly.Memory;
  q8f16(src: number, blocks: number, blockSize: number, codes: number, scales: number): void;
  q8f32(src: number, blocks: number, blockSize: number, codes: number, scales: number): void;
  q4f32(src: number, blocks: number, blockSize: number, codes: number, scales: number, zeros: number, tmp: number): void;
}

let kernels: Kernels | null | undefined;

/** The instance, made on first use; null where it cannot run (no WebAssembly SIMD), or when switched off. */
function instance(): Kernels | null {
  if (kernels === undefined) {
    try {
      kernels = process.env.STRATA_QUANT_SIMD === '0' ? null : (new WebAssembly.Instance(new WebAssembly.Module(Buffer.from(QUANT_KERNELS_WASM, 'base64'))).exports as unknown as Kernels);
    } catch {
      kernels = null;
    }
  }
  return kernels;
}

/** Grows the kernels' memory to at least `bytes` (views of it made before are detached). */
function reserve(kern: Kernels, bytes: number): void {
  const have = kern.memory.buffer.byteLength;
  if (have < bytes) kern.memory.grow(Math.ceil((bytes - have) / 65536));
}

/** Weights quantized per call: whole rows, about this many bytes of them. */
const CHUNK_BYTES = 4 << 20;

/** A matrix's int8 codes, produced a chunk of rows at a time, and its scales, complete once every chunk was taken. */
export interface Int8Stream {
  /**
   * The codes [n·k] in row order, a few MiB at a time. Each piece is a view of the kernels' memory that the next
   * piece overwrites: write or copy it before asking for the next. One stream at a time (the kernels are one instance).
   */
  codes(): Iterable<Uint8Array>;
  /** [n·k / blockSize] float32 scales: asked for after the last piece of the codes. */
  scales(): Float32Array;
}

/**
 * int8 absmax quantization of a row-major [n, k] matrix of binary16 bits (width 2) or float32 (width 4), whose
 * stored bytes `read(from, into)` fills `into` with from byte `from` on: from a file, only a few MiB of the matrix is
 * ever in memory. Null where the kernels cannot take it: a partial block at a row's end (k not a multiple of the
 * block), or no kernels; the caller's JavaScript loop does it then.
 */
export function int8Stream(read: (from: number, into: Uint8Array) => void, width: 2 | 4, n: number, k: number, blockSize: number, scalesOut?: Float32Array): Int8Stream | null {
  const kern = instance();
  if (!kern || k % blockSize !== 0 || blockSize % 16 !== 0) return null;
  const scales = scalesOut ?? new Float32Array((n * k) / blockSize);
  let done = false;
  return {
    *codes() {
      const rows = Math.max(1, Math.floor(CHUNK_BYTES / (k * width)));
      const codesAt = rows * k * width;
      const scalesAt = codesAt + rows * k;
      const need = scalesAt + ((rows * k) / blockSize) * 4;
      reserve(kern, need);
      const quantize = width === 2 ? kern.q8f16 : kern.q8f32;
      const heap = new Uint8Array(kern.memory.buffer);
      for (let r = 0; r < n; r += rows) {
        const m = Math.min(rows, n - r);
        const blocks = (m * k) / blockSize;
        read(r * k * width, heap.subarray(0, m * k * width));
        quantize(0, blocks, blockSize, codesAt, scalesAt);
        scales.set(new Float32Array(kern.memory.buffer, scalesAt, blocks), (r * k) / blockSize);
        yield heap.subarray(codesAt, codesAt + m * k);
      }
      done = true;
    },
    scales() {
      if (!done) throw new Error('int8Stream: scales asked for before the last piece of the codes');
      return scales;
    },
  };
}

/** int8Stream over a matrix in memory, into `data` [n·k] and `scales`; false where the kernels cannot take it. */
export function quantizeInt8Blocks(w: Uint16Array | Float32Array, n: number, k: number, blockSize: number, data: Uint8Array, scales: Float32Array): boolean {
  const bytes = new Uint8Array(w.buffer, w.byteOffset, w.byteLength);
  const stream = int8Stream((from, into) => into.set(bytes.subarray(from, from + into.byteLength)), w.BYTES_PER_ELEMENT as 2 | 4, n, k, blockSize, scales);
  if (!stream) return false;
  drain(stream.codes(), data);
  return true;
}

/** A matrix's int4 codes, two a byte, produced a chunk of rows at a time; scales and zero points complete after the last. */
export interface Int4Stream {
  /** [n, kBlocks, blockSize / 2] bytes, low nibble first, in row order; each piece is overwritten by the next. */
  codes(): Iterable<Uint8Array>;
  /** [n·kBlocks] float32: asked for after the last piece of the codes. */
  scales(): Float32Array;
  /** [n, ceil(kBlocks / 2)] zero points, two a byte: asked for after the last piece of the codes. */
  zeroPoints(): Uint8Array;
}

/**
 * int4 (quantizeRows's asymmetric search, q4Block) of a row-major [n, k] matrix of binary16 bits (width 2, widened
 * through the exact table a chunk at a time) or float32 (width 4), read in pieces as int8Stream reads it: the kernels
 * search two blocks at once, one per double lane, and JavaScript packs the nibbles. Null where the kernels cannot
 * take it (a partial block, no kernels).
 */
export function int4Stream(read: (from: number, into: Uint8Array) => void, width: 2 | 4, n: number, k: number, blockSize: number, out?: { scales: Float32Array; zeroPoints: Uint8Array }): Int4Stream | null {
  const kern = instance();
  if (!kern || k % blockSize !== 0 || blockSize % 16 !== 0) return null;
  const kBlocks = k / blockSize;
  const blob = blockSize / 2;
  const zpBytes = Math.ceil(kBlocks / 2);
  const scales = out?.scales ?? new Float32Array(n * kBlocks);
  const zeroPoints = out?.zeroPoints ?? new Uint8Array(n * zpBytes);
  let done = false;
  const finished = <T>(part: T): T => {
    if (!done) throw new Error('int4Stream: scales and zero points asked for before the last piece of the codes');
    return part;
  };
  return {
    *codes() {
      const rows = Math.max(1, Math.floor(CHUNK_BYTES / (k * 4)));
      const srcAt = width === 2 ? rows * k * 2 : 0; // F16 is read at 0 and widened into float32 here
      const codesAt = srcAt + rows * k * 4;
      const scalesAt = codesAt + rows * k;
      const zerosAt = scalesAt + rows * kBlocks * 4;
      const tmpAt = Math.ceil((zerosAt + rows * kBlocks) / 16) * 16;
      const need = tmpAt + blockSize * 16;
      reserve(kern, need);
      const heap = new Uint8Array(kern.memory.buffer);
      const packed = new Uint8Array((rows * k) / 2);
      const table = width === 2 ? f16Table() : null;
      for (let r = 0; r < n; r += rows) {
        const m = Math.min(rows, n - r);
        read(r * k * width, heap.subarray(0, m * k * width));
        if (table) {
          const halves = new Uint16Array(kern.memory.buffer, 0, m * k);
          const wide = new Float32Array(kern.memory.buffer, srcAt, m * k);
          for (let i = 0; i < halves.length; i++) wide[i] = table[halves[i]];
        }
        kern.q4f32(srcAt, m * kBlocks, blockSize, codesAt, scalesAt, zerosAt, tmpAt);
        scales.set(new Float32Array(kern.memory.buffer, scalesAt, m * kBlocks), r * kBlocks);
        for (let j = 0; j < m * kBlocks; j++) {
          const row = r + Math.floor(j / kBlocks);
          const b = j % kBlocks;
          zeroPoints[row * zpBytes + (b >> 1)] |= heap[zerosAt + j] << ((b & 1) * 4);
          const c = codesAt + j * blockSize;
          for (let i = 0; i < blob; i++) packed[j * blob + i] = heap[c + 2 * i] | (heap[c + 2 * i + 1] << 4);
        }
        yield packed.subarray(0, (m * k) / 2);
      }
      done = true;
    },
    scales: () => finished(scales),
    zeroPoints: () => finished(zeroPoints),
  };
}

/** int4Stream over a float32 matrix in memory, into `data`, `scales` and `zeroPoints`; false where the kernels cannot take it. */
export function quantizeInt4Blocks(w: Float32Array, n: number, k: number, blockSize: number, data: Uint8Array, scales: Float32Array, zeroPoints: Uint8Array): boolean {
  const bytes = new Uint8Array(w.buffer, w.byteOffset, w.byteLength);
  const stream = int4Stream((from, into) => into.set(bytes.subarray(from, from + into.byteLength)), 4, n, k, blockSize, { scales, zeroPoints });
  if (!stream) return false;
  drain(stream.codes(), data);
  return true;
}

/** A stream's pieces copied into `data`, one after another. */
function drain(pieces: Iterable<Uint8Array>, data: Uint8Array): void {
  let at = 0;
  for (const piece of pieces) {
    data.set(piece, at);
    at += piece.byteLength;
  }
}
