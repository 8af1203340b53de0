import type { StageContext } from './context.ts';

/** sin/cos of position × inv_freq, gathered by position id: [B, T, 1, rotary_dim/2, 1]. */
export interface RotaryInputs {
  sin: string;
  cos: string;
}

/** GPT-J's create_sinusoidal_positions, step by step in float32 as torch computes it. */
export function rotaryTables(maxPositions: number, rotaryDim: number): { sin: Float32Array; cos: Float32Array } {
  const f = Math.fround;
  const halfDim = rotaryDim / 2;
  const invFreq = Array.from({ length: halfDim }, (_, i) => f(1 / f(Math.pow(10000, f((2 * i) / rotaryDim)))));
  const sin = new Float32Array(maxPositions * halfDim);
  const cos = new Float32Array(maxPositions * halfDim);
  for (let p = 0; p < maxPositions; p++) {
    for (let i = 0; i < halfDim; i++) {
      const angle = f(p * invFreq[i]);
      sin[p * halfDim + i] = Math.sin(angle);
      cos[p * halfDim + i] = Math.cos(angle);
    }
  }
  return { sin, cos };
}

/** The stage's rotary tables (one pair for every block), gathered by the position ids. */
export function rotaryInputs(ctx: StageContext): RotaryInputs {
  const { g, spec, half, ACT, F32 } = ctx;
  const { sin, cos } = rotaryTables(spec.maxPositions, spec.rotaryDim);
  const table = (name: string, data: Float32Array) => {
    const t = g.weight(name, F32, [spec.maxPositions, spec.rotaryDim / 2], () => new Uint8Array(data.buffer));
    const gathered = g.o('Gather', [t, ctx.positionIds], { axis: 0 }); // [B,T,rd/2]
    const u = g.o('Unsqueeze', [gathered, g.constInt64([2, 4])]); // [B,T,1,rd/2,1]
    return half ? g.o('Cast', [u], { to: ACT }) : u;
  };
  return { sin: table('rotary.sin', sin), cos: table('rotary.cos', cos) };
}

/** GPT-J's rotate_every_two on the first rotary_dim dims of each head of t [B,T,H,hd]: pairs (2i, 2i+1) rotate together. */
export function applyRotary(ctx: StageContext, t: string, rotary: RotaryInputs): string {
  const { g } = ctx;
  const rd = ctx.spec.rotaryDim;
  const HD = ctx.spec.headDim;
  const rot = rd === HD ? t : g.o('Slice', [t, g.constInt64([0]), g.constInt64([rd]), g.constInt64([3])]);
  const pairs = g.o('Reshape', [rot, g.constInt64([0, 0, 0, -1, 2])]);
  const [even, odd] = g.op('Split', [pairs, g.constInt64([1, 1])], { axis: 4 }, 2);
  const { sin, cos } = rotary;
  const outEven = g.o('Sub', [g.o('Mul', [even, cos]), g.o('Mul', [odd, sin])]);
  const outOdd = g.o('Add', [g.o('Mul', [odd, cos]), g.o('Mul', [even, sin])]);
  const rotated = g.o('Reshape', [g.o('Concat', [outEven, outOdd], { axis: 4 }), g.constInt64([0, 0, 0, rd])]);
  if (rd === HD) return rotated;
  const pass = g.o('Slice', [t, g.constInt64([rd]), g.constInt64([HD]), g.constInt64([3])]);
  return g.o('Concat', [rotated, pass], { axis: 3 });
}
