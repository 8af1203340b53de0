import { BandwidthProbe, type BandwidthResult } from './bandwidth.ts';
import { OrtStreamProbe, type OrtStreamResult } from './ort-stream.ts';
import { resolveShape, type ShapeFlags } from './model.ts';
import { machineInfo, renderRunTable } from './pipeline.ts';
import type { Progress } from './progress.ts';
import { fmt, fmtBytes, table } from './report.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { cores, defaultThreads, measure, mergeRounds, openWorkers, plannedRanges, prebuildStages, prepareModel, type BenchModel, type ClusterLauncher, type Measured, type RunResult, type WorkerSession, type WorkloadParams } from './runner.ts';
import { median, ratio } from './stats.ts';
import type { TimelineSection } from './timeline.ts';
import { probeGrpcHop, probeTcpHop, type HopProbe } from './transport.ts';

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

export interface SuiteEntry {
  id: string;
  figure: string;
  value: number;
  unit: string;
  baseline: number;
  baselineLabel: string;
  /** value / baseline (for overheads: overhead / baseline time). */
  ratio: number;
  target: { op: '>=' | '<='; ratio: number } | null;
  pass: boolean | null;
  settings: string;
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

interface Want {
  id: string;
  k: number;
  threads: number;
  maxBatch: number;
  kind: 'single' | 'agg';
  label: string;
}

/** `strata bench --suite all`: every figure the issues ask for, each against a baseline measured in this run. */
export async function runSuite(o: SuiteOptions, launch: ClusterLauncher, progress: Progress): Promise<{ report: SuiteReport; timeline: TimelineSection[] }> {
  const t0 = Date.now();
  const startedAt = new Date().toISOString();
  const shape = resolveShape(o);
  const model = prepareModel(shape, progress, o.cacheDir);
  const nCores = cores();
  const all = nCores; // one request: one stage active at a time, so each stage may use every core
  const ks = [1, 2, 4].filter((k) => k <= model.spec.blocks);
  prebuildStages(model, ks.flatMap((k) => plannedRanges(model.spec, k)), progress, o.cacheDir);
  const N = o.concurrency;
  const single: WorkloadParams = { concurrency: 1, promptTokens: o.promptTokens, newTokens: o.newTokens, seed: o.seed, repeats: 2 };
  const agg: WorkloadParams = { concurrency: N, promptTokens: o.promptTokens, newTokens: o.newTokens, seed: o.seed };

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
  const unique = wants.filter((w, i) => wants.findIndex((x) => x.id === w.id) === i);
  const hopDims = o.hopDims ?? [1, 1024, 4096];
  const hopBytes = hopDims.reduce((a, b) => a * b, 4);
  const inprocThreads = [...new Set([1, all])];
  const rounds = Math.max(1, o.repeats);

  // Every configuration stays up for the whole suite, and the rounds interleave them, so each figure and its
  // baseline see the same (shared, noisy) machine. Idle workers cost nothing: no ORT runs, a keepalive ping.
  const clusters = new Map<string, WorkerSession & { close(): Promise<void> }>();
  const inprocess = new Map<number, LocalPipeline>();
  const bwProbes = new Map<number, BandwidthProbe>();
  const ortProbes = new Map<number, OrtStreamProbe>();
  const ortRounds = new Map<number, OrtStreamResult[]>();
  const linProbes = new Map<number, OrtStreamProbe>();
  const linRounds = new Map<number, OrtStreamResult[]>();
  const smallGrpc: number[] = [];
  const smallTcp: number[] = [];
  const measured = new Map<string, Measured[]>();
  const grpcTrials: number[] = [];
  const tcpTrials: number[] = [];
  const tcpSameTrials: number[] = [];
  const bwRounds = new Map<number, BandwidthResult[]>();
  try {
    const keyOf = (w: Want) => `${w.k}|${w.threads}|${w.maxBatch}`;
    const groups = [...new Set(unique.map(keyOf))];
    for (const [i, key] of groups.entries()) {
      const w = unique.find((x) => keyOf(x) === key)!;
      progress.phase(`[setup ${i + 1}/${groups.length + 1}] K=${w.k}, --threads ${w.threads}, --max-batch ${w.maxBatch}`);
      clusters.set(key, await openWorkers(launch, model, { k: w.k, threads: w.threads, maxBatch: w.maxBatch }, progress));
    }
    progress.phase(`[setup ${groups.length + 1}/${groups.length + 1}] in-process pipeline (no gRPC), 1 stage × ${inprocThreads.join(' and ')} thread(s)`);
    for (const t of inprocThreads) inprocess.set(t, await LocalPipeline.load(model.dir, [{ first: 0, last: model.spec.blocks }], { threads: t }));
    for (const t of inprocThreads) bwProbes.set(t, await BandwidthProbe.open({ threads: t }));
    for (const t of inprocThreads) ortProbes.set(t, await OrtStreamProbe.open(t, o.cacheDir));
    for (const t of inprocThreads) linProbes.set(t, await OrtStreamProbe.open(t, o.cacheDir, model.spec));

    type Job = { id: string; run: () => Promise<void> };
    const record = (id: string, m: Measured) => measured.set(id, [...(measured.get(id) ?? []), m]);
    const jobs: Job[] = unique.map((w) => ({
      id: w.id,
      run: async () => {
        const ws = clusters.get(keyOf(w))!;
        const m = await measure(ws.pipeline, ws.config(w.label), model, w.kind === 'single' ? single : agg, progress, { collector: ws.collector, stages: ws.stages });
        record(w.id, m);
        progress.phase(`  ${w.label}: ${fmt(m.result.decodeTokensPerSec, 1)} decode tok/s, ITL p50 ${fmt(m.result.itlMs.p50)} ms`);
      },
    }));
    for (const t of inprocThreads) {
      jobs.push({
        id: `inprocess-t${t}`,
        run: async () => {
          const m = await measure(inprocess.get(t)!, { label: `in-process, 1 stage, ${t} thread(s)`, mode: 'in-process', workers: 1, threadsPerWorker: t, maxBatch: null, ranges: [{ first: 0, last: model.spec.blocks }] }, model, single, progress);
          record(`inprocess-t${t}`, m);
          progress.phase(`  in-process, ${t} thread(s): ITL p50 ${fmt(m.result.itlMs.p50)} ms`);
        },
      });
      jobs.push({
        id: `bandwidth-t${t}`,
        run: async () => {
          const b = await bwProbes.get(t)!.measure(3);
          bwRounds.set(t, [...(bwRounds.get(t) ?? []), b]);
          progress.phase(`  read bandwidth, ${t} thread(s): ${fmt(b.readBytesPerSec / 1e9, 1)} GB/s`);
          const s = await ortProbes.get(t)!.measure(3);
          ortRounds.set(t, [...(ortRounds.get(t) ?? []), s]);
          progress.phase(`  ONNX Runtime weight streaming, ${t} thread(s): ${fmt(s.bytesPerSec / 1e9, 1)} GB/s`);
          const l = await linProbes.get(t)!.measure(3);
          linRounds.set(t, [...(linRounds.get(t) ?? []), l]);
          progress.phase(`  the model's linear layers alone, ${t} thread(s): ${fmt(Math.min(...l.trialsMs))} ms (${fmt(l.bytesPerSec / 1e9, 1)} GB/s)`);
        },
      });
    }
    const pingTarget = clusters.get(`1|${all}|8`) ?? [...clusters.values()][0];
    jobs.push({
      id: 'hop',
      run: async () => {
        grpcTrials.push(...(await probeGrpcHop(pingTarget.cluster.workers[0].address, hopDims, 5)).trialsMs);
        tcpTrials.push(...(await probeTcpHop(hopBytes, 'process', 5)).trialsMs);
        tcpSameTrials.push(...(await probeTcpHop(hopBytes, 'same', 5)).trialsMs);
        // What one decode step moves per hop: one token's hidden state.
        smallGrpc.push(...(await probeGrpcHop(pingTarget.cluster.workers[0].address, [1, 1, model.spec.dModel], 9)).trialsMs);
        smallTcp.push(...(await probeTcpHop(model.spec.dModel * 4, 'process', 9)).trialsMs);
        progress.phase(`  one ${fmtBytes(hopBytes)} hop: gRPC ${fmt(median(grpcTrials), 1)} ms, TCP ${fmt(median(tcpTrials), 1)} ms (medians so far)`);
      },
    });
    for (let r = 0; r < rounds; r++) {
      progress.phase(`[round ${r + 1}/${rounds}] ${jobs.length} measurements, interleaved`);
      const shift = (r * Math.ceil(jobs.length / rounds)) % jobs.length; // a different order each round
      for (const job of [...jobs.slice(shift), ...jobs.slice(0, shift)]) await job.run();
    }
  } finally {
    for (const ws of clusters.values()) await ws.close().catch(() => {});
    for (const p of inprocess.values()) await p.close().catch(() => {});
    for (const b of bwProbes.values()) await b.close().catch(() => {});
    for (const p of [...ortProbes.values(), ...linProbes.values()]) await p.close().catch(() => {});
  }

  const runs: Record<string, RunResult> = {};
  const timeline: TimelineSection[] = [];
  for (const w of unique) {
    const m = mergeRounds(measured.get(w.id)!);
    runs[w.id] = m.result;
    if (m.timeline) timeline.push(m.timeline);
  }
  const inproc: Record<number, RunResult> = {};
  for (const t of inprocThreads) inproc[t] = runs[`inprocess-t${t}`] = mergeRounds(measured.get(`inprocess-t${t}`)!).result;
  const best = (list: BandwidthResult[]): BandwidthResult => ({
    threads: list[0].threads, bytes: list[0].bytes,
    readBytesPerSec: Math.max(...list.map((b) => b.readBytesPerSec)), copyBytesPerSec: Math.max(...list.map((b) => b.copyBytesPerSec)),
    readTrialsMs: list.flatMap((b) => b.readTrialsMs), copyTrialsMs: list.flatMap((b) => b.copyTrialsMs),
  });
  const bandwidth = inprocThreads.map((t) => best(bwRounds.get(t)!));
  const bestOf = (rounds: Map<number, OrtStreamResult[]>) => inprocThreads.map((t): OrtStreamResult => {
    const list = rounds.get(t)!;
    return { threads: t, bytes: list[0].bytes, bytesPerSec: Math.max(...list.map((r) => r.bytesPerSec)), trialsMs: list.flatMap((r) => r.trialsMs) };
  });
  const ortStream = bestOf(ortRounds);
  const ortLinears = bestOf(linRounds);
  const probe = (trialsMs: number[]): HopProbe => ({ bytes: hopBytes, trialsMs, medianMs: median(trialsMs) });
  const grpc = probe(grpcTrials);
  const tcpProcess = probe(tcpTrials);
  const tcpSameProcess = probe(tcpSameTrials);

  // ---- the figures
  const entries: SuiteEntry[] = [];
  const entry = (e: Omit<SuiteEntry, 'ratio' | 'pass'> & { ratio?: number }) => {
    const r = e.ratio ?? ratio(e.value, e.baseline);
    const pass = e.target ? (e.target.op === '>=' ? r >= e.target.ratio : r <= e.target.ratio) : null;
    entries.push({ ...e, ratio: r, pass: Number.isFinite(r) ? pass : e.target ? false : null });
  };
  const s1 = runs[`single-k1-t${all}`];
  for (const k of ks.filter((k) => k > 1)) {
    const sk = runs[`single-k${k}-t${all}`];
    entry({ id: `1.single.k${k}`, figure: `1 request tokens/s, K=${k} vs K=1`, value: sk.decodeTokensPerSec, unit: 'tok/s', baseline: s1.decodeTokensPerSec, baselineLabel: 'K=1', target: null, settings: `${all} thread(s) per worker for every K (one stage active at a time)` });
  }
  const a1 = runs[`agg-k1-t${defaultThreads(1)}`];
  for (const k of ks.filter((k) => k > 1)) {
    const ak = runs[`agg-k${k}-t${defaultThreads(k)}`];
    entry({ id: `1.agg.k${k}`, figure: `${N} concurrent, aggregate decode tok/s, K=${k} vs K=1`, value: ak.decodeTokensPerSec, unit: 'tok/s', baseline: a1.decodeTokensPerSec, baselineLabel: 'K=1', target: null, settings: `floor(${nCores} cores / K) threads per worker: K=1 ${defaultThreads(1)}, K=${k} ${defaultThreads(k)}; --max-batch 8` });
  }
  for (const k of ks.filter((k) => k > 1)) {
    const sk = runs[`single-k${k}-t${all}`];
    const overhead = (sk.msPerToken - s1.msPerToken) / (k - 1);
    entry({ id: `1.hop.k${k}`, figure: `per-hop overhead, ms per token per hop (K=${k})`, value: overhead, unit: 'ms', baseline: s1.msPerToken, baselineLabel: 'K=1 ms/token', target: null, settings: '(t_K − t_1)/(K−1); ratio = overhead / t_1' });
  }
  {
    const gp = grpc;
    entry({ id: '2.hop16', figure: `one ${fmtBytes(hopBytes)} hop: gRPC Ping vs raw loopback TCP (median ms)`, value: gp.medianMs, unit: 'ms', baseline: tcpProcess.medianMs, baselineLabel: 'TCP to a node process', target: null, settings: `${gp.trialsMs.length} trials each; TCP within one process: ${fmt(tcpSameProcess.medianMs)} ms` });
  }
  entry({ id: '2.hop.decode', figure: `one decode-step hop (${fmtBytes(model.spec.dModel * 4)}): gRPC Ping vs raw TCP (median ms)`, value: median(smallGrpc), unit: 'ms', baseline: median(smallTcp), baselineLabel: 'TCP to a node process', target: null, settings: `${smallGrpc.length} trials each: the transport floor of a per-hop decode cost` });
  if (runs['agg-k2-t1']) {
    entry({ id: '3.pipe2', figure: `K=2 × 1 thread vs 1 worker × 1 thread, ${N} concurrent decode tok/s`, value: runs['agg-k2-t1'].decodeTokensPerSec, unit: 'tok/s', baseline: runs['agg-k1-t1'].decodeTokensPerSec, baselineLabel: '1 worker, 1 thread', target: { op: '>=', ratio: 1.6 }, settings: '--max-batch 8 on every worker' });
  }
  if (runs['agg-k2-t1']?.stages.length === 2 && runs['agg-k1-t1']?.stages.length === 1) {
    // What the stage run times measured in those two runs allow: K groups take turns, so the pipeline finishes N
    // tokens per K runs of its slowest stage; one worker finishes them in one run of its (larger) group.
    const pipe = runs['agg-k2-t1'].stages;
    const slowest = Math.max(...pipe.map((st) => st.groupRunMs));
    const one = runs['agg-k1-t1'].stages[0];
    const bound = (N / (2 * slowest)) * 1000;
    const oneBound = (one.groupSize / one.groupRunMs) * 1000;
    entry({ id: '3.pipe2.bound', figure: '  bound from the measured stage runs: K=2 vs 1 worker', value: bound, unit: 'tok/s', baseline: oneBound, baselineLabel: `${one.groupSize} per ${fmt(one.groupRunMs)} ms run`, target: null, settings: `K=2: ${N} tokens per 2 runs of the slowest stage (runs of ${pipe.map((st) => `${st.groupSize} in ${fmt(st.groupRunMs)} ms`).join(', ')}); 1 worker: ${one.groupSize} tokens per run` });
  }
  const pipeCpu = runs['agg-k2-t1']?.cpu;
  if (pipeCpu && runs['agg-k1-t1']) {
    const c = pipeCpu;
    const split = [c.coordinator, ...c.stages].map((x, i) => `${i ? `stage ${i - 1}` : 'coordinator'} ${fmt(x.eventLoopMs / 1000)}+${fmt(x.otherMs / 1000)} s`).join(', ');
    entry({ id: '3.pipe2.cpu', figure: '  bound from the CPU it used: K=2 vs 1 worker (e2e)', value: c.boundTokensPerSec, unit: 'tok/s', baseline: runs['agg-k1-t1'].tokensPerSec, baselineLabel: '1 worker, 1 thread (e2e)', target: null, settings: `K=2 used ${fmt(c.totalMs / 1000)} s of CPU (event loop + other threads: ${split}); spread perfectly over ${nCores} cores it could not have taken less than ${fmt(c.totalMs / 1000 / nCores)} s` });
  }
  if (ks.includes(4)) {
    entry({ id: '4.k4', figure: `1 request tokens/s, K=4 vs K=1 (${all} threads per stage)`, value: runs[`single-k4-t${all}`].decodeTokensPerSec, unit: 'tok/s', baseline: s1.decodeTokensPerSec, baselineLabel: 'K=1', target: { op: '>=', ratio: 0.85 }, settings: `every worker --threads ${all} (the one active stage has all cores)` });
    if (all !== 1) {
      entry({ id: '4.k4.t1', figure: '1 request tokens/s, K=4 vs K=1 (1 thread per stage)', value: runs['single-k4-t1'].decodeTokensPerSec, unit: 'tok/s', baseline: runs['single-k1-t1'].decodeTokensPerSec, baselineLabel: 'K=1', target: { op: '>=', ratio: 0.85 }, settings: 'every worker --threads 1' });
    }
  }
  entry({ id: '5.batch8', figure: `${N} sessions on one stage: --max-batch 8 vs --max-batch 1, decode tok/s`, value: a1.decodeTokensPerSec, unit: 'tok/s', baseline: runs[`agg-k1-t${all}-b1`].decodeTokensPerSec, baselineLabel: '--max-batch 1', target: { op: '>=', ratio: 4 }, settings: `1 worker, all blocks, ${all} thread(s), ${N} concurrent requests` });
  if (runs['agg-k1-t1-b1'] && all !== 1) {
    entry({ id: '5.batch8.t1', figure: `${N} sessions on one stage: --max-batch 8 vs --max-batch 1, 1 thread`, value: runs['agg-k1-t1'].decodeTokensPerSec, unit: 'tok/s', baseline: runs['agg-k1-t1-b1'].decodeTokensPerSec, baselineLabel: '--max-batch 1', target: { op: '>=', ratio: 4 }, settings: `1 worker, all blocks, 1 thread, ${N} concurrent requests` });
  }
  const readBytes = model.weights.readPerStep;
  for (const bw of bandwidth) {
    const floorMs = (readBytes / bw.readBytesPerSec) * 1000;
    const step = inproc[bw.threads].itlMs.p50;
    entry({ id: `6.floor.t${bw.threads}`, figure: `decode step vs weight-read floor, batch 1, ${bw.threads} thread(s) (in-process)`, value: step, unit: 'ms', baseline: floorMs, baselineLabel: `${fmtBytes(readBytes)} / ${fmt(bw.readBytesPerSec / 1e9, 1)} GB/s`, target: { op: '<=', ratio: 1.25 }, settings: `ITL p50 of LocalPipeline; read bandwidth: ${bw.threads}-thread memchr scan of 512 MiB, best of ${bw.readTrialsMs.length} (copy: ${fmt(bw.copyBytesPerSec / 1e9, 1)} GB/s r+w)` });
    const ort = ortStream.find((r) => r.threads === bw.threads)!;
    entry({ id: `6.floor.t${bw.threads}.ort`, figure: `  same vs ONNX Runtime's own weight-streaming floor`, value: step, unit: 'ms', baseline: (readBytes / ort.bytesPerSec) * 1000, baselineLabel: `${fmtBytes(readBytes)} / ${fmt(ort.bytesPerSec / 1e9, 1)} GB/s`, target: null, settings: `a chain of batch-1 MatMuls over ${fmtBytes(ort.bytes)} of weights, ${bw.threads} thread(s), best of ${ort.trialsMs.length}: the stricter floor` });
    const lin = ortLinears.find((r) => r.threads === bw.threads)!;
    entry({ id: `6.floor.t${bw.threads}.linears`, figure: `  same vs the model's linear layers alone`, value: step, unit: 'ms', baseline: (lin.bytes / lin.bytesPerSec) * 1000, baselineLabel: `${fmtBytes(lin.bytes)} at ${fmt(lin.bytesPerSec / 1e9, 1)} GB/s`, target: null, settings: `the ${model.spec.blocks * 4 + 1} batch-1 Gemms of this model's shapes and nothing else, ${bw.threads} thread(s), best of ${lin.trialsMs.length}: what the rest of the step adds` });
    const viaWorker = runs[`single-k1-t${bw.threads}`];
    if (viaWorker) entry({ id: `6.floor.t${bw.threads}.worker`, figure: `  same through 1 worker over gRPC, ${bw.threads} thread(s)`, value: viaWorker.itlMs.p50, unit: 'ms', baseline: floorMs, baselineLabel: 'floor', target: null, settings: 'ITL p50, includes the coordinator round trip' });
  }

  const report: SuiteReport = {
    suite: 'all', startedAt, wallSeconds: (Date.now() - t0) / 1000, machine: machineInfo(),
    model: { shape, dir: model.dir, fingerprint: model.fingerprint, weightBytes: model.weights.held, weightBytesReadPerDecodeStep: readBytes, blockBytes: model.weights.blocks, headBytes: model.weights.head },
    workload: { concurrency: N, promptTokens: o.promptTokens, newTokens: o.newTokens, repeats: o.repeats, seed: o.seed },
    entries, runs,
    probes: { grpc, tcpProcess, tcpSameProcess, grpcDecodeStep: { bytes: model.spec.dModel * 4, trialsMs: smallGrpc, medianMs: median(smallGrpc) }, tcpDecodeStep: { bytes: model.spec.dModel * 4, trialsMs: smallTcp, medianMs: median(smallTcp) } },
    bandwidth, ortStream, ortLinears,
    notes: [
      'every ratio is against a baseline measured in this same run (shared, noisy machine)',
      'tokens/s = decode tokens/s: for one request (M−1)/(t_last − t_first); for N concurrent, tokens chosen while all N were decoding / that window; each the median over interleaved rounds (one-request runs: 2 requests per round)',
      'all configurations run side by side (idle workers stay up) and every round measures each once, in a rotated order',
      `weight-read floor: block weights (${fmtBytes(model.weights.blocks)}) + LM head (${fmtBytes(model.weights.head)}) + embedding rows, per step`,
    ],
  };
  return { report, timeline };
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
