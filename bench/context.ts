import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, symlinkSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { StrataError } from '../model/errors.ts';
import { LLAMA_WEIGHTS, runLlamaBench } from './llama.ts';
import { median } from './stats.ts';
import type { StageDType } from '../model/dtype.ts';

/**
 * `strata bench --suite context`: decode ms per step, tok/s and host↔device bytes per step of one stage holding the
 * whole model, at prompts of 16/128/512/1024 tokens and batch 1 and 8. Next to it, in the same run and rounds
 * interleaved, the previous stage runtime (JS-array KV fed as past_* and returned as present_*, batches repacked
 * with left padding): the same child script run in a git worktree of `baseline` (default: the commit before the
 * slot runtime). With `anchors`, llama.cpp on the same weights at the same width (f32, q8_0, q4_0 for float32, int8,
 * int4; its defaults: f16 KV, flash attention auto). The previous runtime has float32 stages only.
 */
export interface ContextBenchOptions {
  model: string;
  threads: number;
  prompts?: number[];
  batches?: number[];
  steps?: number;
  rounds?: number;
  device?: string;
  /** The stage's dtype (default float32). */
  dtype?: StageDType;
  /** Graph rows (the worker's --max-batch; default 8): at most the largest batch. */
  maxBatch?: number;
  /** A git ref of the previous runtime; '' = none. */
  baseline?: string;
  anchors?: string;
  log?: (msg: string) => void;
}

export interface ContextRow {
  runtime: string;
  prompt: number;
  batch: number;
  decodeMsPerStep: number;
  tokPerSec: number;
  hostDeviceBytesPerStep: number | null;
  kvBytesPerStep: number | null;
}

export interface ContextBenchReport {
  suite: 'context';
  model: string;
  threads: number;
  device: string;
  dtype: StageDType;
  /** The current runtime's stage weight bytes as built. */
  weightBytes: number | null;
  baseline: string | null;
  rounds: number;
  rows: ContextRow[];
}

/**
 * The previous runtime: ca6de10, the last commit before the slot runtime (885764e) that runs on its own (the commits
 * between import executor.ts's parseDevice, which arrived with 885764e). Its stage code is the previous runtime's.
 */
export const DEFAULT_BASELINE = 'ca6de10';
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');

/** A worktree of `ref` sharing this checkout's node_modules, with the child script copied in. */
function baselineTree(ref: string): string {
  const sha = spawnSync('git', ['rev-parse', '--short', ref], { cwd: ROOT, encoding: 'utf8' }).stdout.trim();
  if (!sha) throw new StrataError('bench_flag_invalid', `--baseline ${ref} is not a commit of this checkout`);
  const dir = join('/tmp', `strata-baseline-${sha}`);
  if (!existsSync(dir)) {
    const r = spawnSync('git', ['worktree', 'add', '--detach', dir, sha], { cwd: ROOT, encoding: 'utf8' });
    if (r.status !== 0) throw new StrataError('bench_flag_invalid', `git worktree add ${dir} ${sha} failed: ${r.stderr}`);
    symlinkSync(join(ROOT, 'node_modules'), join(dir, 'node_modules'));
  }
  mkdirSync(join(dir, 'bench'), { recursive: true });
  copyFileSync(join(ROOT, 'bench', 'context-child.ts'), join(dir, 'bench', 'context-child.ts'));
  return dir;
}

interface ChildReport {
  rows: { prompt: number; batch: number; stepMs: number[]; hostDeviceBytes: number; kvBytes: number }[];
  weightBytes: number | null;
}

function runChild(root: string, args: object): ChildReport {
  const r = spawnSync(process.execPath, ['--import', 'tsx', join(root, 'bench', 'context-child.ts'), JSON.stringify(args)], { cwd: root, encoding: 'utf8', maxBuffer: 64 << 20 });
  const line = r.stdout.trim().split('\n').at(-1) ?? '';
  if (r.status !== 0 || !line.startsWith('{')) throw new StrataError('bench_flag_invalid', `context bench child in ${root} failed: ${r.stderr.slice(-2000)}`);
  return JSON.parse(line);
}

function llama(anchors: string, weights: string, threads: number, prompt: number, batch: number): number {
  const ids = Array.from({ length: prompt }, (_, i) => 1 + ((i * 7919) % 50000)).join(',');
  const j = runLlamaBench(anchors, `gpt2-small-${weights}.gguf`, [String(threads), '1', '--new', '16', '--ids', ids, ...(batch > 1 ? ['--mode', 'multi', '--seqs', String(batch)] : [])]);
  return batch > 1 ? 1000 / (j.aggregate_decode_tok_s / batch) : j.decode_ms_per_token; // ms per (batched) step
}

export async function runContextBench(o: ContextBenchOptions): Promise<ContextBenchReport> {
  const prompts = o.prompts ?? [16, 128, 512, 1024];
  const batches = (o.batches ?? [1, 8]).filter((b) => !o.maxBatch || b <= o.maxBatch); // a 1-row graph runs batch 1 only
  const rounds = o.rounds ?? 2;
  const dtype = o.dtype ?? 'float32';
  const args = { model: resolve(o.model), threads: o.threads, prompts, batches, steps: o.steps ?? 8, device: o.device ?? 'cpu', dtype, ...(o.maxBatch ? { maxBatch: o.maxBatch } : {}) };
  const baseline = o.baseline === '' || dtype !== 'float32' ? null : (o.baseline ?? DEFAULT_BASELINE);
  const weights = LLAMA_WEIGHTS[dtype];
  let weightBytes: number | null = null;
  const trees: [string, string][] = [['current', ROOT]];
  if (baseline) trees.push([`previous (${baseline})`, baselineTree(baseline)]);
  const samples = new Map<string, { ms: number[]; bytes: number | null; kv: number | null }>();
  const add = (runtime: string, prompt: number, batch: number, ms: number[], bytes: number | null, kv: number | null) => {
    const k = `${runtime}|${prompt}|${batch}`;
    const s = samples.get(k) ?? { ms: [], bytes, kv };
    s.ms.push(...ms);
    samples.set(k, s);
  };
  for (let r = 0; r < rounds; r++) {
    for (const [runtime, root] of trees) {
      if (runtime !== 'current' && args.device !== 'cpu') continue; // the previous runtime has no WebGPU path
      o.log?.(`round ${r + 1}/${rounds}: ${runtime}`);
      const child = runChild(root, args);
      if (runtime === 'current') weightBytes = child.weightBytes;
      for (const row of child.rows) add(runtime, row.prompt, row.batch, row.stepMs, runtime === 'current' ? row.hostDeviceBytes : null, runtime === 'current' ? row.kvBytes : null);
    }
    if (o.anchors && weights) {
      o.log?.(`round ${r + 1}/${rounds}: llama.cpp ${weights}`);
      for (const P of prompts.filter((p) => p <= 512)) for (const B of batches) add(`llama.cpp ${weights}`, P, B, [llama(o.anchors, weights, o.threads, P, B)], null, null);
    }
  }
  const rows: ContextRow[] = [...samples].map(([k, s]) => {
    const [runtime, prompt, batch] = k.split('|');
    const ms = median(s.ms);
    return { runtime, prompt: Number(prompt), batch: Number(batch), decodeMsPerStep: ms, tokPerSec: (1000 * Number(batch)) / ms, hostDeviceBytesPerStep: s.bytes, kvBytesPerStep: s.kv };
  });
  return { suite: 'context', model: args.model, threads: o.threads, device: args.device, dtype, weightBytes, baseline, rounds, rows };
}

export function renderContextReport(r: ContextBenchReport): string {
  const lines = [`strata bench --suite context — ${r.model}, ${r.dtype} (${r.weightBytes === null ? '?' : (r.weightBytes / 2 ** 20).toFixed(1)} MiB of weights), 1 stage × ${r.threads} threads on ${r.device}, ${r.rounds} interleaved rounds (medians)`, ''];
  lines.push('| runtime | prompt | batch | decode ms/step | tok/s | host↔device B/step | of it KV |', '|---|---|---|---|---|---|---|');
  for (const x of [...r.rows].sort((a, b) => a.batch - b.batch || a.prompt - b.prompt || a.runtime.localeCompare(b.runtime))) {
    lines.push(`| ${x.runtime} | ${x.prompt} | ${x.batch} | ${x.decodeMsPerStep.toFixed(1)} | ${x.tokPerSec.toFixed(1)} | ${x.hostDeviceBytesPerStep ?? '—'} | ${x.kvBytesPerStep ?? '—'} |`);
  }
  const cur = (p: number, b: number) => r.rows.find((x) => x.runtime === 'current' && x.prompt === p && x.batch === b);
  const small = cur(16, 8) ?? r.rows.find((x) => x.runtime === 'current' && x.batch === 8);
  const big = r.rows.filter((x) => x.runtime === 'current' && x.batch === 8 && x.prompt <= 512).sort((a, b) => b.prompt - a.prompt)[0];
  if (small && big) lines.push('', `batch-8 step growth, context ${small.prompt} → ${big.prompt}: ×${(big.decodeMsPerStep / small.decodeMsPerStep).toFixed(2)}`);
  return lines.join('\n');
}
