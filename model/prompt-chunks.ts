import { elementCount, type TensorData } from './tensor.ts';
import { checkCausalMask, type StepInput } from './stage-inputs.ts';
import type { StepOutput } from './slot-run.ts';

/** Longest prompt chunk one WebGPU run takes (see stepInChunks). */
export const WEBGPU_MAX_PROMPT_CHUNK = 31;

/**
 * A long prompt as several shorter steps through a stage (each writes its tokens into the slot, so the next
 * chunk attends to them): the outputs are the same as one step's. Used on WebGPU, whose GroupQueryAttention
 * computes prompts of 32 or more tokens wrongly in ORT 1.30 (measured: errors ~1e-2 from T = 32 on, any max_len,
 * first or later chunk; T <= 31 matches a JS reference to 6e-8). `stepOnce` runs one chunk and advances the cache.
 */
export async function stepInChunks<C extends { length: number }>(
  input: StepInput,
  cache: C,
  chunk: number,
  stage: { isLast: boolean; maxPositions: number },
  stepOnce: (input: StepInput, cache: C) => Promise<StepOutput>,
): Promise<StepOutput> {
  const [batch, seq] = input.positionIds.dims;
  const past = cache.length;
  checkCausalMask(input.attentionMask, batch, past + seq, stage.maxPositions);
  const wanted = input.logitPositions ? Array.from(input.logitPositions.data as BigInt64Array, Number) : Array.from({ length: seq }, (_, i) => i);
  const hidden: TensorData[] = [];
  const lastHidden: TensorData[] = [];
  const logits = new Map<number, { t: TensorData; row: number }>(); // position → where its logits are
  for (let from = 0; from < seq; from += chunk) {
    const to = Math.min(seq, from + chunk);
    const mine = wanted.filter((p) => p >= from && p < to);
    const out = await stepOnce({
      inputIds: input.inputIds && cols(input.inputIds, from, to),
      hidden: input.hidden && cols(input.hidden, from, to),
      positionIds: cols(input.positionIds, from, to),
      attentionMask: cols(input.attentionMask, 0, past + to),
      logitPositions: { dtype: 'int64', dims: [Math.max(1, mine.length)], data: BigInt64Array.from(mine.length ? mine : [to - from - 1], (p) => BigInt(mine.length ? p - from : p)) },
    }, cache);
    if (out.hidden) hidden.push(out.hidden);
    if (out.lastHidden) lastHidden.push(out.lastHidden);
    mine.forEach((p, row) => logits.set(p, { t: out.logits!, row }));
  }
  if (!stage.isLast) return { hidden: concatCols(hidden) };
  return { logits: gatherLogits(logits, wanted, batch), lastHidden: concatCols(lastHidden) };
}

/** The chunks' logits rows, in the order of the positions asked for: [B, wanted, vocab]. */
function gatherLogits(logits: Map<number, { t: TensorData; row: number }>, wanted: number[], batch: number): TensorData {
  const first = logits.values().next().value!.t;
  const [, , vocab] = first.dims;
  const data = new Float32Array(batch * wanted.length * vocab);
  for (let b = 0; b < batch; b++) {
    wanted.forEach((p, r) => {
      const { t, row } = logits.get(p)!;
      const rows = t.dims[1];
      data.set((t.data as Float32Array).subarray((b * rows + row) * vocab, (b * rows + row + 1) * vocab), (b * wanted.length + r) * vocab);
    });
  }
  return { dtype: 'float32', dims: [batch, wanted.length, vocab], data };
}

/** Columns [from, to) of a [B, T, ...] tensor. */
function cols(t: TensorData, from: number, to: number): TensorData {
  const [B, T] = t.dims;
  const inner = elementCount(t.dims.slice(2));
  const out = new (t.data.constructor as new (n: number) => TensorData['data'])(B * (to - from) * inner);
  for (let b = 0; b < B; b++) out.set(t.data.subarray((b * T + from) * inner, (b * T + to) * inner) as never, b * (to - from) * inner);
  return { dtype: t.dtype, dims: [B, to - from, ...t.dims.slice(2)], data: out };
}

/** [B, T_i, ...] tensors joined along T. */
function concatCols(parts: TensorData[]): TensorData {
  const [B] = parts[0].dims;
  const inner = elementCount(parts[0].dims.slice(2));
  const T = parts.reduce((n, p) => n + p.dims[1], 0);
  const out = new (parts[0].data.constructor as new (n: number) => TensorData['data'])(B * T * inner);
  for (let b = 0, at = 0; b < B; b++) for (const p of parts) {
    const n = p.dims[1] * inner;
    out.set(p.data.subarray(b * n, (b + 1) * n) as never, at);
    at += n;
  }
  return { dtype: parts[0].dtype, dims: [B, T, ...parts[0].dims.slice(2)], data: out };
}
