import { ElemType } from '../onnx-builder.ts';
import type { BlockContext } from './context.ts';
import { applyRotary } from './rotary.ts';

/**
 * Causal attention over a KV cache in fixed slots, written in place (runtime v2).
 *
 * Each stage keeps, per layer, key/value slots [1, H, max_len, head_dim] (model/kv-slots.ts); a session holds one
 * slot per row from its first prefill chunk to its end. ORT's com.microsoft GroupQueryAttention takes a fixed-size
 * past buffer plus `seqlens_k` (each row's length after this step, minus one) and writes only the new tokens' K/V
 * at that row's own offset: handed the SAME tensor as `past_*` input and as preallocated `present_*` fetch, the CPU
 * EP updates the slot in place (nothing copied); on WebGPU the present tensor stays in GPU memory and is fed back.
 *
 * A batch's sessions sit in any slots, and GQA's past batch must equal the query batch. So the graph has ROWS
 * independent GQA nodes per layer, one per batch row, each with its own past/present I/O `[1, H, *, hd]`: the runtime
 * binds row b to its session's slot (on the CPU a view into the layer's buffer, zero copies for any slot set) and
 * every idle row r >= B to a one-position scratch buffer, its query clamped to one token, so it costs ~nothing.
 * Linear layers stay batched over all B rows; the rows' outputs are concatenated and cut back to B.
 * Alternatives considered: one GQA over contiguous slot ranges needs compaction (copying whole caches) whenever
 * membership changes, or computes idle slots' rows; per-row nodes need neither, and their cost is a handful of
 * tiny nodes per layer and row (GQA itself is per-row work anyway).
 *
 * Prefill chunks: GQA treats T > 1 with past as a "subsequent prompt" (batch 1 only — one row per session's step,
 * which is what the runtime sends) and T == total as a first prompt. Checked against a JS reference on CPU and
 * WebGPU (lavapipe) at 3e-8 for chunks 5, 3, 1, 1, 4, 1 into one slot at a non-zero byte offset.
 */
export const SLOT_IO = {
  /** int32 [B]: each row's total length after this step, minus one (GQA's seqlens_k). */
  seqlens: 'seqlens_k',
  pastKey: (layer: number, row: number) => `past_key_${layer}_r${row}`,
  pastValue: (layer: number, row: number) => `past_value_${layer}_r${row}`,
  presentKey: (layer: number, row: number) => `present_key_${layer}_r${row}`,
  presentValue: (layer: number, row: number) => `present_value_${layer}_r${row}`,
  /** Host slots: the step's new K/V of every row, [B, H, T, head_dim], which the runtime writes into the slots. */
  newKey: (layer: number) => `new_key_${layer}`,
  newValue: (layer: number) => `new_value_${layer}`,
} as const;

/** Batch rows a stage graph serves at once (its decode batch limit, --max-batch). */
export const DEFAULT_SLOT_ROWS = 8;

interface RowPlan {
  starts: string;
  ends: string;
  seqlens: string;
  total: string;
}

interface Rows {
  rows: RowPlan[];
  batch: string;
  outShape: string;
}

/** Per-graph row bookkeeping (built once, shared by every layer). */
const plans = new WeakMap<object, Rows>();

function rowPlan(ctx: BlockContext, rows: number): Rows {
  const known = plans.get(ctx.g);
  if (known) return known;
  const { g, spec } = ctx;
  const I32 = ElemType.INT32;
  const seqlens = g.input(SLOT_IO.seqlens, I32, ['batch']);
  const bt = g.o('Shape', [ctx.positionIds]); // [B, T]
  const B = g.o('Slice', [bt, g.constInt64([0]), g.constInt64([1])]);
  const T = g.o('Slice', [bt, g.constInt64([1]), g.constInt64([2])]);
  const lastRow = g.o('Sub', [B, g.constInt64([1])]);
  const one = g.constInt64([1]);
  const zero = g.constInt64([0]);
  const plan: RowPlan[] = [];
  for (let r = 0; r < rows; r++) {
    const rc = g.constInt64([r]);
    const active = g.o('Less', [rc, B]);
    const row = g.o('Min', [rc, lastRow]); // idle rows read a real row's query, clamped to one token
    const len = g.o('Where', [active, T, one]);
    const idleSeqlens = g.o('Cast', [zero], { to: I32 });
    const rowSeqlens = g.o('Where', [active, g.o('Gather', [seqlens, row], { axis: 0 }), idleSeqlens]); // int32 [1]
    plan.push({
      starts: g.o('Concat', [row, zero], { axis: 0 }),
      ends: g.o('Concat', [g.o('Add', [row, one]), len], { axis: 0 }),
      seqlens: rowSeqlens,
      total: g.o('Squeeze', [g.o('Add', [rowSeqlens, g.o('Cast', [one], { to: I32 })]), zero]), // int32 scalar
    });
  }
  const rowsOut = { rows: plan, batch: B, outShape: g.o('Concat', [one, T, g.constInt64([spec.dModel])], { axis: 0 }) };
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
  const plan = rowPlan(ctx, rows);
  const flat = (t: string) => g.o('Reshape', [t, ctx.shapeBTD]); // [B,T,D]
  let [q3, k3] = [q, k];
  if (ctx.rotary) {
    const heads = (t: string) => g.o('Reshape', [t, ctx.shapeBTHd]);
    q3 = applyRotary(ctx, heads(q), ctx.rotary);
    k3 = applyRotary(ctx, heads(k), ctx.rotary);
  }
  const packed = g.o('Concat', [flat(q3), flat(k3), flat(v)], { axis: 2 }); // [B,T,3D]: GQA's packed QKV
  const inPlace = ctx.opts.kvInPlace ?? false;
  if (!inPlace) {
    const toBHTd = (t: string) => g.o('Transpose', [g.o('Reshape', [t, ctx.shapeBTHd])], { perm: [0, 2, 1, 3] });
    g.output(toBHTd(k3), SLOT_IO.newKey(layer), ACT, ['batch', H, 'seq', HD]);
    g.output(toBHTd(v), SLOT_IO.newValue(layer), ACT, ['batch', H, 'seq', HD]);
  }
  const outs: string[] = [];
  for (let r = 0; r < rows; r++) {
    const p = plan.rows[r];
    const x = g.o('Slice', [packed, p.starts, p.ends, g.constInt64([0, 1])]); // [1, T or 1, 3D]
    const pk = g.input(SLOT_IO.pastKey(layer, r), ACT, [1, H, `slot_len_r${r}`, HD]);
    const pv = g.input(SLOT_IO.pastValue(layer, r), ACT, [1, H, `slot_len_r${r}`, HD]);
    const [out, presentK, presentV] = g.op('GroupQueryAttention', [x, '', '', pk, pv, p.seqlens, p.total], { num_heads: H, kv_num_heads: H, scale: { float: scale } }, 3, 'com.microsoft');
    if (inPlace) {
      g.output(presentK, SLOT_IO.presentKey(layer, r), ACT, [1, H, `slot_len_r${r}`, HD]);
      g.output(presentV, SLOT_IO.presentValue(layer, r), ACT, [1, H, `slot_len_r${r}`, HD]);
    }
    outs.push(g.o('Expand', [out, plan.outShape])); // an idle row's one token → T, then dropped below
  }
  const all = outs.length === 1 ? outs[0] : g.o('Concat', outs, { axis: 0 }); // [ROWS, T, D]
  const used = g.o('Slice', [all, g.constInt64([0]), plan.batch, g.constInt64([0])]);
  return g.o('Reshape', [used, g.constInt64([-1, D])]);
}
