import { BandwidthProbe, type BandwidthResult } from './bandwidth.ts';
import { OrtStreamProbe, type OrtStreamResult } from './ort-stream.ts';
import type { Progress } from './progress.ts';
import { fmt, fmtBytes } from './report.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { cores, defaultThreads, measure, mergeRounds, openWorkers, type BenchModel, type ClusterLauncher, type Measured, type RunResult, type WorkerSession, type WorkloadParams } from './runner.ts';
import { median } from './stats.ts';
import type { TimelineSection } from './timeline.ts';
import { probeGrpcHop, probeTcpHop, type HopProbe } from './transport.ts';

// `strata bench --suite all`'s measurements: which configurations run (planSuite), keeping them all up and measuring
// each once per round in a rotated order (measureSuite), and the rounds merged into results (suiteResults).
// The figures drawn from the results are bench/suite-figures.ts's.

/** One measured configuration of workers. */
export interface Want {
  id: string;
  k: number;
  threads: number;
  maxBatch: number;
  kind: 'single' | 'agg';
  label: string;
}

/** What the suite measures, derived once from the options and the model. */
export interface SuitePlan {
  model: BenchModel;
  /** Stage counts measured (1, 2, 4 as the model's blocks allow). */
  ks: number[];
  nCores: number;
  /** Threads of a lone request's worker: one stage active at a time, so each stage may use every core. */
  all: number;
  /** Concurrent requests of the aggregate runs. */
  N: number;
  single: WorkloadParams;
  agg: WorkloadParams;
  wants: Want[];
  hopDims: number[];
  hopBytes: number;
  inprocThreads: number[];
  rounds: number;
}

export interface PlanOptions {
  concurrency: number;
  promptTokens: number;
  newTokens: number;
  repeats: number;
  seed: number;
  hopDims?: number[];
}

export function planSuite(o: PlanOptions, model: BenchModel, ks: number[]): SuitePlan {
  const nCores = cores();
  const all = nCores;
  const N = o.concurrency;
  const wants: Want[] = [];
  const want = (w: Want) => wants.push(w);
  for (const k of ks) want({ id: `single-k${k}-t${all}`, k, threads: all, maxBatch: 8, kind: 'single', label: `1 request, K=${k}, ${all} thread(s)/worker` });
  for (const k of ks) want({ id: `agg-k${k}-t${defaultThreads(k)}`, k, threads: defaultThreads(k), maxBatch: 8, kind: 'agg', label: `${N} concurrent, K=${k}, ${defaultThreads(k)} thread(s)/worker` });
  if (ks.includes(2)) want({ id: 'agg-k2-t1', k: 2, threads: 1, maxBatch: 8, kind: 'agg', label: `${N} concurrent, K=2, 1 thread/worker` });
  want({ id: 'agg-k1-t1', k: 1, threads: 1, maxBatch: 8, kind: 'agg', label: `${N} concurrent, K=1, 1 thread` });
  if (ks.includes(4)) {
    want({ id: 'single-k4-t1', k: 4, threads: 1, maxBatch: 8, kind: 'single', label: '1 request, K=4, 1 thread/worker' });
    want({ id: 'single-k1-t1', k: 1, threads: 1, maxBatch: 8, kind: 'single', label: '1 request, K=1, 1 thread' });
  }
  want({ id: `agg-k1-t${all}-b1`, k: 1, threads: all, maxBatch: 1, kind: 'agg', label: `${N} concurrent, K=1, ${all} thread(s), --max-batch 1` });
  if (all !== 1) want({ id: 'agg-k1-t1-b1', k: 1, threads: 1, maxBatch: 1, kind: 'agg', label: `${N} concurrent, K=1, 1 thread, --max-batch 1` });
  const hopDims = o.hopDims ?? [1, 1024, 4096];
  return {
    model, ks, nCores, all, N,
    single: { concurrency: 1, promptTokens: o.promptTokens, newTokens: o.newTokens, seed: o.seed, repeats: 2 },
    agg: { concurrency: N, promptTokens: o.promptTokens, newTokens: o.newTokens, seed: o.seed },
    wants: wants.filter((w, i) => wants.findIndex((x) => x.id === w.id) === i),
    hopDims,
    hopBytes: hopDims.reduce((a, b) => a * b, 4),
    inprocThreads: [...new Set([1, all])],
    rounds: Math.max(1, o.repeats),
  };
}

/** Every round's raw measurements, by configuration (and, for probes, by thread count). */
export interface Samples {
  measured: Map<string, Measured[]>;
  bandwidth: Map<number, BandwidthResult[]>;
  ortStream: Map<number, OrtStreamResult[]>;
  ortLinears: Map<number, OrtStreamResult[]>;
  grpc: number[];
  tcp: number[];
  tcpSame: number[];
  smallGrpc: number[];
  smallTcp: number[];
}

/** What stays up for the whole suite: worker clusters, in-process pipelines and the floor probes. */
interface Rig {
  clusters: Map<string, WorkerSession & { close(): Promise<void> }>;
  inprocess: Map<number, LocalPipeline>;
  bandwidth: Map<number, BandwidthProbe>;
  ortStream: Map<number, OrtStreamProbe>;
  ortLinears: Map<number, OrtStreamProbe>;
}

type Job = { id: string; run: () => Promise<void> };

const keyOf = (w: Want) => `${w.k}|${w.threads}|${w.maxBatch}`;
const append = <K, V>(m: Map<K, V[]>, k: K, v: V) => m.set(k, [...(m.get(k) ?? []), v]);

/**
 * Every configuration stays up for the whole suite, and the rounds interleave them, so each figure and its
 * baseline see the same (shared, noisy) machine. Idle workers cost nothing: no ORT runs, a keepalive ping.
 */
export async function measureSuite(plan: SuitePlan, launch: ClusterLauncher, progress: Progress, cacheDir?: string): Promise<Samples> {
  const rig: Rig = { clusters: new Map(), inprocess: new Map(), bandwidth: new Map(), ortStream: new Map(), ortLinears: new Map() };
  const samples: Samples = { measured: new Map(), bandwidth: new Map(), ortStream: new Map(), ortLinears: new Map(), grpc: [], tcp: [], tcpSame: [], smallGrpc: [], smallTcp: [] };
  try {
    await openRig(rig, plan, launch, progress, cacheDir);
    const jobs = [...workerJobs(rig, plan, samples, progress), ...inProcessJobs(rig, plan, samples, progress), hopJob(rig, plan, samples, progress)];
    for (let r = 0; r < plan.rounds; r++) {
      progress.phase(`[round ${r + 1}/${plan.rounds}] ${jobs.length} measurements, interleaved`);
      const shift = (r * Math.ceil(jobs.length / plan.rounds)) % jobs.length; // a different order each round
      for (const job of [...jobs.slice(shift), ...jobs.slice(0, shift)]) await job.run();
    }
  } finally {
    for (const ws of rig.clusters.values()) await ws.close().catch(() => {});
    for (const p of rig.inprocess.values()) await p.close().catch(() => {});
    for (const b of rig.bandwidth.values()) await b.close().catch(() => {});
    for (const p of [...rig.ortStream.values(), ...rig.ortLinears.values()]) await p.close().catch(() => {});
  }
  return samples;
}

/** Fills the rig as it opens, so that whatever opened before a failure is still closed. */
async function openRig(rig: Rig, plan: SuitePlan, launch: ClusterLauncher, progress: Progress, cacheDir?: string): Promise<void> {
  const { model, inprocThreads } = plan;
  const groups = [...new Set(plan.wants.map(keyOf))];
  for (const [i, key] of groups.entries()) {
    const w = plan.wants.find((x) => keyOf(x) === key)!;
    progress.phase(`[setup ${i + 1}/${groups.length + 1}] K=${w.k}, --threads ${w.threads}, --max-batch ${w.maxBatch}`);
    rig.clusters.set(key, await openWorkers(launch, model, { k: w.k, threads: w.threads, maxBatch: w.maxBatch }, progress));
  }
  progress.phase(`[setup ${groups.length + 1}/${groups.length + 1}] in-process pipeline (no gRPC), 1 stage × ${inprocThreads.join(' and ')} thread(s)`);
  for (const t of inprocThreads) rig.inprocess.set(t, await LocalPipeline.load(model.dir, [{ first: 0, last: model.spec.blocks }], { threads: t }));
  for (const t of inprocThreads) rig.bandwidth.set(t, await BandwidthProbe.open({ threads: t }));
  for (const t of inprocThreads) rig.ortStream.set(t, await OrtStreamProbe.open(t, cacheDir));
  for (const t of inprocThreads) rig.ortLinears.set(t, await OrtStreamProbe.open(t, cacheDir, model.spec));
}

/** One job per worker configuration: a workload through its cluster. */
function workerJobs(rig: Rig, plan: SuitePlan, samples: Samples, progress: Progress): Job[] {
  return plan.wants.map((w) => ({
    id: w.id,
    run: async () => {
      const ws = rig.clusters.get(keyOf(w))!;
      const m = await measure(ws.pipeline, ws.config(w.label), plan.model, w.kind === 'single' ? plan.single : plan.agg, progress, { collector: ws.collector, stages: ws.stages });
      append(samples.measured, w.id, m);
      progress.phase(`  ${w.label}: ${fmt(m.result.decodeTokensPerSec, 1)} decode tok/s, ITL p50 ${fmt(m.result.itlMs.p50)} ms`);
    },
  }));
}

/** Per thread count: one request through the in-process pipeline, and the three weight-read floors. */
function inProcessJobs(rig: Rig, plan: SuitePlan, samples: Samples, progress: Progress): Job[] {
  const { model } = plan;
  return plan.inprocThreads.flatMap((t): Job[] => [
    {
      id: `inprocess-t${t}`,
      run: async () => {
        const m = await measure(rig.inprocess.get(t)!, { label: `in-process, 1 stage, ${t} thread(s)`, mode: 'in-process', workers: 1, threadsPerWorker: t, maxBatch: null, ranges: [{ first: 0, last: model.spec.blocks }] }, model, plan.single, progress);
        append(samples.measured, `inprocess-t${t}`, m);
        progress.phase(`  in-process, ${t} thread(s): ITL p50 ${fmt(m.result.itlMs.p50)} ms`);
      },
    },
    {
      id: `bandwidth-t${t}`,
      run: async () => {
        const b = await rig.bandwidth.get(t)!.measure(3);
        append(samples.bandwidth, t, b);
        progress.phase(`  read bandwidth, ${t} thread(s): ${fmt(b.readBytesPerSec / 1e9, 1)} GB/s`);
        const s = await rig.ortStream.get(t)!.measure(3);
        append(samples.ortStream, t, s);
        progress.phase(`  ONNX Runtime weight streaming, ${t} thread(s): ${fmt(s.bytesPerSec / 1e9, 1)} GB/s`);
        const l = await rig.ortLinears.get(t)!.measure(3);
        append(samples.ortLinears, t, l);
        progress.phase(`  the model's linear layers alone, ${t} thread(s): ${fmt(Math.min(...l.trialsMs))} ms (${fmt(l.bytesPerSec / 1e9, 1)} GB/s)`);
      },
    },
  ]);
}

/** One hop of a prefill-sized tensor and of one decode step's hidden state: gRPC to a worker vs raw TCP. */
function hopJob(rig: Rig, plan: SuitePlan, samples: Samples, progress: Progress): Job {
  const { hopDims, hopBytes, model } = plan;
  const pingTarget = rig.clusters.get(`1|${plan.all}|8`) ?? [...rig.clusters.values()][0];
  return {
    id: 'hop',
    run: async () => {
      samples.grpc.push(...(await probeGrpcHop(pingTarget.cluster.workers[0].address, hopDims, 5)).trialsMs);
      samples.tcp.push(...(await probeTcpHop(hopBytes, 'process', 5)).trialsMs);
      samples.tcpSame.push(...(await probeTcpHop(hopBytes, 'same', 5)).trialsMs);
      // What one decode step moves per hop: one token's hidden state.
      samples.smallGrpc.push(...(await probeGrpcHop(pingTarget.cluster.workers[0].address, [1, 1, model.spec.dModel], 9)).trialsMs);
      samples.smallTcp.push(...(await probeTcpHop(model.spec.dModel * 4, 'process', 9)).trialsMs);
      progress.phase(`  one ${fmtBytes(hopBytes)} hop: gRPC ${fmt(median(samples.grpc), 1)} ms, TCP ${fmt(median(samples.tcp), 1)} ms (medians so far)`);
    },
  };
}

/** The rounds merged: each configuration's median round, each floor's best round, each hop's trials together. */
export interface SuiteResults {
  runs: Record<string, RunResult>;
  timeline: TimelineSection[];
  /** The in-process runs by thread count. */
  inproc: Record<number, RunResult>;
  bandwidth: BandwidthResult[];
  ortStream: OrtStreamResult[];
  ortLinears: OrtStreamResult[];
  grpc: HopProbe;
  tcpProcess: HopProbe;
  tcpSameProcess: HopProbe;
  smallGrpc: number[];
  smallTcp: number[];
}

export function suiteResults(plan: SuitePlan, samples: Samples): SuiteResults {
  const { inprocThreads } = plan;
  const runs: Record<string, RunResult> = {};
  const timeline: TimelineSection[] = [];
  for (const w of plan.wants) {
    const m = mergeRounds(samples.measured.get(w.id)!);
    runs[w.id] = m.result;
    if (m.timeline) timeline.push(m.timeline);
  }
  const inproc: Record<number, RunResult> = {};
  for (const t of inprocThreads) inproc[t] = runs[`inprocess-t${t}`] = mergeRounds(samples.measured.get(`inprocess-t${t}`)!).result;
  const best = (list: BandwidthResult[]): BandwidthResult => ({
    threads: list[0].threads, bytes: list[0].bytes,
    readBytesPerSec: Math.max(...list.map((b) => b.readBytesPerSec)), copyBytesPerSec: Math.max(...list.map((b) => b.copyBytesPerSec)),
    readTrialsMs: list.flatMap((b) => b.readTrialsMs), copyTrialsMs: list.flatMap((b) => b.copyTrialsMs),
  });
  const bestOf = (rounds: Map<number, OrtStreamResult[]>) => inprocThreads.map((t): OrtStreamResult => {
    const list = rounds.get(t)!;
    return { threads: t, bytes: list[0].bytes, bytesPerSec: Math.max(...list.map((r) => r.bytesPerSec)), trialsMs: list.flatMap((r) => r.trialsMs) };
  });
  const probe = (trialsMs: number[]): HopProbe => ({ bytes: plan.hopBytes, trialsMs, medianMs: median(trialsMs) });
  return {
    runs, timeline, inproc,
    bandwidth: inprocThreads.map((t) => best(samples.bandwidth.get(t)!)),
    ortStream: bestOf(samples.ortStream),
    ortLinears: bestOf(samples.ortLinears),
    grpc: probe(samples.grpc),
    tcpProcess: probe(samples.tcp),
    tcpSameProcess: probe(samples.tcpSame),
    smallGrpc: samples.smallGrpc,
    smallTcp: samples.smallTcp,
  };
}
