import { mkdirSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const FIXTURE_ROOT = fileURLToPath(new URL('../fixtures/', import.meta.url));
export const CONFIG_ROOT = fileURLToPath(new URL('../configs/', import.meta.url));
export const CAUSAL_FIXTURES = ['gpt2-tiny', 'gptj-tiny', 'gptneo-rotary-tiny'] as const;
export const ALL_FIXTURES = [...CAUSAL_FIXTURES, 'distilbert-tiny'] as const;

export const fixtureDir = (name: string): string => join(FIXTURE_ROOT, name);

export interface Expected {
  forward: { input_ids: number[]; logits: number[][] }[];
  generate?: { input_ids: number[]; max_new_tokens: number; output_ids: number[] }[];
  fill_mask?: { input_ids: number[]; mask_index: number; top5_ids: number[]; logits_at_mask: number[] }[];
  mask_token_id?: number;
}

export const expected = (name: string): Expected => JSON.parse(readFileSync(join(fixtureDir(name), 'expected.json'), 'utf8'));

/** One stage-graph cache per test process: graphs are built once, then reused by every split that needs them. */
let cache: string | undefined;
export function testCacheDir(): string {
  cache ??= mkdtempSync(join(tmpdir(), 'strata-test-cache-'));
  process.env.STRATA_CACHE_DIR = cache;
  return cache;
}

export function maxAbsDiff(got: number[][], want: number[][]): number {
  if (got.length !== want.length) return Infinity;
  let max = 0;
  for (let t = 0; t < want.length; t++) {
    if (got[t].length !== want[t].length) return Infinity;
    for (let v = 0; v < want[t].length; v++) max = Math.max(max, Math.abs(got[t][v] - want[t][v]));
  }
  return max;
}

/** Dawn (ORT's WebGPU EP) needs a runtime directory: a private one when the environment has none. */
export function ensureXdgRuntimeDir(): void {
  if (process.env.XDG_RUNTIME_DIR) return;
  const dir = join(tmpdir(), `strata-xdg-${process.getuid?.() ?? 0}`);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  process.env.XDG_RUNTIME_DIR = dir;
}
