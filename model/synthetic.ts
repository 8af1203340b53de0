import { closeSync, mkdirSync, openSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { normalizeConfig } from './config.ts';
import { StrataError } from './errors.ts';
import { allRefs, keyPrefix, stageWeights } from './layout.ts';
import { safetensorsHeader } from './safetensors.ts';
import { familyNamed } from './families/index.ts';
import type { SyntheticShape, SyntheticSupport } from './families/family.ts';

export type { SyntheticShape } from './families/family.ts';
export { PRESETS } from './families/index.ts';

/** The family's synthetic support, or a typed error for a family that has none. */
export function syntheticSupport(family: string): SyntheticSupport {
  const support = familyNamed(family).synthetic;
  if (!support) throw new StrataError('synthetic_unsupported', `model family "${family}" has no synthetic checkpoints; choose a family whose file provides \`synthetic\``);
  return support;
}

/** A Hugging Face config.json object for a synthetic shape, from its family. */
export const syntheticConfig = (s: SyntheticShape): Record<string, unknown> => syntheticSupport(s.family).config(s);

/**
 * Writes a random-weight checkpoint in Hugging Face layout (config.json + model.safetensors), tensor by tensor so a
 * multi-GB model never sits in memory. Values are uniform in ±0.05 (norm weights 1, biases 0): a real compute load,
 * not a meaningful model.
 */
export function writeSyntheticModel(dir: string, shape: SyntheticShape, onProgress?: (done: number, total: number) => void): void {
  mkdirSync(dir, { recursive: true });
  const support = syntheticSupport(shape.family);
  const config = support.config(shape);
  writeFileSync(join(dir, 'config.json'), JSON.stringify(config, null, 2));
  const spec = normalizeConfig(config);
  const refs = allRefs(stageWeights(spec, { first: 0, last: spec.blocks }, keyPrefix(spec, () => true)));
  const tensors = refs.map((r) => ({ key: r.key, dtype: 'F32', shape: r.shape, bytes: r.shape.reduce((a, b) => a * b, 4) }));
  const total = tensors.reduce((n, t) => n + t.bytes, 0);
  const fd = openSync(join(dir, 'model.safetensors'), 'w');
  writeSync(fd, safetensorsHeader(tensors));
  let state = (shape.seed ?? 1234) >>> 0 || 1;
  let written = 0;
  for (const r of refs) {
    const n = r.shape.reduce((a, b) => a * b, 1);
    const isNormWeight = support.isNormWeight(r.key);
    const isBias = r.key.endsWith('.bias');
    const chunk = new Float32Array(Math.min(n, 1 << 22));
    for (let done = 0; done < n; done += chunk.length) {
      const m = Math.min(chunk.length, n - done);
      for (let i = 0; i < m; i++) {
        // xorshift32: fast and deterministic; statistical quality is irrelevant here.
        state ^= state << 13;
        state ^= state >>> 17;
        state ^= state << 5;
        chunk[i] = isNormWeight ? 1 : isBias ? 0 : ((state >>> 0) / 4294967296 - 0.5) * 0.1;
      }
      writeSync(fd, new Uint8Array(chunk.buffer, 0, m * 4));
    }
    written += n * 4;
    onProgress?.(written, total);
  }
  closeSync(fd);
}
