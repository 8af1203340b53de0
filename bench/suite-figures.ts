import { fmt, fmtBytes } from './report.ts';
import { defaultThreads } from './runner.ts';
import { median, ratio } from './stats.ts';
import type { SuitePlan, SuiteResults } from './suite-measure.ts';

// The figures of `strata bench --suite all`, one function per group (numbered as the issues number them), each
// value against a baseline measured in the same run.

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

type Entry = (e: Omit<SuiteEntry, 'ratio' | 'pass'> & { ratio?: number }) => void;

export function suiteFigures(plan: SuitePlan, res: SuiteResults): SuiteEntry[] {
  const entries: SuiteEntry[] = [];
  const entry: Entry = (e) => {
    const r = e.ratio ?? ratio(e.value, e.baseline);
    const pass = e.target ? (e.target.op === '>=' ? r >= e.target.ratio : r <= e.target.ratio) : null;
    entries.push({ ...e, ratio: r, pass: Number.isFinite(r) ? pass : e.target ? false : null });
  };
  for (const group of [stageCountFigures, transportFigures, pipeliningFigures, deepPipelineFigures, batchingFigures, floorFigures]) group(plan, res, entry);
  return entries;
}

/** 1: one request and N concurrent at K stages vs K=1, and the per-hop overhead. */
function stageCountFigures({ ks, all, N, nCores }: SuitePlan, { runs }: SuiteResults, entry: Entry): void {
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
}

/** 2: one hop over gRPC vs raw loopback TCP, prefill-sized and decode-sized. */
function transportFigures({ hopBytes, model }: SuitePlan, { grpc: gp, tcpProcess, tcpSameProcess, smallGrpc, smallTcp }: SuiteResults, entry: Entry): void {
  entry({ id: '2.hop16', figure: `one ${fmtBytes(hopBytes)} hop: gRPC Ping vs raw loopback TCP (median ms)`, value: gp.medianMs, unit: 'ms', baseline: tcpProcess.medianMs, baselineLabel: 'TCP to a node process', target: null, settings: `${gp.trialsMs.length} trials each; TCP within one process: ${fmt(tcpSameProcess.medianMs)} ms` });
  entry({ id: '2.hop.decode', figure: `one decode-step hop (${fmtBytes(model.spec.dModel * 4)}): gRPC Ping vs raw TCP (median ms)`, value: median(smallGrpc), unit: 'ms', baseline: median(smallTcp), baselineLabel: 'TCP to a node process', target: null, settings: `${smallGrpc.length} trials each: the transport floor of a per-hop decode cost` });
}

/** 3: two 1-thread stages vs one 1-thread worker under N concurrent, and what the stage runs and the CPU allow. */
function pipeliningFigures({ N, nCores }: SuitePlan, { runs }: SuiteResults, entry: Entry): void {
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
  const c = runs['agg-k2-t1']?.cpu;
  if (c && runs['agg-k1-t1']) {
    const split = [c.coordinator, ...c.stages].map((x, i) => `${i ? `stage ${i - 1}` : 'coordinator'} ${fmt(x.eventLoopMs / 1000)}+${fmt(x.otherMs / 1000)} s`).join(', ');
    entry({ id: '3.pipe2.cpu', figure: '  bound from the CPU it used: K=2 vs 1 worker (e2e)', value: c.boundTokensPerSec, unit: 'tok/s', baseline: runs['agg-k1-t1'].tokensPerSec, baselineLabel: '1 worker, 1 thread (e2e)', target: null, settings: `K=2 used ${fmt(c.totalMs / 1000)} s of CPU (event loop + other threads: ${split}); spread perfectly over ${nCores} cores it could not have taken less than ${fmt(c.totalMs / 1000 / nCores)} s` });
  }
}

/** 4: one request through four stages vs one, with all cores and with one thread per stage. */
function deepPipelineFigures({ ks, all }: SuitePlan, { runs }: SuiteResults, entry: Entry): void {
  if (!ks.includes(4)) return;
  const s1 = runs[`single-k1-t${all}`];
  entry({ id: '4.k4', figure: `1 request tokens/s, K=4 vs K=1 (${all} threads per stage)`, value: runs[`single-k4-t${all}`].decodeTokensPerSec, unit: 'tok/s', baseline: s1.decodeTokensPerSec, baselineLabel: 'K=1', target: { op: '>=', ratio: 0.85 }, settings: `every worker --threads ${all} (the one active stage has all cores)` });
  if (all !== 1) {
    entry({ id: '4.k4.t1', figure: '1 request tokens/s, K=4 vs K=1 (1 thread per stage)', value: runs['single-k4-t1'].decodeTokensPerSec, unit: 'tok/s', baseline: runs['single-k1-t1'].decodeTokensPerSec, baselineLabel: 'K=1', target: { op: '>=', ratio: 0.85 }, settings: 'every worker --threads 1' });
  }
}

/** 5: N sessions batched into one run (--max-batch 8) vs one run each (--max-batch 1). */
function batchingFigures({ all, N }: SuitePlan, { runs }: SuiteResults, entry: Entry): void {
  const a1 = runs[`agg-k1-t${defaultThreads(1)}`];
  entry({ id: '5.batch8', figure: `${N} sessions on one stage: --max-batch 8 vs --max-batch 1, decode tok/s`, value: a1.decodeTokensPerSec, unit: 'tok/s', baseline: runs[`agg-k1-t${all}-b1`].decodeTokensPerSec, baselineLabel: '--max-batch 1', target: { op: '>=', ratio: 4 }, settings: `1 worker, all blocks, ${all} thread(s), ${N} concurrent requests` });
  if (runs['agg-k1-t1-b1'] && all !== 1) {
    entry({ id: '5.batch8.t1', figure: `${N} sessions on one stage: --max-batch 8 vs --max-batch 1, 1 thread`, value: runs['agg-k1-t1'].decodeTokensPerSec, unit: 'tok/s', baseline: runs['agg-k1-t1-b1'].decodeTokensPerSec, baselineLabel: '--max-batch 1', target: { op: '>=', ratio: 4 }, settings: `1 worker, all blocks, 1 thread, ${N} concurrent requests` });
  }
}

/** 6: a batch-1 decode step vs the time to read its weights once (memory bandwidth, ORT's streaming, the linears). */
function floorFigures({ model }: SuitePlan, { runs, inproc, bandwidth, ortStream, ortLinears }: SuiteResults, entry: Entry): void {
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
}
