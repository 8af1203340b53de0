import { closeSync, existsSync, mkdirSync, openSync, readdirSync, renameSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { normalizeConfig } from '../model/config.ts';
import { f32ToF16 } from '../model/dtype.ts';
import { allRefs, keyPrefix, stageWeights, type WeightRef } from '../model/layout.ts';
import { syntheticSupport, type SyntheticShape } from '../model/synthetic.ts';
import { defaultCacheDir } from '../model/stage-cache.ts';
import { safetensorsHeader } from '../model/safetensors.ts';
import { shapeKey } from './model.ts';

/**
 * A full-size synthetic checkpoint as Hugging Face ships big models: config.json, `model-0000i-of-0000N.safetensors`
 * shards of at most `shardBytes` each and `model.safetensors.index.json`, in F32 or F16. Written tensor by tensor
 * (one 16 MiB chunk in memory at a time), so a 12 GB GPT-J never sits in this process.
 *
 * Values come from a fixed pool of random numbers, each tensor starting at its own offset in it: the disk write is the
 * only cost (generating 6 G random numbers one by one took longer than writing them), and the graphs compute on
 * varied, bounded weights (uniform ±0.05; norm weights 1, biases 0) as model/synthetic.ts's do.
 */
export type CkptDType = 'F32' | 'F16';

export interface ShardedCheckpoint {
  dir: string;
  /** Shard file paths, in order. */
  shards: string[];
  /** Bytes of all shards (headers included). */
  bytes: number;
  built: boolean;
}

const POOL = 1 << 22; // elements per chunk (16 MiB as F32)
const ELEM: Record<CkptDType, number> = { F32: 4, F16: 2 };

function pools(seed: number): { F32: Float32Array; F16: Uint16Array } {
  // Twice the chunk, so any offset below POOL has a whole chunk after it.
  const f32 = new Float32Array(2 * POOL);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < f32.length; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    f32[i] = ((s >>> 0) / 4294967296 - 0.5) * 0.1;
  }
  const f16 = new Uint16Array(f32.length);
  for (let i = 0; i < f32.length; i++) f16[i] = f32ToF16(f32[i]);
  return { F32: f32, F16: f16 };
}

/** Shards of at most `shardBytes` of tensor data each, tensors in checkpoint order (a tensor is never split). */
function planShards(refs: WeightRef[], dtype: CkptDType, shardBytes: number): WeightRef[][] {
  const shards: WeightRef[][] = [[]];
  let size = 0;
  for (const r of refs) {
    const bytes = r.shape.reduce((a, b) => a * b, ELEM[dtype]);
    if (size > 0 && size + bytes > shardBytes) {
      shards.push([]);
      size = 0;
    }
    shards.at(-1)!.push(r);
    size += bytes;
  }
  return shards;
}

/** Writes the checkpoint into `dir` (which must not exist yet); `onProgress` gets bytes written so far / in all. */
export function writeShardedCheckpoint(dir: string, shape: SyntheticShape, dtype: CkptDType, shardBytes: number, onProgress?: (done: number, total: number) => void): string[] {
  mkdirSync(dir, { recursive: true });
  const support = syntheticSupport(shape.family);
  const config = { ...support.config(shape), torch_dtype: dtype === 'F16' ? 'float16' : 'float32' };
  writeFileSync(join(dir, 'config.json'), JSON.stringify(config, null, 2));
  const spec = normalizeConfig(config);
  const refs = allRefs(stageWeights(spec, { first: 0, last: spec.blocks }, keyPrefix(spec, () => true)));
  const plan = planShards(refs, dtype, shardBytes);
  const total = refs.reduce((n, r) => n + r.shape.reduce((a, b) => a * b, ELEM[dtype]), 0);
  const pool = pools(shape.seed ?? 1234)[dtype];
  const one = dtype === 'F16' ? Uint16Array.of(f32ToF16(1)) : Float32Array.of(1);
  const ones = new (pool.constructor as Uint16ArrayConstructor)(POOL).fill(one[0]);
  const zeros = new Uint8Array(POOL * ELEM[dtype]);
  const weightMap: Record<string, string> = {};
  const files: string[] = [];
  let written = 0;
  plan.forEach((tensors, s) => {
    const name = `model-${String(s + 1).padStart(5, '0')}-of-${String(plan.length).padStart(5, '0')}.safetensors`;
    for (const r of tensors) weightMap[r.key] = name;
    const path = join(dir, name);
    const fd = openSync(path, 'w');
    try {
      writeSync(fd, safetensorsHeader(tensors.map((r) => ({ key: r.key, dtype, shape: r.shape, bytes: r.shape.reduce((a, b) => a * b, ELEM[dtype]) })), { format: 'pt' }));
      for (const [t, r] of tensors.entries()) {
        const n = r.shape.reduce((a, b) => a * b, 1);
        const src = support.isNormWeight(r.key) ? ones : r.key.endsWith('.bias') ? null : pool;
        let at = ((s * 7919 + t * 104729) % POOL) | 0; // each tensor starts elsewhere in the pool
        for (let done = 0; done < n; ) {
          const m = Math.min(POOL, n - done);
          const view = src ? new Uint8Array(src.buffer, (src === pool ? at : 0) * ELEM[dtype], m * ELEM[dtype]) : zeros.subarray(0, m * ELEM[dtype]);
          writeSync(fd, view);
          done += m;
          at = (at + 8191) % POOL;
          written += m * ELEM[dtype];
          onProgress?.(written, total);
        }
      }
    } finally {
      closeSync(fd);
    }
    files.push(path);
  });
  writeFileSync(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }, null, 2));
  return files;
}

/**
 * The sharded checkpoint of `shape` in `dtype`, written once under `<cache>/synthetic-sharded/<key>` (into a temporary
 * directory renamed at the end, so a killed write never looks complete) and reused by later runs.
 */
export function ensureShardedCheckpoint(shape: SyntheticShape, dtype: CkptDType, o: { cacheDir?: string; shardBytes: number; onProgress?: (done: number, total: number) => void }): ShardedCheckpoint {
  const root = join(o.cacheDir ?? defaultCacheDir(), 'synthetic-sharded');
  const dir = join(root, `${shapeKey(shape)}-${dtype}-shard${Math.round(o.shardBytes / 2 ** 20)}m`);
  let built = false;
  if (!existsSync(join(dir, '.complete'))) {
    const tmp = `${dir}.tmp-${process.pid}-${Date.now()}`;
    try {
      writeShardedCheckpoint(tmp, shape, dtype, o.shardBytes, o.onProgress);
      writeFileSync(join(tmp, '.complete'), JSON.stringify({ shape, dtype, writtenAt: new Date().toISOString() }));
      rmSync(dir, { recursive: true, force: true });
      renameSync(tmp, dir);
      built = true;
    } catch (e) {
      rmSync(tmp, { recursive: true, force: true });
      throw e;
    }
  }
  const shards = readdirSync(dir).filter((f) => f.endsWith('.safetensors')).sort().map((f) => join(dir, f));
  return { dir, shards, bytes: shards.reduce((n, f) => n + statSync(f).size, 0), built };
}
