import { availableParallelism } from 'node:os';
import { cpuWindow, type CpuSplit } from './cpu.ts';
import { loadModelSpec, type ModelSpec } from '../model/config.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import type { Stepper } from '../model/generation.ts';
import { rangeLabel, type BlockRange } from '../model/range.ts';
import { planPartition } from '../coordinator/planner.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { prepareStage } from '../model/stage-cache.ts';
import type { SyntheticShape } from '../model/synthetic.ts';
import type { WireTiming } from '../proto/messages.ts';
import { RemotePipeline } from '../coordinator/remote-pipeline.ts';
import { ensureSyntheticModel, weightBytes, type WeightBytes } from './model.ts';
import type { Progress } from './progress.ts';
import { mean, median, summarize, type Summary } from './stats.ts';
import type { TimelineSection } from './timeline.ts';
import { runWorkload, warmUp, type StepShape, type WorkloadResult } from './workload.ts';

/** K worker processes on loopback, started by the CLI layer (bin/local-cluster.ts); the bench only drives them. */
export interface BenchCluster {
  workers: { address: string; pid: number }[];
  stop(): Promise<void>;
}
export type ClusterLauncher = (modelDir: string, k: number, extraArgs: string[]) => Promise<BenchCluster>;

export const cores = (): number => availableParallelism();
/** bin/local-cluster.ts's rule: K workers share the cores. */
export const defaultThreads = (k: number): number => Math.max(1, Math.floor(cores() / k));

export interface BenchModel {
  dir: string;
  shape: SyntheticShape;
  spec: ModelSpec;
  fingerprint: string;
  weights: WeightBytes;
  built: boolean;
}

export function prepareModel(shape: SyntheticShape, progress: Progress, cacheDir?: string): BenchModel {
  let bar: ReturnType<Progress['bar']> | null = null;
  const t0 = Date.now();
  const { dir, built } = ensureSyntheticModel(shape, {
    cacheDir,
    onProgress: (done, all) => {
      if (!bar) {
        progress.phase(`writing synthetic checkpoint (${(all / 2 ** 20).toFixed(0)} MiB of float32 weights)`);
        bar = progress.bar('checkpoint', Math.round(all / 2 ** 20), 'MiB');
      }
      bar.update(Math.round(done / 2 ** 20));
    },
  });
  (bar as ReturnType<Progress['bar']> | null)?.stop();
  progress.phase(built ? `synthetic checkpoint written in ${((Date.now() - t0) / 1000).toFixed(1)} s: ${dir}` : `synthetic checkpoint (cached): ${dir}`);
  const spec = loadModelSpec(dir);
  const ck = Checkpoint.open(dir);
  const fingerprint = ck.fingerprint();
  ck.close();
  return { dir, shape, spec, fingerprint, weights: weightBytes(spec), built };
}

/** Builds (once; disk-cached) the stage graphs for these ranges here, so workers start from the cache. */
export function prebuildStages(model: BenchModel, ranges: BlockRange[], progress: Progress, cacheDir?: string): void {
  for (const r of ranges) {
    const t0 = Date.now();
    const p = prepareStage(model.dir, r, { cacheDir, onProgress: (m) => progress.phase(m) });
    if (p.built) progress.phase(`  stage ${rangeLabel(r)} built in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  }
}

/** Per-stage ORT runs reported back with each step, de-duplicated (a batched run is reported once per session). */
export class TimingCollector {
  private readonly seen = new Set<string>();
  readonly runs: { stage: number; timing: WireTiming }[] = [];
  onTiming = (stage: number, t: WireTiming): void => {
    const key = `${stage}|${t.pid}|${t.start_unix_ms}|${t.run_ms}`;
    if (this.seen.has(key)) return;
    this.seen.add(key);
    this.runs.push({ stage, timing: t });
  };
  reset(): void {
    this.seen.clear();
    this.runs.length = 0;
  }
  forStage(stage: number): WireTiming[] {
    return this.runs.filter((r) => r.stage === stage).map((r) => r.timing).sort((a, b) => a.start_unix_ms - b.start_unix_ms);
  }
}

export interface StageStats {
  index: number;
  blocks: [number, number];
  pid?: number;
  address: string;
  /** ORT runs in the window (a batched run counts once). */
  runs: number;
  /** Union of run intervals inside the measured window. */
  busyMs: number;
  /** busyMs / wall time × 100. */
  busyPct: number;
  /** Mean sessions per run. */
  meanBatch: number;
  maxBatch: number;
  /** ORT runs by batch size: {"1": 12, "7": 30, ...}. */
  batchHistogram: Record<string, number>;
  runMs: Summary;
  /** Median run time at the most frequent batch size (the steady decode group), and that size. */
  groupRunMs: number;
  groupSize: number;
}

export interface HopStats {
  from: number;
  to: number;
  /** Hidden-state messages that crossed the hop (one per session step). */
  messages: number;
  /** B×T×D×4 for one decode step of one session (T = 1). */
  bytesPerDecodeStep: number;
  /** B×T×D×4 for one prefill (T = prompt tokens). */
  bytesPerPrefill: number;
  totalBytes: number;
  bytesPerSec: number;
}

export interface RunConfig {
  label: string;
  mode: 'workers' | 'in-process';
  workers: number;
  threadsPerWorker: number;
  maxBatch: number | null;
  ranges: BlockRange[];
}

export interface RunResult extends Omit<RunConfig, 'ranges'> {
  ranges: [number, number][];
  repeats: number;
  wallMs: number;
  generatedTokens: number;
  /** Generated tokens / wall time, prefill included. */
  tokensPerSec: number;
  /** Aggregate decode tokens/s (steady window; the median over repeats). */
  decodeTokensPerSec: number;
  /** 1000 / decodeTokensPerSec: for one request, the time per decode step. */
  msPerToken: number;
  ttftMs: Summary;
  itlMs: Summary;
  stages: StageStats[];
  hops: HopStats[];
  /**
   * CPU time in the timed window (Linux, worker runs): this coordinator process and every stage, event loop vs
   * other threads; `boundTokensPerSec` = tokens / (all that CPU spread perfectly over the host's cores).
   */
  cpu: { coordinator: CpuSplit; stages: CpuSplit[]; totalMs: number; boundTokensPerSec: number } | null;
  samples: { ttftMs: number[]; itlMs: number[]; decodeTokensPerSec: number[] };
}

function unionWithin(intervals: [number, number][], from: number, to: number): number {
  const clipped = intervals.map(([a, b]) => [Math.max(a, from), Math.min(b, to)] as [number, number]).filter(([a, b]) => b > a).sort((x, y) => x[0] - y[0]);
  let total = 0;
  let curA = -Infinity;
  let curB = -Infinity;
  for (const [a, b] of clipped) {
    if (a > curB) {
      if (curB > curA) total += curB - curA;
      curA = a;
      curB = b;
    } else curB = Math.max(curB, b);
  }
  if (curB > curA) total += curB - curA;
  return total;
}

export function stageStats(collector: TimingCollector, stages: { blocks: [number, number]; address: string; pid?: number }[], fromMs: number, toMs: number): StageStats[] {
  const wall = toMs - fromMs;
  return stages.map((s, i) => {
    const runs = collector.forStage(i).filter((t) => t.start_unix_ms + t.run_ms > fromMs && t.start_unix_ms < toMs);
    const batchHistogram: Record<string, number> = {};
    for (const t of runs) batchHistogram[t.batch] = (batchHistogram[t.batch] ?? 0) + 1;
    const busyMs = unionWithin(runs.map((t) => [t.start_unix_ms, t.start_unix_ms + t.run_ms]), fromMs, toMs);
    const groupSize = Number(Object.entries(batchHistogram).sort((a, b) => b[1] - a[1] || Number(b[0]) - Number(a[0]))[0]?.[0] ?? 0);
    return {
      index: i, blocks: s.blocks, pid: s.pid, address: s.address, runs: runs.length, busyMs, busyPct: wall > 0 ? (100 * busyMs) / wall : 0,
      meanBatch: runs.length ? mean(runs.map((t) => t.batch)) : 0, maxBatch: Math.max(0, ...runs.map((t) => t.batch)), batchHistogram, runMs: summarize(runs.map((t) => t.run_ms)),
      groupSize, groupRunMs: median(runs.filter((t) => t.batch === groupSize).map((t) => t.run_ms)),
    };
  });
}

export function hopStats(steps: StepShape[], spec: ModelSpec, k: number, promptTokens: number, wallMs: number): HopStats[] {
  const perStep = steps.map((s) => s.batch * s.seq * spec.dModel * 4);
  const totalBytes = perStep.reduce((a, b) => a + b, 0);
  return Array.from({ length: k - 1 }, (_, i) => ({
    from: i, to: i + 1, messages: steps.length,
    bytesPerDecodeStep: spec.dModel * 4, bytesPerPrefill: promptTokens * spec.dModel * 4,
    totalBytes, bytesPerSec: wallMs > 0 ? (totalBytes * 1000) / wallMs : 0,
  }));
}

export interface WorkloadParams {
  concurrency: number;
  promptTokens: number;
  newTokens: number;
  seed: number;
  /** Sequential repetitions of the whole workload (single-request figures use several). */
  repeats?: number;
}

export interface Measured {
  result: RunResult;
  timeline: TimelineSection | null;
}

function cpuSummary(splits: (CpuSplit | null)[] | null, tokens: number): RunResult['cpu'] {
  if (!splits || splits.some((x) => x === null)) return null;
  const [coordinator, ...stages] = splits as CpuSplit[];
  const totalMs = [coordinator, ...stages].reduce((n, x) => n + x.eventLoopMs + x.otherMs, 0);
  return { coordinator, stages, totalMs, boundTokensPerSec: totalMs > 0 ? tokens / (totalMs / 1000 / cores()) : Infinity };
}

/** Warm-up, then the timed workload (repeated), then the figures from the raw samples. */
export async function measure(stepper: Stepper, cfg: RunConfig, model: BenchModel, w: WorkloadParams, progress: Progress, opts: { collector?: TimingCollector; stages?: { blocks: [number, number]; address: string; pid?: number }[] } = {}): Promise<Measured> {
  const vocab = model.spec.vocab;
  if (w.promptTokens + w.newTokens > model.spec.maxPositions) {
    throw new Error(`--prompt-tokens ${w.promptTokens} + --new-tokens ${w.newTokens} exceed the model's ${model.spec.maxPositions} positions`);
  }
  await warmUp(stepper, { concurrency: w.concurrency, promptTokens: w.promptTokens, vocab, newTokens: Math.min(4, w.newTokens) });
  opts.collector?.reset();
  const repeats = Math.max(1, w.repeats ?? 1);
  const bar = progress.bar(cfg.label, repeats * w.concurrency * w.newTokens, 'tokens');
  const results: WorkloadResult[] = [];
  const pids = opts.stages?.map((st) => st.pid);
  const cpuWin = cfg.mode === 'workers' && pids?.every((p) => p !== undefined) ? cpuWindow([process.pid, ...(pids as number[])]) : null;
  try {
    for (let r = 0; r < repeats; r++) {
      results.push(await runWorkload(stepper, { concurrency: w.concurrency, promptTokens: w.promptTokens, newTokens: w.newTokens, vocab, seed: w.seed + r, onToken: () => bar.increment() }));
    }
  } finally {
    bar.stop();
  }
  const cpuSplits = cpuWin?.done() ?? null;
  const from = results[0].startMs;
  const to = results[results.length - 1].endMs;
  const wallMs = results.reduce((n, r) => n + r.wallMs, 0);
  const generatedTokens = results.reduce((n, r) => n + r.generatedTokens, 0);
  const ttft = results.flatMap((r) => r.requests.filter((q) => q.tokenTimes.length).map((q) => q.tokenTimes[0] - q.startMs));
  const itl = results.flatMap((r) => r.requests.flatMap((q) => q.tokenTimes.slice(1).map((t, i) => t - q.tokenTimes[i])));
  const rates = results.map((r) => r.decodeTokensPerSec);
  const decodeTokensPerSec = median(rates);
  const stages = opts.collector && opts.stages ? stageStats(opts.collector, opts.stages, from, to) : [];
  const steps = results.flatMap((r) => r.steps);
  const result: RunResult = {
    ...cfg, ranges: cfg.ranges.map((r) => [r.first, r.last]), repeats, wallMs, generatedTokens,
    tokensPerSec: (generatedTokens * 1000) / wallMs, decodeTokensPerSec, msPerToken: 1000 / decodeTokensPerSec,
    ttftMs: summarize(ttft), itlMs: summarize(itl), stages,
    hops: cfg.mode === 'workers' ? hopStats(steps, model.spec, cfg.workers, w.promptTokens, to - from) : [],
    cpu: cpuSummary(cpuSplits, generatedTokens),
    samples: { ttftMs: ttft, itlMs: itl, decodeTokensPerSec: rates },
  };
  const timeline: TimelineSection | null = opts.collector && opts.stages ? {
    title: cfg.label,
    subtitle: `${cfg.workers} worker(s) × ${cfg.threadsPerWorker} thread(s), max batch ${cfg.maxBatch}; ${w.concurrency} concurrent × ${w.newTokens} new tokens (prompt ${w.promptTokens})${repeats > 1 ? ` × ${repeats} repeats` : ''}; ${result.decodeTokensPerSec.toFixed(1)} decode tokens/s`,
    startMs: from, endMs: to,
    lanes: stages.map((s, i) => ({
      label: `stage ${i} blocks [${s.blocks[0]}, ${s.blocks[1]}) pid ${s.pid ?? '?'}`,
      note: `busy ${s.busyPct.toFixed(1)}%, ${s.runs} runs, mean batch ${s.meanBatch.toFixed(2)}`,
      runs: opts.collector!.forStage(i).map((t) => ({ startMs: t.start_unix_ms, ms: t.run_ms, batch: t.batch })),
    })),
  } : null;
  return { result, timeline };
}

export interface WorkerSetup {
  k: number;
  threads: number;
  maxBatch: number;
  ranges?: BlockRange[];
}

export interface WorkerSession {
  pipeline: RemotePipeline;
  collector: TimingCollector;
  cluster: BenchCluster;
  config(label: string): RunConfig;
  stages: { blocks: [number, number]; address: string; pid?: number }[];
}

/** The block ranges the partition planner gives K equal workers: what a coordinator runs unless told otherwise. */
export function plannedRanges(spec: ModelSpec, k: number): BlockRange[] {
  return planPartition(spec, Array.from({ length: k }, (_, i) => ({ id: `w${i}`, memoryBytes: Infinity }))).stages.map((st) => st.range);
}

/** Starts K workers with the given threads and batch limit and connects a RemotePipeline to them. */
export async function openWorkers(launch: ClusterLauncher, model: BenchModel, s: WorkerSetup, progress: Progress): Promise<WorkerSession & { close(): Promise<void> }> {
  const ranges = s.ranges ?? plannedRanges(model.spec, s.k);
  const t0 = Date.now();
  progress.phase(`starting ${s.k} worker(s): --threads ${s.threads} --max-batch ${s.maxBatch}, blocks ${ranges.map(rangeLabel).join(' ')}`);
  const cluster = await launch(model.dir, s.k, ['--threads', String(s.threads), '--max-batch', String(s.maxBatch)]);
  let pipeline: RemotePipeline;
  const collector = new TimingCollector();
  try {
    pipeline = await RemotePipeline.connect(cluster.workers.map((w) => w.address), { spec: model.spec, fingerprint: model.fingerprint, ranges, onTiming: collector.onTiming });
  } catch (e) {
    await cluster.stop();
    throw e;
  }
  progress.phase(`  ${s.k} worker(s) ready in ${((Date.now() - t0) / 1000).toFixed(1)} s (pids ${cluster.workers.map((w) => w.pid).join(', ')})`);
  const stages = pipeline.describe().stages.map((st) => ({ blocks: st.blocks, address: st.address, pid: st.pid }));
  return {
    pipeline, collector, cluster, stages,
    config: (label) => ({ label, mode: 'workers', workers: s.k, threadsPerWorker: s.threads, maxBatch: s.maxBatch, ranges }),
    close: async () => {
      pipeline.close();
      await cluster.stop();
    },
  };
}

/** openWorkers, run `fn`, stop the workers whatever happens. */
export async function withWorkers<T>(launch: ClusterLauncher, model: BenchModel, s: WorkerSetup, progress: Progress, fn: (w: WorkerSession) => Promise<T>): Promise<T> {
  const ws = await openWorkers(launch, model, s, progress);
  try {
    return await fn(ws);
  } finally {
    await ws.close();
  }
}

/**
 * Several measurements of the same configuration (interleaved rounds) as one result: rates are the median over
 * rounds, latency percentiles come from the pooled raw samples, stage figures and the timeline from the median round.
 */
export function mergeRounds(rounds: Measured[]): Measured {
  if (rounds.length === 1) return rounds[0];
  const rates = rounds.map((m) => m.result.decodeTokensPerSec);
  const order = rates.map((r, i) => [r, i]).sort((a, b) => a[0] - b[0]);
  const mid = rounds[order[(order.length - 1) >> 1][1]];
  const ttft = rounds.flatMap((m) => m.result.samples.ttftMs);
  const itl = rounds.flatMap((m) => m.result.samples.itlMs);
  const decodeTokensPerSec = median(rates);
  const result: RunResult = {
    ...mid.result,
    repeats: rounds.reduce((n, m) => n + m.result.repeats, 0),
    wallMs: rounds.reduce((n, m) => n + m.result.wallMs, 0),
    generatedTokens: rounds.reduce((n, m) => n + m.result.generatedTokens, 0),
    tokensPerSec: median(rounds.map((m) => m.result.tokensPerSec)),
    decodeTokensPerSec, msPerToken: 1000 / decodeTokensPerSec,
    ttftMs: summarize(ttft), itlMs: summarize(itl),
    samples: { ttftMs: ttft, itlMs: itl, decodeTokensPerSec: rounds.flatMap((m) => m.result.samples.decodeTokensPerSec) },
  };
  return { result, timeline: mid.timeline };
}

/** The workload through K workers: the common case of one measurement per cluster. */
export async function measureWorkers(launch: ClusterLauncher, model: BenchModel, s: WorkerSetup, label: string, w: WorkloadParams, progress: Progress): Promise<Measured> {
  return withWorkers(launch, model, s, progress, (ws) => measure(ws.pipeline, ws.config(label), model, w, progress, { collector: ws.collector, stages: ws.stages }));
}

/** The in-process reference path: the same stage graphs run one after another in this process, no gRPC. */
export async function measureInProcess(model: BenchModel, ranges: BlockRange[], threads: number, label: string, w: WorkloadParams, progress: Progress): Promise<Measured> {
  progress.phase(`loading in-process pipeline: ${ranges.length} stage(s) × ${threads} thread(s)`);
  const p = await LocalPipeline.load(model.dir, ranges, { threads });
  try {
    return await measure(p, { label, mode: 'in-process', workers: ranges.length, threadsPerWorker: threads, maxBatch: null, ranges }, model, w, progress);
  } finally {
    await p.close();
  }
}
