import { closeSync, mkdirSync, openSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { normalizeConfig } from './config.ts';
import { allRefs, keyPrefix, stageWeights } from './layout.ts';

export interface SyntheticShape {
  family: 'gpt2' | 'gptj';
  blocks: number;
  dModel: number;
  heads: number;
  vocab: number;
  maxPositions?: number;
  inner?: number;
  rotaryDim?: number;
  seed?: number;
}

/** Shapes of the real models with fewer blocks, and GPT-2 small (the default bench model). */
export const PRESETS: Record<string, SyntheticShape> = {
  'gpt2-small': { family: 'gpt2', blocks: 12, dModel: 768, heads: 12, vocab: 50257, maxPositions: 1024 },
  biomedlm: { family: 'gpt2', blocks: 4, dModel: 2560, heads: 20, vocab: 28896, maxPositions: 1024 },
  'gpt-j': { family: 'gptj', blocks: 2, dModel: 4096, heads: 16, vocab: 50400, maxPositions: 2048, rotaryDim: 64 },
};

export function syntheticConfig(s: SyntheticShape): Record<string, unknown> {
  const common = { n_embd: s.dModel, n_head: s.heads, n_layer: s.blocks, n_positions: s.maxPositions ?? 1024, n_inner: s.inner ?? null, vocab_size: s.vocab, activation_function: 'gelu_new', layer_norm_epsilon: 1e-5, eos_token_id: 0, bos_token_id: 0 };
  return s.family === 'gpt2'
    ? { model_type: 'gpt2', architectures: ['GPT2LMHeadModel'], ...common, scale_attn_weights: true }
    : { model_type: 'gptj', architectures: ['GPTJForCausalLM'], ...common, rotary_dim: s.rotaryDim ?? 64, tie_word_embeddings: false };
}

/**
 * Writes a random-weight checkpoint in Hugging Face layout (config.json + model.safetensors), tensor by tensor so a
 * multi-GB model never sits in memory. Values are uniform in ±0.05 (norm weights 1, biases 0): a real compute load,
 * not a meaningful model.
 */
export function writeSyntheticModel(dir: string, shape: SyntheticShape, onProgress?: (done: number, total: number) => void): void {
  mkdirSync(dir, { recursive: true });
  const config = syntheticConfig(shape);
  writeFileSync(join(dir, 'config.json'), JSON.stringify(config, null, 2));
  const spec = normalizeConfig(config);
  const refs = allRefs(stageWeights(spec, { first: 0, last: spec.blocks }, keyPrefix(spec, (k) => k.startsWith('transformer.'))));
  const header: Record<string, unknown> = {};
  let offset = 0;
  for (const r of refs) {
    const bytes = r.shape.reduce((a, b) => a * b, 4);
    header[r.key] = { dtype: 'F32', shape: r.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const fd = openSync(join(dir, 'model.safetensors'), 'w');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeSync(fd, len);
  writeSync(fd, Buffer.from(json));
  let state = (shape.seed ?? 1234) >>> 0 || 1;
  let written = 0;
  for (const r of refs) {
    const n = r.shape.reduce((a, b) => a * b, 1);
    const isNormWeight = /(ln_\d|ln_f)\.weight$/.test(r.key);
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
    onProgress?.(written, offset);
  }
  closeSync(fd);
}
