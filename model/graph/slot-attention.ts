import { ElemType } from '../onnx-builder.ts';
import type { BlockContext } from './context.ts';
import { applyRotary } from './rotary.ts';

/** A name per (layer, row), made once: every step binds layers × rows × 2 of them (~200 at 12 layers and 8 rows). */
function named(make: (layer: number, row: number) => string): (layer: number, row?: number) => string {
  const made = new Map<number, string>();
  return (layer, row = 0) => {
    const key = layer * 65536 + row;
    let name = made.get(key);
    if (name === undefined) made.set(key, (name = make(layer, row)));
    return name;
  };
}

/**
 * Causal attention over a KV cache in fixed slots (runtime v2).
 *
 * Each stage keeps, per layer, key/value slots [1, H, max_len, head_dim] (model/kv-slots.ts); a session holds one
 * slot per row from its first prefill chunk to its end. A batch's sessions sit in any slots, so the graph has ROWS
 * independent attentions per layer, one per batch row, each with its own past I/O `[1, H, *, hd]`: the runtime binds
 * row b to its session's slot and every idle row r >= B to a one-position scratch buffer, its query clamped to one
 * token, so it costs ~nothing. Linear layers stay batched over all B rows; the rows' outputs are concatenated and cut
 * back to B. (One attention over contiguous slot ranges would need compaction, copying whole caches, whenever
 * membership changes, or would compute idle slots' rows.)
 *
 * Two ways to reach the slots, by where they live:
 * - Device slots (WebGPU): ORT's com.microsoft GroupQueryAttention takes the past buffer plus `seqlens_k` and writes
 *   only the new tokens' K/V at the row's own offset; its present output stays in GPU memory and is fed back as the
 *   next run's past, so the cache never leaves the device.
 * - Host slots (CPU, CUDA): plain ops (hostSlotAttention below) read the slot in place and the new K/V leave as
 *   outputs that the runtime writes into the slot.
 *
 * Prefill chunks: GQA treats T > 1 with past as a "subsequent prompt" (batch 1 only — one row per session's step,
 * which is what the runtime sends) and T == total as a first prompt; the host path masks the new block causally.
 * Checked against a JS reference on CPU and WebGPU (lavapipe) at 3e-8 for chunks 5, 3, 1, 1, 4, 1 into one slot.
 */
export const SLOT_IO = {
  /** int32 [B]: each row's total length after this step, minus one (GQA's seqlens_k). */
  seqlens: 'seqlens_k',
  pastKey: named((layer, row) => `past_key_${layer}_r${row}`),
  pastValue: named((layer, row) => `past_value_${layer}_r${row}`),
  presentKey: named((layer, row) => `present_key_${layer}_r${row}`),
  presentValue: named((layer, row) => `present_value_${layer}_r${row}`),
  /**
   * Device slots: row r's plan, fed by the runtime (model/slot-run.ts devicePlanFeeds): where its tokens lie in the
   * batch (Slice starts/ends over [B, T]: [row, 0] and [row + 1, T]; an idle row reads row B−1's first token) and
   * GQA's seqlens_k [1] and total_sequence_length (scalar) for it.
   */
  rowStarts: named((_, row) => `row_starts_r${row}`),
  rowEnds: named((_, row) => `row_ends_r${row}`),
  rowSeqlens: named((_, row) => `row_seqlens_r${row}`),
  rowTotal: named((_, row) => `row_total_r${row}`),
  /** Host slots: the step's new K/V of every row, [B, H, T, head_dim], which the runtime writes into the slots. */
  newKey: named((layer) => `new_key_${layer}`),
  newValue: named((layer) => `new_value_${layer}`),
} as const;

/** Batch rows a stage graph serves at once (its decode batch limit, --max-batch). */
export const DEFAULT_SLOT_ROWS = 8;

interface RowPlan {
  /** Device slots: the row's Slice bounds over [B, T] and GroupQueryAttention's seqlens_k and total ('' with host slots). */
  starts: string;
  ends: string;
  seqlens: string;
  total: string;
  /** Host attention: which slot positions hold this row's past ('' with device slots). */
  pastAllowed: string;
  /** Host attention: the positions the row's bound past holds (int64 [1]), the same in every layer ('' with device slots). */
  cap: string;
  /** Host attention: Split sizes [cap, T] of the row's softmax over [past | new]. */
  probSplit: string;
}

interface Rows {
  rows: RowPlan[];
  batch: string;
  /** bool [1]: the batch has more than one row. */
  many: string;
  /** Device slots: [1, T, D], an idle row's output padded to T tokens. */
  outShape: string;
  /** Host attention: bool [T, T], the causal block of the new tokens (key <= query), the same for every batch row. */
  newAllowed: string;
  /** Host attention: int64 [ROWS], the batch row each graph row reads (an idle row: the last, B − 1). */
  rowIndex: string;
}

/** Per-graph row bookkeeping (built once, with the first layer, and shared by every layer). */
const plans = new WeakMap<object, Rows>();

function rowPlan(ctx: BlockContext, rows: number, firstLayer: number): Rows {
  const known = plans.get(ctx.g);
  if (known) return known;
  const { g, spec, ACT } = ctx;
  const [I32, I64, BOOL] = [ElemType.INT32, ElemType.INT64, ElemType.BOOL];
  const bt = g.o('Shape', [ctx.positionIds]); // [B, T]
  const B = g.o('Slice', [bt, g.constInt64([0]), g.constInt64([1])]);
  const T = g.o('Slice', [bt, g.constInt64([1]), g.constInt64([2])]);
  if (ctx.opts.kvInPlace ?? false) {
    // Device slots: the plan comes in as inputs, which stay on the CPU where Slice and GQA read them. Computed here,
    // the WebGPU EP ran its int ops (and the If below) on the GPU and copied each result back: 22 GPU→host syncs
    // per run at 8 rows, ~20 ms of every decode step on an H200 (2026-12-04, ORT profile: MemcpyToHost).
    const rowsIn = Array.from({ length: rows }, (_, r) => ({
      starts: g.input(SLOT_IO.rowStarts(0, r), I64, [2]),
      ends: g.input(SLOT_IO.rowEnds(0, r), I64, [2]),
      seqlens: g.input(SLOT_IO.rowSeqlens(0, r), I32, [1]),
      total: g.input(SLOT_IO.rowTotal(0, r), I32, []),
      pastAllowed: '',
      cap: '',
      probSplit: '',
    }));
    const outShape = g.o('Concat', [g.constInt64([1]), T, g.constInt64([spec.dModel])], { axis: 0 });
    const devicePlan = { rows: rowsIn, batch: B, many: '', outShape, newAllowed: '', rowIndex: '' }; // many, newAllowed, rowIndex: the host path's only
    plans.set(ctx.g, devicePlan);
    return devicePlan;
  }
  const seqlens = g.input(SLOT_IO.seqlens, I32, ['batch']);
  const lastRow = g.o('Sub', [B, g.constInt64([1])]);
  const one = g.constInt64([1]);
  const zero = g.constInt64([0]);
  const scalar = (t: string) => g.o('Squeeze', [t, zero]);
  const range = (n: string) => g.o('Range', [g.constInt64([0], []), scalar(n), g.constInt64([1], [])]);
  // A row's host plan, in RowPlan's order: pastAllowed, cap, probSplit.
  const planRow = (r: number): string[] => {
    const rc = g.constInt64([r]);
    const active = g.o('Less', [rc, B]);
    const len = g.o('Where', [active, T, one]); // an idle row: one token
    const rowSeqlens = g.o('Where', [active, g.o('Gather', [seqlens, g.o('Min', [rc, lastRow])], { axis: 0 }), g.constInt32([0])]); // int32 [1]
    const total = scalar(g.o('Add', [rowSeqlens, g.constInt32([1])])); // int32 scalar
    const past = g.o('Sub', [g.o('Cast', [total], { to: I64 }), scalar(len)]); // cached positions before the step
    // The slot's capacity is the same in every layer: the first layer's past input tells it.
    const cap = g.o('Shape', [g.inputOnce(SLOT_IO.pastKey(firstLayer, r), ACT, [1, spec.heads, `slot_len_r${r}`, spec.headDim])], { start: 2, end: 3 });
    return [g.o('Less', [range(cap), past]), cap, g.o('Concat', [cap, T], { axis: 0 })];
  };
  // At batch 1 every row r >= 1 is idle and its plan is a constant (its one-position scratch slot, masked): an If
  // hands those constants out rather than running ~10 nodes per row that batch 1 never needs.
  const idleRow = (): string[] => [g.constInt32([0], [1], BOOL), g.constInt64([1]), g.constInt64([1, 1])];
  const many = g.o('Greater', [B, one]);
  const types = [BOOL, I64, I64];
  const rest = rows > 1
    ? g.ifThen(many, () => Array.from({ length: rows - 1 }, (_, i) => planRow(i + 1)).flat(), () => Array.from({ length: rows - 1 }, idleRow).flat(), Array.from({ length: rows - 1 }, () => types).flat())
    : [];
  const fields = [planRow(0), ...Array.from({ length: rows - 1 }, (_, i) => rest.slice(i * types.length, (i + 1) * types.length))];
  const plan = fields.map(([pastAllowed, cap, probSplit]) => ({ starts: '', ends: '', seqlens: '', total: '', pastAllowed, cap, probSplit }));
  const pos = range(T);
  const newAllowed = g.o('LessOrEqual', [g.o('Unsqueeze', [pos, zero]), g.o('Unsqueeze', [pos, one])]); // [T,T]: key <= query
  const rowIndex = g.o('Min', [g.constInt64(Array.from({ length: rows }, (_, r) => r)), lastRow]);
  const rowsOut = { rows: plan, batch: B, many, outShape: '', newAllowed, rowIndex };
  plans.set(ctx.g, rowsOut);
  return rowsOut;
}

/**
 * q, k, v [B·T, D] → context [B·T, D] (before the output projection), through this layer's KV slots. `scale`
 * multiplies QKᵀ (GPT-2: 1/(sqrt(hd)·(layer+1)) with scale_attn_by_inverse_layer_idx). GPT-J's interleaved partial
 * rotary stays explicit ops before GQA: GQA's built-in rotary needs head_dim % 16 == 0 and a cos table width that
 * is a multiple of 8 (the tiny fixtures' rotary_dim 8 gives width 4).
 */
export function slotAttention(ctx: BlockContext, q: string, k: string, v: string, layer: number, scale: number, rows = DEFAULT_SLOT_ROWS): string {
  const { g, spec, ACT } = ctx;
  const { heads: H, headDim: HD, dModel: D } = spec;
  const plan = rowPlan(ctx, rows, layer);
  const flat = (t: string) => g.o('Reshape', [t, ctx.shapeBTD]); // [B,T,D]
  let [q3, k3] = [q, k];
  if (ctx.rotary) {
    const heads = (t: string) => g.o('Reshape', [t, ctx.shapeBTHd]);
    q3 = applyRotary(ctx, heads(q), ctx.rotary);
    k3 = applyRotary(ctx, heads(k), ctx.rotary);
  }
  if (!(ctx.opts.kvInPlace ?? false)) return hostSlotAttention(ctx, plan, q3, k3, v, layer, scale);
  const packed = g.o('Concat', [flat(q3), flat(k3), flat(v)], { axis: 2 }); // [B,T,3D]: GQA's packed QKV
  const outs: string[] = [];
  for (let r = 0; r < rows; r++) {
    const p = plan.rows[r];
    const x = g.o('Slice', [packed, p.starts, p.ends, g.constInt64([0, 1])]); // [1, T or 1, 3D]
    const pk = g.inputOnce(SLOT_IO.pastKey(layer, r), ACT, [1, H, `slot_len_r${r}`, HD]);
    const pv = g.input(SLOT_IO.pastValue(layer, r), ACT, [1, H, `slot_len_r${r}`, HD]);
    const [out, presentK, presentV] = g.op('GroupQueryAttention', [x, '', '', pk, pv, p.seqlens, p.total], { num_heads: H, kv_num_heads: H, scale: { float: scale } }, 3, 'com.microsoft');
    g.output(presentK, SLOT_IO.presentKey(layer, r), ACT, [1, H, `slot_len_r${r}`, HD]);
    g.output(presentV, SLOT_IO.presentValue(layer, r), ACT, [1, H, `slot_len_r${r}`, HD]);
    outs.push(g.o('Expand', [out, plan.outShape])); // an idle row's one token → T, then dropped below
  }
  const all = outs.length === 1 ? outs[0] : g.o('Concat', outs, { axis: 0 }); // [ROWS, T, D]
  const used = g.o('Slice', [all, g.constInt64([0]), plan.batch, g.constInt64([0])]);
  return g.o('Reshape', [used, g.constInt64([-1, D])]);
}

/**
 * Host slots (CPU, CUDA): attention in plain ops that read each row's slot where it lies. GroupQueryAttention
 * without a shared past/present buffer copies the past into a fresh present every run (and its cost follows the
 * buffer, not the session), and a shared buffer would have to be a run output, which onnxruntime-node copies back
 * whole. Here each row's past K/V is a zero-copy input read once by two matrix products; the new tokens' K/V are
 * outputs [B, H, T, hd] that the runtime writes into the slots. Per row: scores over [past | new] (past positions
 * beyond the row's length and later new tokens masked), one softmax, and the two value products summed.
 */
function hostSlotAttention(ctx: BlockContext, plan: Rows, q3: string, k3: string, v: string, layer: number, scale: number): string {
  const { g, spec, ACT, F32, half } = ctx;
  const { heads: H, headDim: HD, dModel: D } = spec;
  const toBHTd = (t: string) => g.o('Transpose', [g.o('Reshape', [t, ctx.shapeBTHd])], { perm: [0, 2, 1, 3] }); // [B,H,T,hd]
  // The scale goes on q, before its reshape, rather than on the score products' alpha: MLAS has a kernel for a
  // one-row q·Kᵀ (dot products along the slot's rows as they lie) only for alpha 1. With any other alpha it packs a
  // transposed copy of the whole slot on every call first. At one query per row that took 2.6× the value product over
  // the same bytes. (A Mul right at the product would be folded back into its alpha by ORT's optimizer.)
  const qs = scale === 1 ? q3 : g.o('Mul', [q3, g.constScalar(scale, ACT)]);
  const [qh, kh, vh] = [toBHTd(qs), toBHTd(k3), toBHTd(v)];
  g.output(kh, SLOT_IO.newKey(layer), ACT, ['batch', H, 'seq', HD]);
  g.output(vh, SLOT_IO.newValue(layer), ACT, ['batch', H, 'seq', HD]);
  const masked = g.constScalar(-3.4028234663852886e38, F32);
  const zero = g.constInt64([0]);
  // Every row's inputs are declared here, outside the If below: an If's branches cannot declare graph inputs.
  const past = plan.rows.map((_, r) => ({
    pk: g.inputOnce(SLOT_IO.pastKey(layer, r), ACT, [1, H, `slot_len_r${r}`, HD]),
    pv: g.input(SLOT_IO.pastValue(layer, r), ACT, [1, H, `slot_len_r${r}`, HD]),
  }));
  /** q·bᵀ, float32 scores: [.., T, hd] × [.., S, hd] → [.., T, S] (q already scaled). */
  const scores = (q: string, b: string) => {
    const sc = g.o('FusedMatMul', [q, b], { transB: 1 }, 'com.microsoft');
    return half ? g.o('Cast', [sc], { to: F32 }) : sc;
  };
  /**
   * Row r's probabilities over [its slot | the new tokens], split in two: q [1,H,T,hd], sNew its masked scores
   * against the new keys [1,H,T,T]. The same nodes run a row alone (attend) and in a batch (everyRow).
   */
  const rowProbs = (r: number, q: string, sNew: string): string[] => {
    const p = plan.rows[r];
    const all = g.o('Concat', [g.o('Where', [p.pastAllowed, scores(q, past[r].pk), masked]), sNew], { axis: 3 });
    let probs = g.o('Softmax', [all], { axis: -1 });
    if (half) probs = g.o('Cast', [probs], { to: ACT });
    return g.op('Split', [probs, p.probSplit], { axis: 3 }, 2);
  };
  // Row r's attention over its slot and its new tokens: q, k, vv [1,H,T,hd] → context [1,T,H,hd].
  const attend = (r: number, q: string, k: string, vv: string): string => {
    const [pPast, pNew] = rowProbs(r, q, g.o('Where', [plan.newAllowed, scores(q, k), masked]));
    const out = g.o('Add', [g.o('MatMul', [pPast, past[r].pv]), g.o('MatMul', [pNew, vv])]); // [1,H,T,hd]
    return g.o('Transpose', [out], { perm: [0, 2, 1, 3] });
  };
  const flatRows = (t: string) => g.o('Reshape', [t, g.constInt64([-1, D])]); // [B·T, D]
  // Batches of two or more: only the ragged part runs per row, each row's scores over its own slot and the softmax
  // over [past | new]; the new tokens' scores, their value product, the sum and the layout are one node each for the
  // whole batch. A row computes exactly what attend() does (rowProbs, then the same products at the same shapes),
  // so a session's values do not depend on what it is batched with: a replay after a fault, batched differently,
  // stays bit-identical. 6 nodes per row and 14 per layer instead of 17 per row: at 8 rows 62 nodes a layer, not 139.
  const everyRow = (): string => {
    const sNew = g.o('Where', [plan.newAllowed, scores(qh, kh), masked]); // [B,H,T,T], causal
    // Each graph row's q and new scores, [1,H,T,…]: one Gather and one Split for all rows (an idle row reads row B−1).
    const byRow = (t: string) => g.op('Split', [g.o('Gather', [t, plan.rowIndex], { axis: 0 })], { axis: 0, num_outputs: plan.rows.length }, plan.rows.length);
    const [qRows, sRows] = [byRow(qh), byRow(sNew)];
    const parts = plan.rows.map((_, r) => {
      const [pPast, pNew] = rowProbs(r, qRows[r], sRows[r]);
      return { out: g.o('MatMul', [pPast, past[r].pv]), pNew };
    });
    const batchRows = (ts: string[]) => g.o('Slice', [g.o('Concat', ts, { axis: 0 }), zero, plan.batch, zero]); // [B,…]
    // float16 (the host slots CUDA runs): the new tokens' value product stays per row. Batched, ORT's float16 MatMul
    // rounded a row differently from the same product alone (CPU EP, test/batching.test.ts), and a row must compute
    // what batch 1 computes.
    const vRows = half ? byRow(vh) : [];
    const out = half
      ? batchRows(parts.map((x, r) => g.o('Add', [x.out, g.o('MatMul', [x.pNew, vRows[r]])])))
      : g.o('Add', [batchRows(parts.map((x) => x.out)), g.o('MatMul', [batchRows(parts.map((x) => x.pNew)), vh])]); // [B,H,T,hd]
    return flatRows(g.o('Transpose', [out], { perm: [0, 2, 1, 3] }));
  };
  // A batch of one row is row 0 as it is: no row slicing, padding or cutting, and rows 1… not run at all. At batch 1
  // the idle rows' ~18 nodes per row and layer, each a dispatch of a few µs, were 4-6 ms of a GPT-2-small step (a
  // graph of 1 row: 14 ms, of 8 rows: 20 ms); the row plumbing another ~10 nodes per layer. A one-row graph
  // (--max-batch 1) is always that batch.
  if (plan.rows.length === 1) return flatRows(attend(0, qh, kh, vh));
  return g.ifThen(plan.many, () => [everyRow()], () => [flatRows(attend(0, qh, kh, vh))], [ACT])[0];
}
