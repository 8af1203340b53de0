import type { BlockContext } from './context.ts';
import { additiveBias } from './mask.ts';
import { applyRotary } from './rotary.ts';
import { slotAttention } from './slot-attention.ts';

/** The one factor GroupQueryAttention multiplies QKᵀ by: 1/sqrt(hd) where HF scales, and GPT-2's 1/(layer+1). */
function gqaScale(headDim: number, scaling: AttentionScaling, layer: number): number {
  let scale = scaling.sqrtHeadDim === 'none' ? 1 : 1 / Math.sqrt(headDim);
  if (scaling.inverseLayer) scale /= layer + 1; // GLOBAL layer index
  return scale;
}

/** Where each Hugging Face implementation applies its score scaling. */
export interface AttentionScaling {
  /** 1/sqrt(head_dim): on q before QKᵀ (DistilBERT), on the scores (GPT-2, GPT-J), or not at all (GPT-2 scale_attn_weights=false). */
  sqrtHeadDim: 'query' | 'scores' | 'none';
  /** GPT-2's scale_attn_by_inverse_layer_idx: scores also divided by (global layer index + 1). */
  inverseLayer: boolean;
}

/**
 * Multi-head attention of projected q, k, v [B·T, D] → context [B·T, D] (before the output projection), with rotary
 * positions when the model has them. Causal models attend through their KV slots (slot-attention.ts:
 * GroupQueryAttention per batch row, K/V written in place); the masked encoder uses the stage's mask.
 */
export function attention(ctx: BlockContext, q: string, k: string, v: string, layer: number, scaling: AttentionScaling): string {
  const { g, spec, half, ACT, F32 } = ctx;
  const { headDim: HD, dModel: D } = spec;
  if (spec.causal) return slotAttention(ctx, q, k, v, layer, gqaScale(HD, scaling, layer), ctx.opts.rows);
  const heads = (t: string) => g.o('Reshape', [t, ctx.shapeBTHd]); // [B,T,H,hd]
  let [q4, k4] = [heads(q), heads(k)];
  if (ctx.rotary) [q4, k4] = [applyRotary(ctx, q4, ctx.rotary), applyRotary(ctx, k4, ctx.rotary)];
  const toBHTd = (t: string) => g.o('Transpose', [t], { perm: [0, 2, 1, 3] });
  let qh = toBHTd(q4);
  let kh = toBHTd(k4);
  let vh = toBHTd(heads(v));
  if (ctx.opts.fused) return fusedAttention(ctx, q4, k4, v, layer, scaling);
  const sqrtHd = Math.sqrt(HD);
  if (scaling.sqrtHeadDim === 'query') qh = g.o('Div', [qh, g.constScalar(sqrtHd, ACT)]);
  let scores = g.o('MatMul', [qh, g.o('Transpose', [kh], { perm: [0, 1, 3, 2] })]); // [B,H,T,S]
  if (half) scores = g.o('Cast', [scores], { to: F32 }); // softmax in fp32, as HF upcasts
  if (scaling.sqrtHeadDim === 'scores') scores = g.o('Div', [scores, g.constScalar(sqrtHd, F32)]);
  if (scaling.inverseLayer) scores = g.o('Div', [scores, g.constScalar(layer + 1, F32)]); // GLOBAL layer index
  let probs = g.o('Softmax', [g.o('Where', [ctx.mask.allowed, scores, ctx.mask.value])], { axis: -1 });
  if (half) probs = g.o('Cast', [probs], { to: ACT });
  const out = g.o('MatMul', [probs, vh]); // [B,H,T,hd]
  return g.o('Reshape', [g.o('Transpose', [out], { perm: [0, 2, 1, 3] }), g.constInt64([-1, D])]);
}

/** ORT's com.microsoft MultiHeadAttention: the same function in one kernel (mask as an additive bias). */
function fusedAttention(ctx: BlockContext, q4: string, k4: string, v: string, layer: number, scaling: AttentionScaling): string {
  const { g, spec, ACT } = ctx;
  const { heads: H, headDim: HD, dModel: D } = spec;
  const bias = additiveBias(ctx, ctx.mask);
  const flat = (t: string) => g.o('Reshape', [t, ctx.shapeBTD]); // [B,T,D]
  let scale = scaling.sqrtHeadDim !== 'none' ? 1 / Math.sqrt(HD) : 1;
  if (scaling.inverseLayer) scale /= layer + 1; // GLOBAL layer index
  const inputs = [flat(q4), flat(k4), flat(v), '', '', bias];
  const outputs: string[] = [`attn_${layer}`];
  g.op('MultiHeadAttention', inputs, { num_heads: H, scale: { float: scale } }, outputs, 'com.microsoft');
  return g.o('Reshape', [outputs[0], g.constInt64([-1, D])]);
}
