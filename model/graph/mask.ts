import { ElemType } from '../onnx-builder.ts';
import type { StageContext } from './context.ts';

const FLOAT32_MIN = -3.4028234663852886e38;

/** The attention mask every block of a stage shares. */
export interface AttentionMask {
  /** allowed[b, 1, t, s]: query t may attend key s (padding and, for causal models, position). */
  readonly allowed: string;
  /** float32 value a masked score becomes before softmax. */
  readonly value: string;
  /** Additive [B, 1, T, S] bias (0 = attend, min = masked) for fused kernels: built on first use, then shared. */
  bias?: string;
}

export function attentionMask(ctx: StageContext): AttentionMask {
  const { g, spec, attentionMask, positionIds } = ctx;
  const maskBool = g.o('Cast', [attentionMask], { to: ElemType.BOOL });
  let allowed = g.o('Unsqueeze', [maskBool, g.constInt64([1, 2])]); // [B,1,1,S]
  if (spec.causal) {
    const total = g.o('Shape', [attentionMask], { start: 1, end: 2 }); // [S]
    const seq = g.o('Shape', [positionIds], { start: 1, end: 2 }); // [T]
    const past = g.o('Sub', [total, seq]);
    const scalar = (v: string) => g.o('Squeeze', [v, g.constInt64([0])]);
    const kpos = g.o('Range', [g.constInt64([0], []), scalar(total), g.constInt64([1], [])]);
    const qpos = g.o('Range', [scalar(past), scalar(total), g.constInt64([1], [])]);
    const causal = g.o('LessOrEqual', [g.o('Unsqueeze', [kpos, g.constInt64([0])]), g.o('Unsqueeze', [qpos, g.constInt64([1])])]); // [T,S]
    allowed = g.o('And', [allowed, causal]);
  }
  return { allowed, value: g.constScalar(FLOAT32_MIN, ctx.F32) };
}

/** The mask as an additive bias [B, 1, T, S], built once per stage. */
export function additiveBias(ctx: StageContext, mask: AttentionMask): string {
  if (mask.bias) return mask.bias;
  const { g, spec, positionIds, ACT } = ctx;
  // MultiHeadAttention wants the query axis spelled out: the encoder's [B,1,1,S] mask is expanded to [B,1,T,S].
  const full = spec.causal ? mask.allowed : g.o('Expand', [mask.allowed, g.o('Concat', [g.o('Shape', [positionIds], { start: 0, end: 1 }), g.constInt64([1]), g.o('Shape', [positionIds], { start: 1, end: 2 }), g.o('Shape', [positionIds], { start: 1, end: 2 })], { axis: 0 })]);
  mask.bias = g.o('Where', [full, g.constScalar(0, ACT), ctx.half ? g.constScalar(-65504, ACT) : mask.value]);
  return mask.bias;
}
