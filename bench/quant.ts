import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { loadModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { prepareStage } from '../model/stage-cache.ts';
import type { StageDType } from '../model/dtype.ts';
import { DEFAULT_DECODE_STEPS, RemotePipeline } from '../coordinator/remote-pipeline.ts';
import { resolveShape, weightBytes, type ShapeFlags } from './model.ts';
import type { Progress } from './progress.ts';
import { machineInfo } from './pipeline.ts';
import { measure, prepareModel, type BenchCluster, type BenchModel, type ClusterLauncher } from './runner.ts';
import { median, ratio } from './stats.ts';
import { procStatusBytes } from './cpu.ts';
import { LLAMA_WEIGHTS, runLlamaBench } from './llama.ts';
import { renderAccuracy, runQuantAccuracy, type AccuracyReport } from './quant-accuracy.ts';
import { measureLinearShare, type LinearShare } from './linear-share.ts';
import { isQuantized } from '../model/dtype.ts';
import { quantScheme } from '../model/quantize.ts';

/**
 * `strata bench --suite quant`: memory and decode speed of each stage dtype on one worker, the float32 graph
 * measured in the same run, and llama.cpp on the same weights when `--anchors` points at ../shared/anchors' scratch
 * folder (GGUF f32/q8_0/q4_0 of the checkpoint given by --model). Rounds interleave every engine and dtype; figures
 * are medians and ratios. Per dtype: the stage's weight bytes, the worker's RSS after the runs, batch-1 decode ms
 * per token, and the decode tokens/s of `--concurrency` sessions at once. In the same rounds, int8 runs twice more:
 * with one decode step per request instead of the coordinator's default chain (--decode-steps), and on a worker with
 * `--run-ahead off` (worker/run-ahead.ts): what each of the two gains. And each quantized dtype runs batch 1 once more
 * on a worker whose stage graph has one row (`--max-batch 1`), the configuration llama.cpp's batch-1 figure has (its
 * single mode is a context of one sequence); its `--max-batch` rows serve the concurrent sessions.
 */
export interface QuantBenchOptions extends ShapeFlags {
  model?: string;
  anchors?: string;
  threadsPerWorker?: number;
  concurrency: number;
  promptTokens: number;
  newTokens: number;
  maxBatch: number;
  repeats: number;
  seed: number;
  dtypes?: StageDType[];
  cacheDir?: string;
}

export interface QuantDTypeRow {
  dtype: StageDType;
  /** The worker ran each session's next decode step ahead of its request (the default). */
  runAhead: boolean;
  /** Decode steps per request (RemotePipeline.chainSteps; DEFAULT_DECODE_STEPS unless this row says otherwise). */
  decodeSteps: number;
  /**
   * The worker's stage graph rows (--max-batch). Below the suite's --max-batch: the one-row worker added for batch 1,
   * which runs batch 1 only (its aggregate is NaN, null in bench.json).
   */
  maxBatch: number;
  weightBytes: number;
  rssBytes: number;
  batch1MsPerToken: number;
  aggregateDecodeTokS: number;
  samples: { batch1MsPerToken: number[]; aggregateDecodeTokS: number[] };
}

export interface LlamaRow {
  weights: string;
  fileBytes: number;
  batch1MsPerToken: number;
  aggregateDecodeTokS: number;
  samples: { batch1MsPerToken: number[]; aggregateDecodeTokS: number[] };
}

export interface QuantBenchReport {
  suite: 'quant';
  startedAt: string;
  machine: ReturnType<typeof machineInfo>;
  model: { dir: string; fingerprint: string; float32WeightBytes: number };
  workload: { threads: number; concurrency: number; promptTokens: number; newTokens: number; rounds: number };
  rows: QuantDTypeRow[];
  llama: LlamaRow[];
  ratios: Record<string, number>;
  /** Each quantized dtype's batch-1 step in process, with and without its linear layers (bench/linear-share.ts). */
  linears: LinearShare[];
  accuracy: AccuracyReport | null;
}



const llamaBench = (anchors: string, weights: string, threads: number, args: string[]): Record<string, number> =>
  runLlamaBench(anchors, `gpt2-small-${weights}.gguf`, [String(threads), '3', '--new', '32', ...args]);

function modelFrom(dir: string): BenchModel {
  const spec = loadModelSpec(dir);
  const ck = Checkpoint.open(dir);
  const fingerprint = ck.fingerprint();
  ck.close();
  return { dir, spec, fingerprint, weights: weightBytes(spec), built: false, shape: { family: spec.family, blocks: spec.blocks, dModel: spec.dModel, heads: spec.heads, vocab: spec.vocab, maxPositions: spec.maxPositions } };
}

export async function runQuantBench(o: QuantBenchOptions, launch: ClusterLauncher, progress: Progress): Promise<QuantBenchReport> {
  const startedAt = new Date().toISOString();
  const model = o.model ? modelFrom(o.model) : prepareModel(resolveShape(o), progress, o.cacheDir);
  const dtypes = o.dtypes ?? ['float32', 'int8', 'int4'];
  const threads = o.threadsPerWorker ?? 2;
  const range = { first: 0, last: model.spec.blocks };
  const anchors = o.anchors && existsSync(join(o.anchors, 'llama_bench.mjs')) ? o.anchors : null;
  // One worker per dtype, all started up front (idle ones cost no CPU), so rounds can interleave them.
  const open: { dtype: StageDType; runAhead: boolean; maxBatch: number; weightBytes: number; cluster: BenchCluster; pipeline: RemotePipeline }[] = [];
  const oneRow = o.maxBatch > 1 ? dtypes.filter((d) => d === 'int8' || d === 'int4') : [];
  const workers = [
    ...dtypes.map((dtype) => ({ dtype, runAhead: true, maxBatch: o.maxBatch })),
    ...(dtypes.includes('int8') ? [{ dtype: 'int8' as const, runAhead: false, maxBatch: o.maxBatch }] : []),
    ...oneRow.map((dtype) => ({ dtype, runAhead: true, maxBatch: 1 })),
  ];
  try {
    for (const { dtype, runAhead, maxBatch } of workers) {
      const t0 = Date.now();
      const prepared = prepareStage(model.dir, range, { dtype, cacheDir: o.cacheDir, rows: maxBatch, onProgress: (m) => progress.phase(m) });
      if (prepared.built) progress.phase(`  ${dtype} stage built in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
      const cluster = await launch(model.dir, 1, ['--threads', String(threads), '--max-batch', String(maxBatch), '--run-ahead', runAhead ? 'on' : 'off']);
      const pipeline = await RemotePipeline.connect(cluster.workers.map((w) => w.address), { spec: model.spec, fingerprint: model.fingerprint, dtype, ranges: [range], decodeSteps: DEFAULT_DECODE_STEPS });
      open.push({ dtype, runAhead, maxBatch, weightBytes: prepared.paramBytes, cluster, pipeline });
    }
    // What is measured: every worker at the default chain, and the int8 worker (run-ahead on, --max-batch rows) at one
    // step per request.
    const variants = [...open.map((worker) => ({ worker, decodeSteps: DEFAULT_DECODE_STEPS })), ...open.filter((x) => x.dtype === 'int8' && x.runAhead && x.maxBatch === o.maxBatch).map((worker) => ({ worker, decodeSteps: 1 }))]
      .map((v) => ({ ...v, b1: [] as number[], agg: [] as number[] }));
    const llama = anchors ? dtypes.flatMap((d) => (LLAMA_WEIGHTS[d] ? [{ weights: LLAMA_WEIGHTS[d]!, b1: [] as number[], agg: [] as number[] }] : [])) : [];
    const w = { promptTokens: o.promptTokens, newTokens: o.newTokens, seed: o.seed };
    const strata = variants.map((s) => async () => {
      const { dtype, runAhead, maxBatch, pipeline } = s.worker;
      const name = rowName({ dtype, runAhead, decodeSteps: s.decodeSteps, maxBatch });
      pipeline.chainSteps = s.decodeSteps;
      const cfg = (label: string) => ({ label, mode: 'workers' as const, workers: 1, threadsPerWorker: threads, maxBatch, ranges: [range] });
      // A batch-1 sample is one 32-token request: the median of three per round steadies it on a noisy host.
      const one = await measure(pipeline, cfg(`${name} batch 1`), model, { ...w, concurrency: 1, repeats: 3 }, progress);
      s.b1.push(one.result.msPerToken);
      if (maxBatch < o.maxBatch) return; // the one-row worker added for batch 1: the suite's workers measure concurrency
      const many = await measure(pipeline, cfg(`${name} × ${o.concurrency}`), model, { ...w, concurrency: o.concurrency }, progress);
      s.agg.push(many.result.decodeTokensPerSec);
    });
    const anchorsRuns = llama.map((l) => async () => {
      l.b1.push(llamaBench(anchors!, l.weights, threads, []).decode_ms_per_token);
      l.agg.push(llamaBench(anchors!, l.weights, threads, ['--mode', 'multi', '--seqs', String(o.concurrency)]).aggregate_decode_tok_s);
    });
    // Odd rounds run the rows in reverse: a row measured right after the same worker's other row read ~4 % faster
    // (2026-12-02), and this way each row of such a pair comes second in half the rounds.
    const jobs = [...strata, ...anchorsRuns];
    for (let round = 0; round < o.repeats; round++) {
      progress.phase(`round ${round + 1}/${o.repeats}`);
      for (const job of round % 2 ? [...jobs].reverse() : jobs) await job();
    }
    const all: QuantDTypeRow[] = variants.map((s) => ({
      dtype: s.worker.dtype, runAhead: s.worker.runAhead, decodeSteps: s.decodeSteps, maxBatch: s.worker.maxBatch, weightBytes: s.worker.weightBytes, rssBytes: procStatusBytes(s.worker.cluster.workers[0].pid, 'VmRSS'),
      batch1MsPerToken: median(s.b1), aggregateDecodeTokS: s.agg.length ? median(s.agg) : NaN, samples: { batch1MsPerToken: s.b1, aggregateDecodeTokS: s.agg },
    }));
    const llamaRows: LlamaRow[] = llama.map((l) => ({
      weights: l.weights, fileBytes: statSync(join(anchors!, `gpt2-small-${l.weights}.gguf`)).size,
      batch1MsPerToken: median(l.b1), aggregateDecodeTokS: median(l.agg), samples: { batch1MsPerToken: l.b1, aggregateDecodeTokS: l.agg },
    }));
    const ratios: Record<string, number> = {};
    const rows = all.filter((r) => r.runAhead && r.decodeSteps === DEFAULT_DECODE_STEPS && r.maxBatch === o.maxBatch);
    for (const off of all.filter((r) => !r.runAhead)) {
      const on = rows.find((r) => r.dtype === off.dtype)!;
      ratios[`${off.dtype}.batch1RunAheadSpeedup`] = ratio(off.batch1MsPerToken, on.batch1MsPerToken);
      ratios[`${off.dtype}.aggregateRunAheadSpeedup`] = ratio(on.aggregateDecodeTokS, off.aggregateDecodeTokS);
    }
    for (const single of all.filter((r) => r.maxBatch < o.maxBatch)) {
      const main = rows.find((r) => r.dtype === single.dtype)!;
      ratios[`${single.dtype}.batch1OneRowSpeedup`] = ratio(main.batch1MsPerToken, single.batch1MsPerToken);
      const l = llamaRows.find((x) => x.weights === LLAMA_WEIGHTS[single.dtype]);
      if (l) ratios[`${single.dtype}.batch1OneRowVsLlama.${l.weights}`] = ratio(l.batch1MsPerToken, single.batch1MsPerToken);
    }
    for (const one of all.filter((r) => r.decodeSteps !== DEFAULT_DECODE_STEPS)) {
      const chained = rows.find((r) => r.dtype === one.dtype)!;
      ratios[`${one.dtype}.batch1ChainSpeedup`] = ratio(one.batch1MsPerToken, chained.batch1MsPerToken);
      ratios[`${one.dtype}.aggregateChainSpeedup`] = ratio(chained.aggregateDecodeTokS, one.aggregateDecodeTokS);
    }
    const f32 = rows.find((r) => r.dtype === 'float32');
    for (const r of rows) {
      if (f32 && r !== f32) {
        ratios[`${r.dtype}.weightBytesVsFloat32`] = ratio(r.weightBytes, f32.weightBytes);
        ratios[`${r.dtype}.rssVsFloat32`] = ratio(r.rssBytes, f32.rssBytes);
        ratios[`${r.dtype}.batch1SpeedupVsFloat32`] = ratio(f32.batch1MsPerToken, r.batch1MsPerToken);
        ratios[`${r.dtype}.aggregateVsFloat32`] = ratio(r.aggregateDecodeTokS, f32.aggregateDecodeTokS);
      }
      const l = llamaRows.find((x) => x.weights === LLAMA_WEIGHTS[r.dtype]);
      if (l) {
        // ≥ 1 means strata is at least as fast as llama.cpp on the same weights at the same bit width.
        ratios[`${r.dtype}.batch1VsLlama.${l.weights}`] = ratio(l.batch1MsPerToken, r.batch1MsPerToken);
        ratios[`${r.dtype}.aggregateVsLlama.${l.weights}`] = ratio(r.aggregateDecodeTokS, l.aggregateDecodeTokS);
      }
    }
    // What bounds batch 1: the linear layers' time inside the step, against llama.cpp's whole step at that width.
    const linears = dtypes.filter(isQuantized).map((d) => {
      progress.phase(`timing ${d}'s linear layers inside its one-row step`);
      // int8 also in blocks of 64 (STRATA_INT8_BLOCK=64), in the same rounds: what the option buys at batch 1.
      return measureLinearShare(model.dir, d, threads, Math.max(4, 2 * o.repeats), o.cacheDir, d === 'int8' && quantScheme('int8').blockSize !== 64 ? 64 : undefined);
    });
    for (const s of linears) {
      const l = llamaRows.find((x) => x.weights === LLAMA_WEIGHTS[s.dtype]);
      // < 1: the linear layers alone take longer than llama.cpp's whole step.
      if (l) ratios[`${s.dtype}.linearsAloneVsLlamaStep.${l.weights}`] = ratio(l.batch1MsPerToken, s.linearsMs);
      if (s.alt) ratios[`${s.dtype}.block${s.alt.blockSize}OneRowSpeedup`] = ratio(s.stepMs, s.alt.stepMs);
    }
    const accuracy = anchors && o.model ? await runQuantAccuracy({ model: o.model, anchors, threads, log: (m) => progress.phase(m) }) : null;
    return {
      suite: 'quant', startedAt, machine: machineInfo(),
      model: { dir: model.dir, fingerprint: model.fingerprint, float32WeightBytes: model.weights.held },
      workload: { threads, concurrency: o.concurrency, promptTokens: o.promptTokens, newTokens: o.newTokens, rounds: o.repeats },
      rows: all, llama: llamaRows, ratios, linears, accuracy,
    };
  } finally {
    for (const s of open) {
      s.pipeline.close();
      await s.cluster.stop();
    }
  }
}

/** A measured variant as the progress lines and the report name it. */
const rowName = (x: Pick<QuantDTypeRow, 'dtype' | 'runAhead' | 'decodeSteps' | 'maxBatch'>) =>
  `${x.dtype}${x.runAhead ? '' : ' (run-ahead off)'}${x.decodeSteps === DEFAULT_DECODE_STEPS ? '' : ` (${x.decodeSteps} step/request)`}${x.maxBatch === 1 ? ' (--max-batch 1)' : ''}`;
const mib = (b: number) => `${(b / 2 ** 20).toFixed(1)} MiB`;

export function renderQuantReport(r: QuantBenchReport, outDir: string): string {
  const lines = [
    `strata bench --suite quant: ${r.model.dir}, 1 worker × ${r.workload.threads} threads, ${r.workload.rounds} interleaved rounds (medians), ${r.workload.promptTokens}-token prompts, ${r.workload.newTokens} new tokens`,
    'dtype     weights     RSS             batch-1 ms/token  ×' + r.workload.concurrency + ' decode tok/s',
    ...r.rows.map((x) => `${rowName(x).padEnd(9)} ${mib(x.weightBytes).padEnd(11)} ${mib(x.rssBytes).padEnd(15)} ${x.batch1MsPerToken.toFixed(2).padStart(16)}  ${(Number.isNaN(x.aggregateDecodeTokS) ? '—' : x.aggregateDecodeTokS.toFixed(1)).padStart(14)}`),
    ...r.llama.map((x) => `${('llama ' + x.weights).padEnd(9)} ${mib(x.fileBytes).padEnd(11)} ${'(file)'.padEnd(15)} ${x.batch1MsPerToken.toFixed(2).padStart(16)}  ${x.aggregateDecodeTokS.toFixed(1).padStart(14)}`),
    ...(r.linears ?? []).map((s) => {
      const l = r.llama.find((x) => x.weights === LLAMA_WEIGHTS[s.dtype]);
      const alt = s.alt ? `; in blocks of ${s.alt.blockSize} (STRATA_INT8_BLOCK=${s.alt.blockSize}) ${s.alt.stepMs.toFixed(2)} ms, ×${ratio(s.stepMs, s.alt.stepMs).toFixed(2)}` : '';
      return `${s.dtype} one-row step in process ${s.stepMs.toFixed(2)} ms = linear layers ${s.linearsMs.toFixed(2)} + the rest ${s.withoutLinearsMs.toFixed(2)}${l ? ` (llama ${l.weights}'s whole step: ${l.batch1MsPerToken.toFixed(2)} ms)` : ''}${alt}`;
    }),
    'ratios: ' + Object.entries(r.ratios).map(([k, v]) => `${k} ×${v.toFixed(2)}`).join(', '),
  ];
  if (r.accuracy) lines.push(renderAccuracy(r.accuracy));
  lines.push(`report: ${join(outDir, 'bench.json')}`);
  return lines.join('\n');
}
