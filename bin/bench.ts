import type { Command } from 'commander';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { isStrataError, StrataError } from '../model/errors.ts';
import { renderPipelineReport, runPipelineBench, type PipelineBenchOptions, type PipelineBenchReport } from '../bench/pipeline.ts';
import { createProgress, silentProgress, type Progress } from '../bench/progress.ts';
import type { ClusterLauncher } from '../bench/runner.ts';
import { renderSuiteReport, runSuite, type SuiteReport } from '../bench/suite.ts';
import { renderTimeline } from '../bench/timeline.ts';
import { renderBlockReport, runBlockBench, type BlockBenchReport } from '../bench/block.ts';
import { renderQuantReport, runQuantBench, type QuantBenchReport } from '../bench/quant.ts';
import { renderContextReport, runContextBench, type ContextBenchReport } from '../bench/context.ts';
import { ensureSyntheticModel, resolveShape } from '../bench/model.ts';
import { renderLoadReport, runLoadBench, type LoadBenchReport } from '../bench/load.ts';
import { supervisedLauncher } from './bench-load.ts';
import { parseStageDType } from '../model/dtype.ts';
import { availableParallelism } from 'node:os';
import { startLocalCluster } from './local-cluster.ts';

/** The CLI's options: a pipeline bench's, plus the suite to run and where its outputs go. */
export interface BenchCliOptions extends PipelineBenchOptions {
  repeats: number;
  suite: 'pipeline' | 'all' | 'block' | 'quant' | 'context' | 'load';
  /** --suite context: the previous runtime's git ref ('' = none), and where the stage runs. */
  baseline?: string;
  device?: string;
  /** --suite quant: a Hugging Face checkpoint instead of the synthetic preset, and the llama.cpp anchors folder. */
  model?: string;
  anchors?: string;
  /** --suite load (and context: the stage dtype): the stage dtype, the checkpoint's dtype, shard size, KV budget, the kill-and-restart run, removing the checkpoint. */
  dtype?: string;
  ckptDtype?: string;
  shardMb?: number;
  kvBudgetMb?: number;
  recover?: boolean;
  fullLoad?: boolean;
  deleteCheckpoint?: boolean;
  dropCaches?: boolean;
  out: string;
  json?: boolean;
  quiet?: boolean;
}

export const BENCH_DEFAULTS: BenchCliOptions = {
  workers: 2, concurrency: 8, promptTokens: 16, newTokens: 32, maxBatch: 8, repeats: 3, seed: 1, suite: 'pipeline', out: 'bench-out',
};

/** The launcher the bench uses: real `strata worker` processes on loopback. */
export const localLauncher: ClusterLauncher = (modelDir, k, extraArgs) => startLocalCluster(modelDir, k, extraArgs);

export interface BenchOutcome {
  report: PipelineBenchReport | SuiteReport | BlockBenchReport | QuantBenchReport | ContextBenchReport | LoadBenchReport;
  text: string;
  jsonPath: string;
  timelinePath: string;
}

/** Runs a bench suite, writes bench.json and timeline.html into `out`, returns the report and its table. */
export async function runBench(opts: Partial<BenchCliOptions>, deps: { launcher?: ClusterLauncher; progress?: Progress } = {}): Promise<BenchOutcome> {
  const o = { ...BENCH_DEFAULTS, ...Object.fromEntries(Object.entries(opts).filter(([, v]) => v !== undefined)) } as BenchCliOptions;
  const progress = deps.progress ?? (o.quiet ? silentProgress : createProgress());
  const launcher = deps.launcher ?? localLauncher;
  const outDir = resolve(o.out);
  mkdirSync(outDir, { recursive: true });
  const jsonPath = join(outDir, 'bench.json');
  const timelinePath = join(outDir, 'timeline.html');
  let report: PipelineBenchReport | SuiteReport | BlockBenchReport | QuantBenchReport | ContextBenchReport | LoadBenchReport;
  let text: string;
  let html: string;
  if (o.suite === 'all') {
    const { report: r, timeline } = await runSuite({ ...o }, launcher, progress);
    report = r;
    text = renderSuiteReport(r, o.out);
    html = renderTimeline(`strata bench --suite all (${new Date(r.startedAt).toISOString()})`, timeline);
  } else if (o.suite === 'pipeline') {
    const { report: r, timeline } = await runPipelineBench({ ...o }, launcher, progress);
    report = r;
    text = renderPipelineReport(r, o.out);
    html = renderTimeline(`strata bench --suite pipeline: ${o.workers} workers (${new Date(r.startedAt).toISOString()})`, timeline);
  } else if (o.suite === 'block') {
    const r = await runBlockBench({ preset: o.preset, threads: o.threadsPerWorker ?? availableParallelism(), log: (m) => progress.phase(m) });
    report = r;
    text = renderBlockReport(r);
    html = renderTimeline('strata bench --suite block (no pipeline: one block timed alone)', []);
  } else if (o.suite === 'quant') {
    const r = await runQuantBench({ ...o }, launcher, progress);
    report = r;
    text = renderQuantReport(r, o.out);
    html = renderTimeline('strata bench --suite quant (float32 vs int8 vs int4, llama.cpp on the same weights)', []);
  } else if (o.suite === 'context') {
    const model = o.model ?? ensureSyntheticModel(resolveShape(o)).dir;
    const r = await runContextBench({ model, threads: o.threadsPerWorker ?? availableParallelism(), rounds: o.repeats, device: o.device, dtype: parseStageDType(o.dtype ?? 'float32', '--dtype'), maxBatch: o.maxBatch, baseline: o.baseline, anchors: o.anchors, log: (m) => progress.phase(m) });
    report = r;
    text = renderContextReport(r);
    html = renderTimeline('strata bench --suite context (one stage, decode steps by context length and batch)', []);
  } else if (o.suite === 'load') {
    const r = await runLoadBench({ ...o, newTokens: opts.newTokens ?? 16 }, supervisedLauncher(progress), progress);
    report = r;
    text = renderLoadReport(r, o.out);
    html = renderTimeline('strata bench --suite load (checkpoint read, first start, cache hit, memory, decode)', []);
  } else {
    throw new StrataError('bench_suite_unknown', `--suite must be "pipeline", "all", "block", "quant", "context" or "load", got "${o.suite}"`);
  }
  writeFileSync(jsonPath, JSON.stringify(report, null, 2) + '\n');
  writeFileSync(timelinePath, html);
  return { report, text, jsonPath, timelinePath };
}

const int = (name: string, min = 1) => (v: string): number => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) throw new StrataError('bench_flag_invalid', `${name} must be an integer ≥ ${min}, got "${v}"`);
  return n;
};

export function registerBenchCommand(program: Command): void {
  program
    .command('bench')
    .description('benchmark the pipeline on a synthetic checkpoint (built once, cached): tokens/s, TTFT, inter-token latency, per-stage busy %, bytes per hop, against baselines measured in the same run; writes bench.json and timeline.html')
    .option('--preset <name>', 'model shape: gpt2-small | biomedlm | gpt-j (real dims, fewer blocks for the big ones)', 'gpt2-small')
    .option('--blocks <n>', 'override the preset: transformer blocks', int('--blocks'))
    .option('--d-model <d>', 'override the preset: hidden size', int('--d-model'))
    .option('--heads <h>', 'override the preset: attention heads', int('--heads'))
    .option('--vocab <v>', 'override the preset: vocabulary size', int('--vocab'))
    .option('--workers <k>', 'pipeline stages, one worker process each', int('--workers'), BENCH_DEFAULTS.workers)
    .option('--threads-per-worker <t>', 'ORT intra-op threads per worker (default: floor(cores / K); the baselines follow the same rule)', int('--threads-per-worker'))
    .option('--concurrency <n>', 'concurrent generate requests', int('--concurrency'), BENCH_DEFAULTS.concurrency)
    .option('--prompt-tokens <p>', 'random prompt length', int('--prompt-tokens'), BENCH_DEFAULTS.promptTokens)
    .option('--new-tokens <m>', 'tokens generated per request (eos ignored)', int('--new-tokens'), BENCH_DEFAULTS.newTokens)
    .option('--max-batch <b>', 'worker --max-batch (decode steps batched per ORT run)', int('--max-batch'), BENCH_DEFAULTS.maxBatch)
    .option('--repeats <r>', '--suite all: repeats of each one-request run (median)', int('--repeats'), BENCH_DEFAULTS.repeats)
    .option('--seed <s>', 'prompt RNG seed', int('--seed', 0), BENCH_DEFAULTS.seed)
    .option('--suite <name>', 'pipeline (this configuration vs its baselines) | all (every figure the issues ask for) | block (one block of --preset, default gpt-j, timed alone vs memory bandwidth) | quant (float32 vs int8 vs int4 stages on one worker: weight bytes, RSS, decode speed; llama.cpp with --anchors) | context (decode ms/step, tok/s, host↔device bytes/step at prompts 16-1024, batch 1 and 8, vs the previous runtime and llama.cpp with --anchors) | load (a full-size sharded checkpoint of --preset, --blocks to scale it: raw read, first start, cache-hit start, peak RSS, decode; --recover, --full-load)', BENCH_DEFAULTS.suite)
    .option('--model <dir>', '--suite quant/context: a Hugging Face checkpoint (default: the synthetic --preset)')
    .option('--baseline <ref>', '--suite context: git ref of the previous stage runtime, run from a worktree in the same rounds (\'\' = none)')
    .option('--device <device>', '--suite context: cpu | cuda:N | webgpu', process.env.STRATA_DEVICE ?? 'cpu')
    .option('--anchors <dir>', '--suite quant/context: the llama.cpp anchors folder (../shared/anchors set up in e.g. /tmp/anchors) holding GGUF files of --model')
    .option('--dtype <dtype>', '--suite load and context: the stage dtype (float32 | int8 | int4; float16 is refused on a CPU)', 'float32')
    .option('--ckpt-dtype <dtype>', '--suite load: the written checkpoint\'s dtype, f32 | f16', 'f32')
    .option('--shard-mb <mb>', '--suite load: largest checkpoint shard', int('--shard-mb'), 3500)
    .option('--kv-budget-mb <mb>', '--suite load: each worker\'s --kv-budget-mb', int('--kv-budget-mb'), 1024)
    .option('--recover', '--suite load: also kill -9 the last worker mid-generation and time its restart (warm cache), checking the outputs')
    .option('--full-load', '--suite load: also fill every KV slot to the model\'s context with concurrent sessions, then run a full-context forward, and compare each worker\'s peak RSS with the planner\'s estimate (its worst case)')
    .option('--no-drop-caches', '--suite load: never drop the page cache before timed reads and starts (they are then warm)')
    .option('--delete-checkpoint', '--suite load: remove the written checkpoint at the end (it is kept for the next run otherwise)')
    .option('--out <dir>', 'where bench.json and timeline.html go', BENCH_DEFAULTS.out)
    .option('--json', 'print only the JSON report on stdout')
    .action(async (o: BenchCliOptions) => {
      try {
        const outcome = await runBench(o);
        process.stdout.write(o.json ? JSON.stringify(outcome.report) + '\n' : outcome.text + '\n');
      } catch (e) {
        console.error(`strata bench: ${isStrataError(e) ? e.message : (e as Error).stack}`);
        process.exitCode = 2;
      }
    });
}
