import type { BandwidthResult } from './bandwidth.ts';
import type { OrtStreamResult } from './ort-stream.ts';
import { resolveShape, type ShapeFlags } from './model.ts';
import { machineInfo, renderRunTable } from './pipeline.ts';
import type { Progress } from './progress.ts';
import { fmt, fmtBytes, table } from './report.ts';
import { plannedRanges, prebuildStages, prepareModel, type BenchModel, type ClusterLauncher, type RunResult } from './runner.ts';
import { median } from './stats.ts';
import type { TimelineSection } from './timeline.ts';
import type { HopProbe } from './transport.ts';
import { measureSuite, planSuite, suiteResults } from './suite-measure.ts';
import { suiteFigures, type SuiteEntry } from './suite-figures.ts';

// `strata bench --suite all`: what it measures and how (suite-measure.ts), the figures (suite-figures.ts), and
// here the report that joins them and its text rendering.
export type { SuiteEntry } from './suite-figures.ts';

export interface SuiteOptions extends ShapeFlags {
  /** Concurrent requests for the aggregate figures (the issues ask for 8). */
  concurrency: number;
  promptTokens: number;
  newTokens: number;
  /** Interleaved rounds of every measurement (rates: the median over rounds). */
  repeats: number;
  seed: number;
  cacheDir?: string;
  /** Dims of the tensor for the one-hop transport figure (default [1, 1024, 4096] float32 = 16 MiB). */
  hopDims?: number[];
}

export interface SuiteReport {
  suite: 'all';
  startedAt: string;
  wallSeconds: number;
  machine: ReturnType<typeof machineInfo>;
  model: { shape: BenchModel['shape']; dir: string; fingerprint: string; weightBytes: number; weightBytesReadPerDecodeStep: number; blockBytes: number; headBytes: number };
  workload: { concurrency: number; promptTokens: number; newTokens: number; repeats: number; seed: number };
  entries: SuiteEntry[];
  runs: Record<string, RunResult>;
  probes: { grpc: HopProbe; tcpProcess: HopProbe; tcpSameProcess: HopProbe; grpcDecodeStep: HopProbe; tcpDecodeStep: HopProbe };
  bandwidth: BandwidthResult[];
  /** ONNX Runtime's own batch-1 weight-streaming rate (MatMul chain), per thread count. */
  ortStream: OrtStreamResult[];
  /** The model's own linear layers alone at batch 1 (Gemms of its shapes), per thread count. */
  ortLinears: OrtStreamResult[];
  notes: string[];
}

/** `strata bench --suite all`: every figure the issues ask for, each against a baseline measured in this run. */
export async function runSuite(o: SuiteOptions, launch: ClusterLauncher, progress: Progress): Promise<{ report: SuiteReport; timeline: TimelineSection[] }> {
  const t0 = Date.now();
  const startedAt = new Date().toISOString();
  const shape = resolveShape(o);
  const model = prepareModel(shape, progress, o.cacheDir);
  const ks = [1, 2, 4].filter((k) => k <= model.spec.blocks);
  prebuildStages(model, ks.flatMap((k) => plannedRanges(model.spec, k)), progress, o.cacheDir);
  const plan = planSuite(o, model, ks);
  const res = suiteResults(plan, await measureSuite(plan, launch, progress, o.cacheDir));
  const entries = suiteFigures(plan, res);
  const readBytes = model.weights.readPerStep;
  const decodeProbe = (trialsMs: number[]): HopProbe => ({ bytes: model.spec.dModel * 4, trialsMs, medianMs: median(trialsMs) });
  const report: SuiteReport = {
    suite: 'all', startedAt, wallSeconds: (Date.now() - t0) / 1000, machine: machineInfo(),
    model: { shape, dir: model.dir, fingerprint: model.fingerprint, weightBytes: model.weights.held, weightBytesReadPerDecodeStep: readBytes, blockBytes: model.weights.blocks, headBytes: model.weights.head },
    workload: { concurrency: plan.N, promptTokens: o.promptTokens, newTokens: o.newTokens, repeats: o.repeats, seed: o.seed },
    entries, runs: res.runs,
    probes: { grpc: res.grpc, tcpProcess: res.tcpProcess, tcpSameProcess: res.tcpSameProcess, grpcDecodeStep: decodeProbe(res.smallGrpc), tcpDecodeStep: decodeProbe(res.smallTcp) },
    bandwidth: res.bandwidth, ortStream: res.ortStream, ortLinears: res.ortLinears,
    notes: [
      'every ratio is against a baseline measured in this same run (shared, noisy machine)',
      'tokens/s = decode tokens/s: for one request (M−1)/(t_last − t_first); for N concurrent, tokens chosen while all N were decoding / that window; each the median over interleaved rounds (one-request runs: 2 requests per round)',
      'all configurations run side by side (idle workers stay up) and every round measures each once, in a rotated order',
      `weight-read floor: block weights (${fmtBytes(model.weights.blocks)}) + LM head (${fmtBytes(model.weights.head)}) + embedding rows, per step`,
    ],
  };
  return { report, timeline: res.timeline };
}

export function renderSuiteReport(r: SuiteReport, outDir: string): string {
  const s = r.model.shape;
  const rows = r.entries.map((e) => [
    e.id, e.figure, `${fmt(e.value)} ${e.unit}`, `${fmt(e.baseline)} (${e.baselineLabel})`, `×${fmt(e.ratio, 3)}`,
    e.target ? `${e.target.op === '>=' ? '≥' : '≤'} ${e.target.ratio}×` : '—', e.pass === null ? 'info' : e.pass ? 'PASS' : 'MISS',
  ]);
  return [
    `strata bench --suite all — ${s.family} ${s.blocks} blocks, d ${s.dModel}, ${s.heads} heads, vocab ${s.vocab} (${fmtBytes(r.model.weightBytes)} float32; ${fmtBytes(r.model.weightBytesReadPerDecodeStep)} read per decode step)`,
    `machine: ${r.machine.cores} cores, ${r.machine.cpu}, node ${r.machine.node}, load ${r.machine.loadavg1m.toFixed(2)} at start; ${r.wallSeconds.toFixed(0)} s`,
    `workload: prompt ${r.workload.promptTokens} random tokens, ${r.workload.newTokens} new tokens (greedy, eos ignored); ${r.workload.repeats} interleaved rounds; aggregate runs ${r.workload.concurrency} concurrent`,
    '',
    table(['#', 'figure', 'value', 'baseline', 'ratio', 'target', 'result'], rows, ['l', 'l', 'r', 'l', 'r', 'r', 'l']),
    '',
    'settings:',
    ...r.entries.map((e) => `  ${e.id}: ${e.settings}`),
    '',
    renderRunTable(Object.values(r.runs)),
    '',
    'per-stage ORT runs (median round): busy % of wall time, runs by batch size',
    ...Object.values(r.runs).filter((run) => run.stages.length).map((run) => `  ${run.label}: ${run.stages.map((st) => `s${st.index} ${fmt(st.busyPct, 0)}% {${Object.entries(st.batchHistogram).map(([b, n]) => `${b}:${n}`).join(' ')}}`).join(', ')}`),
    '',
    `one hop ${fmtBytes(r.probes.grpc.bytes)}: gRPC trials ${r.probes.grpc.trialsMs.map((t) => fmt(t, 1)).join(' ')} ms; TCP (process) ${r.probes.tcpProcess.trialsMs.map((t) => fmt(t, 1)).join(' ')} ms`,
    `bandwidth: ${r.bandwidth.map((b) => `${b.threads} thread(s): read ${fmt(b.readBytesPerSec / 1e9, 1)} GB/s, copy ${fmt(b.copyBytesPerSec / 1e9, 1)} GB/s`).join('; ')}; ONNX Runtime weight streaming: ${r.ortStream.map((o) => `${o.threads} thread(s) ${fmt(o.bytesPerSec / 1e9, 1)} GB/s`).join(', ')}`,
    ...r.notes.map((n) => `note: ${n}`),
    `wrote ${outDir}/bench.json and ${outDir}/timeline.html`,
  ].join('\n');
}
