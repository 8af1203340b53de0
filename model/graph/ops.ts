import type { EmbedWeights, NormRefs, WeightRef } from '../families/family.ts';
import type { StageContext } from './context.ts';
import { gatherRows, linear } from './linear.ts';

/** LayerNormalization over the last axis, computed in float32 (an fp16 stage casts around it). */
export function layerNorm(ctx: StageContext, x: string, [w, b]: NormRefs): string {
  const { g, half, F32, ACT } = ctx;
  const eps = { float: ctx.spec.eps };
  if (!half) return g.o('LayerNormalization', [x, ctx.W32(w), ctx.W32(b)], { axis: -1, epsilon: eps });
  const y = g.o('LayerNormalization', [g.o('Cast', [x], { to: F32 }), ctx.W32(w), ctx.W32(b)], { axis: -1, epsilon: eps });
  return g.o('Cast', [y], { to: ACT });
}

/** The spec's MLP activation. */
export function activation(ctx: StageContext, x: string): string {
  const a = ctx.spec.activation;
  return a === 'relu' ? ctx.g.o('Relu', [x]) : ctx.g.o('Gelu', [x], { approximate: a === 'gelu_tanh' ? 'tanh' : 'none' });
}

/** residual + norm; the fused kernel also returns the sum (4th output) for the next residual. */
export function addNorm(ctx: StageContext, x: string, y: string, norm: NormRefs): { sum: string; normed: string } {
  const { g } = ctx;
  if (!ctx.opts.fused || ctx.half) {
    const sum = g.o('Add', [x, y]);
    return { sum, normed: layerNorm(ctx, sum, norm) };
  }
  const [normed, , , sum] = g.op('SkipLayerNormalization', [y, x, ctx.W32(norm[0]), ctx.W32(norm[1])], { epsilon: { float: ctx.spec.eps } }, 4, 'com.microsoft');
  return { sum, normed };
}

export interface MlpWeights {
  fcIn: WeightRef;
  fcInBias: WeightRef;
  fcOut: WeightRef;
  fcOutBias: WeightRef;
}

/** fc_out(act(fc_in(h))). */
export function mlp(ctx: StageContext, h: string, w: MlpWeights, conv1d: boolean): string {
  return linear(ctx, activation(ctx, linear(ctx, h, w.fcIn, w.fcInBias, conv1d)), w.fcOut, w.fcOutBias, conv1d);
}

/** Token rows (+ learned position rows) → [B·T, D]. */
export function embedTokens(ctx: StageContext, inputIds: string, e: EmbedWeights): string {
  const { g } = ctx;
  let emb = gatherRows(ctx, e.tokens, inputIds);
  if (e.positions) emb = g.o('Add', [emb, g.o('Gather', [ctx.W(e.positions), ctx.positionIds], { axis: 0 })]);
  return g.o('Reshape', [emb, g.constInt64([-1, ctx.spec.dModel])]);
}
