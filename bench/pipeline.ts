import { cpus, loadavg } from 'node:os';
import { rangeLabel } from '../model/range.ts';
import { resolveShape, type ShapeFlags } from './model.ts';
import type { Progress } from './progress.ts';
import { fmt, fmtBytes, table } from './report.ts';
import { cores, defaultThreads, plannedRanges, measureInProcess, measureWorkers, prebuildStages, prepareModel, type BenchModel, type ClusterLauncher, type RunResult } from './runner.ts';
import { ratio } from './stats.ts';
import type { TimelineSection } from './timeline.ts';

export interface PipelineBenchOptions extends ShapeFlags {
  workers: number;
  /** Default: floor(cores / K) (bin/local-cluster.ts's rule). */
  threadsPerWorker?: number;
  concurrency: number;
  promptTokens: number;
  newTokens: number;
  maxBatch: number;
  seed: number;
  cacheDir?: string;
}

export interface PipelineBenchReport {
  suite: 'pipeline';
  startedAt: string;
  machine: ReturnType<typeof machineInfo>;
  model: { shape: BenchModel['shape']; dir: string; fingerprint: string; weightBytes: number; weightBytesReadPerDecodeStep: number };
  workload: { concurrency: number; promptTokens: number; newTokens: number; seed: number };
  pipeline: RunResult;
  baselines: { singleWorker: RunResult; inProcess: RunResult };
  ratios: {
    decodeVsSingleWorker: number;
    decodeVsInProcess: number;
    tokensPerSecVsSingleWorker: number;
    tokensPerSecVsInProcess: number;
  };
  notes: string[];
}

export function machineInfo() {
  return { cores: cores(), cpu: cpus()[0]?.model ?? 'unknown', node: process.version, platform: `${process.platform}-${process.arch}`, loadavg1m: loadavg()[0] };
}

/**
 * `strata bench --suite pipeline`: the workload through K workers, and in the same run through one worker holding
 * every block and through the in-process path.
 */
export async function runPipelineBench(o: PipelineBenchOptions, launch: ClusterLauncher, progress: Progress): Promise<{ report: PipelineBenchReport; timeline: TimelineSection[] }> {
  const startedAt = new Date().toISOString();
  const shape = resolveShape(o);
  const model = prepareModel(shape, progress, o.cacheDir);
  const ranges = plannedRanges(model.spec, o.workers);
  const threads = o.threadsPerWorker ?? defaultThreads(o.workers);
  // The baselines use the same rule: the flag when given, else the cores divided among their one worker.
  const baseThreads = o.threadsPerWorker ?? defaultThreads(1);
  prebuildStages(model, [...ranges, { first: 0, last: model.spec.blocks }], progress, o.cacheDir);
  const w = { concurrency: o.concurrency, promptTokens: o.promptTokens, newTokens: o.newTokens, seed: o.seed };

  const pipeline = await measureWorkers(launch, model, { k: o.workers, threads, maxBatch: o.maxBatch, ranges }, `pipeline: ${o.workers} workers`, w, progress);
  const single = await measureWorkers(launch, model, { k: 1, threads: baseThreads, maxBatch: o.maxBatch }, 'baseline: 1 worker, all blocks', w, progress);
  const inProcess = await measureInProcess(model, ranges, baseThreads, `baseline: in-process, ${o.workers} stage(s)`, w, progress);

  const p = pipeline.result;
  const report: PipelineBenchReport = {
    suite: 'pipeline', startedAt, machine: machineInfo(),
    model: { shape, dir: model.dir, fingerprint: model.fingerprint, weightBytes: model.weights.held, weightBytesReadPerDecodeStep: model.weights.readPerStep },
    workload: w,
    pipeline: p,
    baselines: { singleWorker: single.result, inProcess: inProcess.result },
    ratios: {
      decodeVsSingleWorker: ratio(p.decodeTokensPerSec, single.result.decodeTokensPerSec),
      decodeVsInProcess: ratio(p.decodeTokensPerSec, inProcess.result.decodeTokensPerSec),
      tokensPerSecVsSingleWorker: ratio(p.tokensPerSec, single.result.tokensPerSec),
      tokensPerSecVsInProcess: ratio(p.tokensPerSec, inProcess.result.tokensPerSec),
    },
    notes: [
      `threads: pipeline workers ${threads} each (${o.threadsPerWorker ? '--threads-per-worker' : `floor(${cores()} cores / ${o.workers})`}); single worker and in-process ${baseThreads}`,
      'decode tokens/s: tokens chosen while every request was decoding / that window; tokens/s: all tokens / wall time (prefill included)',
      'busy %: union of the stage\'s ORT run intervals (worker clock) / wall time of the timed workload',
    ],
  };
  return { report, timeline: [pipeline.timeline!, single.timeline!].filter(Boolean) };
}

export function renderRunTable(runs: RunResult[]): string {
  return table(
    ['run', 'workers×threads', 'batch≤', 'decode tok/s', 'tok/s (e2e)', 'TTFT p50 ms', 'TTFT p95 ms', 'ITL p50 ms', 'ITL p95 ms'],
    runs.map((r) => [r.label, `${r.workers}×${r.threadsPerWorker}`, r.maxBatch ?? '—', fmt(r.decodeTokensPerSec, 1), fmt(r.tokensPerSec, 1), fmt(r.ttftMs.p50, 1), fmt(r.ttftMs.p95, 1), fmt(r.itlMs.p50, 2), fmt(r.itlMs.p95, 2)]),
  );
}

/** Where the timed window's CPU went, and the wall time that CPU needs at least on this host's cores. */
export function renderCpu(r: RunResult): string {
  if (!r.cpu) return '(CPU split: needs /proc, i.e. Linux)';
  const sec = (ms: number) => (ms / 1000).toFixed(2);
  const rows = [['coordinator (this process)', r.cpu.coordinator], ...r.cpu.stages.map((st, i) => [`stage ${i} (pid ${st.pid})`, st] as const)] as const;
  return [
    table(['process', 'event loop CPU s', 'other threads CPU s (stage thread, ORT pool)'], rows.map(([name, c]) => [name, sec(c.eventLoopMs), sec(c.otherMs)]), ['l', 'r', 'r']),
    `CPU in the timed window: ${sec(r.cpu.totalMs)} s on ${cores()} cores = at least ${sec(r.cpu.totalMs / cores())} s of wall time (took ${sec(r.wallMs)} s): at most ${fmt(r.cpu.boundTokensPerSec, 1)} tok/s (e2e) with this much CPU`,
  ].join('\n');
}

export function renderPipelineReport(r: PipelineBenchReport, outDir: string): string {
  const s = r.model.shape;
  const lines = [
    `strata bench --suite pipeline — ${s.family} ${s.blocks} blocks, d ${s.dModel}, ${s.heads} heads, vocab ${s.vocab} (${fmtBytes(r.model.weightBytes)} float32)`,
    `machine: ${r.machine.cores} cores, ${r.machine.cpu}, node ${r.machine.node}, load ${r.machine.loadavg1m.toFixed(2)}; workload: ${r.workload.concurrency} concurrent × ${r.workload.newTokens} new tokens, prompt ${r.workload.promptTokens} tokens (random, eos ignored, greedy)`,
    '',
    renderRunTable([r.pipeline, r.baselines.singleWorker, r.baselines.inProcess]),
    '',
    table(['stage', 'blocks', 'pid', 'ORT runs', 'busy %', 'mean batch', 'max batch', 'run p50 ms', 'run p95 ms', 'runs by batch size'],
      r.pipeline.stages.map((st) => [st.index, rangeLabel({ first: st.blocks[0], last: st.blocks[1] }), st.pid ?? '—', st.runs, fmt(st.busyPct, 1), fmt(st.meanBatch, 2), st.maxBatch, fmt(st.runMs.p50, 2), fmt(st.runMs.p95, 2), Object.entries(st.batchHistogram).map(([k, n]) => `${k}:${n}`).join(' ')]),
      ['r', 'l', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'l']),
    '',
    renderCpu(r.pipeline),
    '',
    r.pipeline.hops.length
      ? table(['hop', 'messages', 'bytes/decode step', 'bytes/prefill', 'total', 'per second'],
        r.pipeline.hops.map((h) => [`${h.from}→${h.to}`, h.messages, fmtBytes(h.bytesPerDecodeStep), fmtBytes(h.bytesPerPrefill), fmtBytes(h.totalBytes), `${fmtBytes(h.bytesPerSec)}/s`]))
      : '(one stage: no hidden-state hops)',
    '',
    `pipeline vs 1 worker (all blocks): decode ×${fmt(r.ratios.decodeVsSingleWorker)}, e2e ×${fmt(r.ratios.tokensPerSecVsSingleWorker)}`,
    `pipeline vs in-process:            decode ×${fmt(r.ratios.decodeVsInProcess)}, e2e ×${fmt(r.ratios.tokensPerSecVsInProcess)}`,
    ...r.notes.map((n) => `note: ${n}`),
    `wrote ${outDir}/bench.json and ${outDir}/timeline.html`,
  ];
  return lines.join('\n');
}
