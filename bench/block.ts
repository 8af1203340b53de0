import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { normalizeConfig } from '../model/config.ts';
import { buildStageGraph } from '../model/stage-graph.ts';
import { defaultFused } from '../model/stage-cache.ts';
import { FileSink } from '../model/onnx-builder.ts';
import { StageSession } from '../model/executor.ts';
import { Stage } from '../model/stage.ts';
import { PRESETS, syntheticConfig } from '../model/synthetic.ts';
import type { TensorData } from '../model/tensor.ts';
import { measureBandwidth } from './bandwidth.ts';
import { summarize } from './stats.ts';

export interface BlockBenchReport {
  suite: 'block';
  shape: { family: string; dModel: number; heads: number; inner: number };
  threads: number;
  fused: boolean;
  weightBytes: number;
  decode: { pastTokens: number; msP50: number; effectiveGBps: number };
  prefill: { tokens: number; msP50: number; effectiveGBps: number; gflops: number };
  readGBps: number;
  decodeVsReadFloor: number;
}

/**
 * One transformer block of a real model's width (default GPT-J: d 4096, 16 heads, MLP 16384) built as a middle
 * stage (hidden states in and out, random weights) and timed alone: a decode step (T = 1) over a KV cache, and a
 * prefill. Weight bytes / time says how far the graph runs from memory bandwidth, measured in the same run.
 */
export async function runBlockBench(o: { preset?: string; threads: number; pastTokens?: number; prefillTokens?: number; repeats?: number; log?: (m: string) => void }): Promise<BlockBenchReport> {
  const preset = PRESETS[o.preset ?? 'gpt-j'] ?? PRESETS['gpt-j'];
  const spec = normalizeConfig(syntheticConfig({ ...preset, blocks: 3 }));
  const dir = mkdtempSync(join(tmpdir(), 'strata-block-'));
  try {
    let state = 12345;
    const source = {
      prefix: 'transformer.',
      readFloat32: (_k: string, shape: number[]) => {
        const a = new Float32Array(shape.reduce((x, y) => x * y, 1));
        for (let i = 0; i < a.length; i++) {
          state ^= state << 13;
          state ^= state >>> 17;
          state ^= state << 5;
          a[i] = ((state >>> 0) / 4294967296 - 0.5) * 0.04;
        }
        return a;
      },
    };
    o.log?.(`building one ${spec.family} block (d ${spec.dModel}, MLP ${spec.inner}) …`);
    const fused = defaultFused('cpu');
    const sink = new FileSink(join(dir, 'weights.bin'), 'weights.bin');
    const { model, paramBytes } = buildStageGraph(spec, { first: 1, last: 2 }, source, sink, { dtype: 'float32', fused });
    sink.close();
    writeFileSync(join(dir, 'stage.onnx'), model);
    const stage = new Stage(spec, { first: 1, last: 2 }, await StageSession.create(join(dir, 'stage.onnx'), { threads: o.threads }), 'float32');
    const random = (n: number) => Float32Array.from({ length: n }, () => Math.random() - 0.5);
    const ids = (v: number[]): TensorData => ({ dtype: 'int64', dims: [1, v.length], data: BigInt64Array.from(v, BigInt) });
    const time = async (T: number, past: number): Promise<number> => {
      const cache = stage.emptyCache(1);
      cache.length = past; // the slot's contents do not change the cost: the step attends over `past` positions
      const hidden: TensorData = { dtype: 'float32', dims: [1, T, spec.dModel], data: random(T * spec.dModel) };
      const t0 = performance.now();
      await stage.step({ hidden, positionIds: ids(Array.from({ length: T }, (_, i) => past + i)), attentionMask: ids(Array(past + T).fill(1)) }, cache);
      const ms = performance.now() - t0;
      stage.closeCache(cache);
      return ms;
    };
    const repeats = o.repeats ?? 7;
    const past = o.pastTokens ?? 512;
    const prefillT = o.prefillTokens ?? 128;
    await time(1, past); // warm-up
    const decode: number[] = [];
    const prefill: number[] = [];
    for (let i = 0; i < repeats; i++) {
      decode.push(await time(1, past));
      prefill.push(await time(prefillT, 0));
      o.log?.(`round ${i + 1}/${repeats}: decode ${decode.at(-1)!.toFixed(1)} ms, prefill ${prefill.at(-1)!.toFixed(1)} ms`);
    }
    await stage.session.release();
    const bw = await measureBandwidth({ threads: o.threads });
    const d = summarize(decode).p50;
    const p = summarize(prefill).p50;
    const readGBps = bw.readBytesPerSec / 1e9;
    return {
      suite: 'block', shape: { family: spec.family, dModel: spec.dModel, heads: spec.heads, inner: spec.inner }, threads: o.threads, fused,
      weightBytes: paramBytes,
      decode: { pastTokens: past, msP50: d, effectiveGBps: paramBytes / d / 1e6 },
      prefill: { tokens: prefillT, msP50: p, effectiveGBps: paramBytes / p / 1e6, gflops: (2 * prefillT * (paramBytes / 4)) / p / 1e6 },
      readGBps, decodeVsReadFloor: d / (paramBytes / bw.readBytesPerSec * 1000),
    };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

export function renderBlockReport(r: BlockBenchReport): string {
  return [
    `one ${r.shape.family} block, d ${r.shape.dModel}, ${r.shape.heads} heads, MLP ${r.shape.inner}, ${(r.weightBytes / 1e6).toFixed(1)} MB of float32 weights, ${r.threads} thread(s), fused=${r.fused}`,
    `  decode  T=1 over ${r.decode.pastTokens} cached tokens: ${r.decode.msP50.toFixed(1)} ms  → ${r.decode.effectiveGBps.toFixed(1)} GB/s effective (read bandwidth ${r.readGBps.toFixed(1)} GB/s: ${r.decodeVsReadFloor.toFixed(2)}× the weight-read floor)`,
    `  prefill T=${r.prefill.tokens}: ${r.prefill.msP50.toFixed(1)} ms  → ${r.prefill.effectiveGBps.toFixed(1)} GB/s of weights, ${r.prefill.gflops.toFixed(0)} GFLOP/s (matmuls)`,
  ].join('\n');
}
