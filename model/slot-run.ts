import { IO } from './graph/io.ts';
import { SLOT_IO } from './graph/slot-attention.ts';
import { isDeviceTensor, type DeviceTensor, type Feed, type StageSession } from './executor.ts';
import type { KvSlots } from './kv-slots.ts';
import type { TensorData } from './tensor.ts';
import { StrataError } from './errors.ts';

// One ORT run of a decoder stage over KV slots: each batch row bound to its session's slot (idle graph rows to
// scratch), and the run's outputs unpacked again, per stage and per session. See model/graph/slot-attention.ts.

export interface StepOutput {
  hidden?: TensorData;
  logits?: TensorData;
  /** Last stage: int64 [B, R], each logit row's greedy token (the graph's ArgMax; the only output of a greedy run). */
  nextTokens?: TensorData;
  /** Last stage: the final hidden states [B, T, D] (HF's last_hidden_state). */
  lastHidden?: TensorData;
}

/** One run's rows: each batch row's slot and cached length, all with the same new-token count T. */
export interface SlotRow {
  slot: number;
  past: number;
}

type RunOutputs = Record<string, TensorData | DeviceTensor>;

/**
 * Binds each row to its slot (idle rows of the graph's `graphRows` to scratch), runs, and keeps device-resident
 * presents as the slots'. `feeds` holds the step's own inputs; the mask, lengths and KV are added here.
 */
export async function runInSlots(session: StageSession, slots: KvSlots, graphRows: number, feeds: Record<string, Feed>, rows: SlotRow[], seq: number, skip?: ReadonlySet<string>): Promise<RunOutputs> {
  const B = rows.length;
  // The graph ignores the mask of a decoder (its attention reads lengths from seqlens_k); it still declares the input.
  feeds[IO.attentionMask] = { dtype: 'int64', dims: [B, 1], data: new BigInt64Array(B).fill(1n) };
  if (slots.resident) Object.assign(feeds, devicePlanFeeds(graphRows, rows, seq));
  else feeds[SLOT_IO.seqlens] = { dtype: 'int32', dims: [B], data: Int32Array.from(rows, (r) => r.past + seq - 1) } as unknown as TensorData;
  for (const row of rows) slots.reserve(row.slot, row.past + seq);
  for (const l of slots.geometry.layers) {
    for (let r = 0; r < graphRows; r++) {
      // A host row's first prompt has no past: it reads the one-position scratch (masked) rather than a slot laid out
      // for the whole prompt, whose every position the graph would score and mask. Its K/V still go to its slot.
      const bound = r < B && (slots.resident || rows[r].past > 0);
      const kv = bound ? slots.slot(l, rows[r].slot) : slots.idle(l, r);
      feeds[SLOT_IO.pastKey(l, r)] = kv.key;
      feeds[SLOT_IO.pastValue(l, r)] = kv.value;
    }
  }
  const out = await session.run(feeds, skip);
  if (slots.resident) keepOnDevice(slots, graphRows, rows, out);
  else writeNewKv(slots, rows, seq, out);
  return out;
}

/**
 * Device slots: each graph row's plan as CPU inputs (see SLOT_IO.rowStarts). Row b < B takes batch row b's T tokens
 * after its past; an idle row reads row B−1's first token against its one-position scratch (seqlens 0, total 1).
 */
export function devicePlanFeeds(graphRows: number, rows: SlotRow[], seq: number): Record<string, TensorData> {
  const feeds: Record<string, TensorData> = {};
  const i64 = (...v: number[]): TensorData => ({ dtype: 'int64', dims: [v.length], data: BigInt64Array.from(v, BigInt) });
  const i32 = (v: number, dims: number[]): TensorData => ({ dtype: 'int32', dims, data: Int32Array.of(v) }) as unknown as TensorData;
  const B = rows.length;
  for (let r = 0; r < graphRows; r++) {
    const active = r < B;
    const row = active ? r : B - 1;
    const seqlens = active ? rows[r].past + seq - 1 : 0;
    feeds[SLOT_IO.rowStarts(0, r)] = i64(row, 0);
    feeds[SLOT_IO.rowEnds(0, r)] = i64(row + 1, active ? seq : 1);
    feeds[SLOT_IO.rowSeqlens(0, r)] = i32(seqlens, [1]);
    feeds[SLOT_IO.rowTotal(0, r)] = i32(seqlens + 1, []);
  }
  return feeds;
}

/** Host slots: the run read each row's past in place (a view, no copy); its new K/V [B, H, T, hd] go into the slots. */
function writeNewKv(slots: KvSlots, rows: SlotRow[], seq: number, out: RunOutputs): void {
  const { heads: H, headDim: hd } = slots.geometry;
  const run = seq * hd; // one row's one head: T positions × hd, contiguous in the output and in the slot
  for (const l of slots.geometry.layers) {
    const newK = out[SLOT_IO.newKey(l)] as TensorData;
    const newV = out[SLOT_IO.newValue(l)] as TensorData;
    delete out[SLOT_IO.newKey(l)];
    delete out[SLOT_IO.newValue(l)];
    rows.forEach((row, b) => {
      const slot = slots.slot(l, row.slot) as { key: TensorData; value: TensorData };
      const cap = slot.key.dims[2]; // the slot's layout: [1, H, cap, hd]
      for (let h = 0; h < H; h++) {
        const from = (b * H + h) * run;
        const to = (h * cap + row.past) * hd;
        slot.key.data.set(newK.data.subarray(from, from + run) as never, to);
        slot.value.data.set(newV.data.subarray(from, from + run) as never, to);
      }
    });
  }
}

/** WebGPU: the run's present K/V stay in GPU memory and become the slots' (and idle rows' scratch) for the next run. */
function keepOnDevice(slots: KvSlots, graphRows: number, rows: SlotRow[], out: RunOutputs): void {
  for (const l of slots.geometry.layers) {
    for (let r = 0; r < graphRows; r++) {
      const key = out[SLOT_IO.presentKey(l, r)];
      const value = out[SLOT_IO.presentValue(l, r)];
      if (!isDeviceTensor(key) || !isDeviceTensor(value)) throw new StrataError('stage_internal', `present KV of layer ${l} row ${r} came back to the host; expected it on the device`, 'internal');
      slots.storeDevice(l, r < rows.length ? { slot: rows[r].slot } : { row: r }, key, value);
    }
  }
}

/** A run's outputs as a stage's: logits, greedy tokens and final hidden states from the last stage (those fetched), hidden states from the others. */
export function stageOutputs(out: RunOutputs, isLast: boolean): StepOutput {
  const host = (name: string) => out[name] as TensorData | undefined;
  return isLast ? { logits: host(IO.logits), nextTokens: host(IO.nextTokens), lastHidden: host(IO.lastHidden) } : { hidden: host(IO.hiddenOut) };
}

/** What a greedy run of a last stage leaves unfetched (Stage.step's `fetch`). */
export const GREEDY_SKIPS: ReadonlySet<string> = new Set([IO.logits, IO.lastHidden]);

/** A batched run's output cut into one output per session (row b), each its own copy so it can travel independently. */
export function splitRows(out: StepOutput, B: number, isLast: boolean): StepOutput[] {
  const rowOf = (t: TensorData | undefined, b: number): TensorData | undefined => {
    if (!t) return undefined;
    const n = t.data.length / B;
    return { dtype: t.dtype, dims: [1, ...t.dims.slice(1)], data: t.data.slice(b * n, (b + 1) * n) as TensorData['data'] };
  };
  return Array.from({ length: B }, (_, b) => (isLast ? { logits: rowOf(out.logits, b), nextTokens: rowOf(out.nextTokens, b), lastHidden: rowOf(out.lastHidden, b) } : { hidden: rowOf(out.hidden, b) }));
}
