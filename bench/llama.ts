import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { StrataError } from '../model/errors.ts';
import type { StageDType } from '../model/dtype.ts';

/** llama.cpp's weights at a stage dtype's width: the anchors' gpt2-small-<weights>.gguf files. */
export const LLAMA_WEIGHTS: Partial<Record<StageDType, string>> = { float32: 'f32', int8: 'q8_0', int4: 'q4_0' };

/**
 * One run of the anchors' `llama_bench.mjs` (llama.cpp through node-llama-cpp, ../shared/anchors set up in a scratch
 * folder) on `gguf` in that folder: `args` are the script's own (threads, repetitions, flags). Returns the JSON
 * object it prints last.
 */
export function runLlamaBench<T = Record<string, number>>(anchors: string, gguf: string, args: string[]): T {
  const r = spawnSync(process.execPath, [join(anchors, 'llama_bench.mjs'), join(anchors, gguf), ...args], { cwd: anchors, encoding: 'utf8', maxBuffer: 64 << 20 });
  const line = r.stdout.trim().split('\n').pop() ?? '';
  if (r.status !== 0 || !line.startsWith('{')) throw new StrataError('bench_anchor_failed', `llama_bench.mjs ${gguf} ${args.join(' ')} failed: ${r.stderr.slice(-2000)}`);
  return JSON.parse(line) as T;
}
