import type { WeightRef } from '../families/family.ts';
import type { StageContext } from './context.ts';

/**
 * One linear layer as one Gemm against the checkpoint's own weight layout: x [N, in] → [N, out].
 * torch Linear stores [out, in] (transB); GPT-2's Conv1D stores [in, out] (`conv1d`).
 */
export function linear(ctx: StageContext, x: string, w: WeightRef, b: WeightRef | null | undefined, conv1d: boolean): string {
  return ctx.g.o('Gemm', b ? [x, ctx.W(w), ctx.W(b)] : [x, ctx.W(w)], conv1d ? {} : { transB: 1 });
}
