import type { ModelSpec } from './config.ts';
import type { BlockRange } from './range.ts';
import { checkRange } from './range.ts';
import { float32ToFloat16 } from './dtype.ts';
import { ElemType, GraphBuilder, type WeightSink } from './onnx-builder.ts';
import { stageWeights, type BlockWeights, type WeightRef } from './layout.ts';

export type WeightDType = 'float32' | 'float16';

/** Where a stage's weights come from: a checkpoint, or synthetic values for shape checks and benches. */
export interface WeightSource {
  readFloat32(key: string, shape: number[]): Float32Array;
  /** Prefix of the HF keys (`transformer.`, `distilbert.`, or ''). */
  readonly prefix: string;
}

export interface StageGraphOptions {
  dtype: WeightDType;
  /**
   * Use ONNX Runtime's fused contrib kernels (com.microsoft MultiHeadAttention, SkipLayerNormalization) instead of
   * the op-by-op attention and residual+norm. Same function, checked against the same fixtures.
   */
  fused?: boolean;
}

/** The I/O names of a stage graph: the contract between the builder, the executor and the wire. */
export const IO = {
  inputIds: 'input_ids',
  hiddenIn: 'hidden_states',
  hiddenOut: 'next_hidden_states',
  positionIds: 'position_ids',
  attentionMask: 'attention_mask',
  logitPositions: 'logits_positions',
  logits: 'logits',
  lastHidden: 'last_hidden_state',
  pastKey: (layer: number) => `past_key_${layer}`,
  pastValue: (layer: number) => `past_value_${layer}`,
  presentKey: (layer: number) => `present_key_${layer}`,
  presentValue: (layer: number) => `present_value_${layer}`,
} as const;

/** Bump when the graph a given checkpoint/range/dtype produces changes, so disk caches rebuild. */
export const GRAPH_VERSION = 3;

const FLOAT32_MIN = -3.4028234663852886e38;

/**
 * Builds the ONNX graph of blocks `[first, last)` of a model, exactly as Hugging Face computes them:
 * embeddings when first == 0, final norm + head when last == blocks. Hidden states stay [B·T, D] inside so every
 * linear layer is one Gemm against the checkpoint's own weight layout (transB for torch Linear, none for Conv1D).
 */
export function buildStageGraph(spec: ModelSpec, range: BlockRange, source: WeightSource, sink: WeightSink, opts: StageGraphOptions): { model: Uint8Array; paramBytes: number } {
  checkRange(range, spec.blocks);
  const g = new GraphBuilder(sink);
  const sw = stageWeights(spec, range, source.prefix);
  const half = opts.dtype === 'float16';
  const ACT = half ? ElemType.FLOAT16 : ElemType.FLOAT;
  const F32 = ElemType.FLOAT;
  const { dModel: D, heads: H, headDim: HD } = spec;

  const readBytes = (ref: WeightRef, keepF32 = false): Uint8Array => {
    const w = source.readFloat32(ref.key, ref.shape);
    const out = half && !keepF32 ? float32ToFloat16(w) : w;
    return new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
  };
  const W = (ref: WeightRef) => g.weight(ref.key, ACT, ref.shape, () => readBytes(ref));
  /** Layer-norm parameters stay float32: norms are computed in fp32 even in fp16 stages. */
  const W32 = (ref: WeightRef) => g.weight(ref.key, F32, ref.shape, () => readBytes(ref, true));

  const layerNorm = (x: string, [w, b]: [WeightRef, WeightRef]) => {
    const eps = { float: spec.eps };
    if (!half) return g.o('LayerNormalization', [x, W32(w), W32(b)], { axis: -1, epsilon: eps });
    const y = g.o('LayerNormalization', [g.o('Cast', [x], { to: F32 }), W32(w), W32(b)], { axis: -1, epsilon: eps });
    return g.o('Cast', [y], { to: ACT });
  };
  /** torch Linear stores [out, in] (transB); GPT-2's Conv1D stores [in, out]. */
  const linear = (x: string, w: WeightRef, b: WeightRef | null | undefined, conv1d: boolean) =>
    g.o('Gemm', b ? [x, W(w), W(b)] : [x, W(w)], conv1d ? {} : { transB: 1 });
  const activation = (x: string) =>
    spec.activation === 'relu' ? g.o('Relu', [x]) : g.o('Gelu', [x], { approximate: spec.activation === 'gelu_tanh' ? 'tanh' : 'none' });

  // ---- inputs and shapes ----
  const first = range.first === 0;
  const lastStage = range.last === spec.blocks;
  const positionIds = g.input(IO.positionIds, ElemType.INT64, ['batch', 'seq']);
  const attentionMask = g.input(IO.attentionMask, ElemType.INT64, ['batch', spec.causal ? 'total_seq' : 'seq']);
  const bt = g.o('Shape', [positionIds]); // [B, T]
  const shapeBTD = g.o('Concat', [bt, g.constInt64([D])], { axis: 0 });
  const shapeBTHd = g.o('Concat', [bt, g.constInt64([H, HD])], { axis: 0 });

  let x: string; // [B·T, D]
  if (first) {
    const ids = g.input(IO.inputIds, ElemType.INT64, ['batch', 'seq']);
    const e = sw.embed!;
    let emb = g.o('Gather', [W(e.tokens), ids], { axis: 0 });
    if (e.positions) emb = g.o('Add', [emb, g.o('Gather', [W(e.positions), positionIds], { axis: 0 })]);
    x = g.o('Reshape', [emb, g.constInt64([-1, D])]);
    if (e.norm) x = layerNorm(x, e.norm);
  } else {
    const h = g.input(IO.hiddenIn, ACT, ['batch', 'seq', D]);
    x = g.o('Reshape', [h, g.constInt64([-1, D])]);
  }

  // ---- attention mask, shared by every block: allowed[b, 1, t, s] ----
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
  const maskValue = g.constScalar(FLOAT32_MIN, F32);

  // ---- rotary tables (GPT-J): sin/cos of position × inv_freq, gathered by position id ----
  let rotary: { sin: string; cos: string } | null = null;
  if (spec.positions === 'rotary') {
    const { sin, cos } = rotaryTables(spec.maxPositions, spec.rotaryDim);
    const table = (name: string, data: Float32Array) => {
      const t = g.weight(name, F32, [spec.maxPositions, spec.rotaryDim / 2], () => new Uint8Array(data.buffer));
      const gathered = g.o('Gather', [t, positionIds], { axis: 0 }); // [B,T,rd/2]
      const u = g.o('Unsqueeze', [gathered, g.constInt64([2, 4])]); // [B,T,1,rd/2,1]
      return half ? g.o('Cast', [u], { to: ACT }) : u;
    };
    rotary = { sin: table('rotary.sin', sin), cos: table('rotary.cos', cos) };
  }
  const applyRotary = (t: string) => {
    // GPT-J's rotate_every_two on the first rotary_dim dims of each head: pairs (2i, 2i+1) rotate together.
    const rd = spec.rotaryDim;
    const rot = rd === HD ? t : g.o('Slice', [t, g.constInt64([0]), g.constInt64([rd]), g.constInt64([3])]);
    const pairs = g.o('Reshape', [rot, g.constInt64([0, 0, 0, -1, 2])]);
    const [even, odd] = g.op('Split', [pairs, g.constInt64([1, 1])], { axis: 4 }, 2);
    const { sin, cos } = rotary!;
    const outEven = g.o('Sub', [g.o('Mul', [even, cos]), g.o('Mul', [odd, sin])]);
    const outOdd = g.o('Add', [g.o('Mul', [odd, cos]), g.o('Mul', [even, sin])]);
    const rotated = g.o('Reshape', [g.o('Concat', [outEven, outOdd], { axis: 4 }), g.constInt64([0, 0, 0, rd])]);
    if (rd === HD) return rotated;
    const pass = g.o('Slice', [t, g.constInt64([rd]), g.constInt64([HD]), g.constInt64([3])]);
    return g.o('Concat', [rotated, pass], { axis: 3 });
  };

  // Fused path: the mask becomes an additive bias [B, 1, T, S] shared by every layer (0 = attend, min = masked).
  let attentionBias = '';
  const fusedAttention = (q4: string, k4: string, v: string, layer: number): string => {
    if (!attentionBias) {
      // MultiHeadAttention wants the query axis spelled out: the encoder's [B,1,1,S] mask is expanded to [B,1,T,S].
      const full = spec.causal ? allowed : g.o('Expand', [allowed, g.o('Concat', [g.o('Shape', [positionIds], { start: 0, end: 1 }), g.constInt64([1]), g.o('Shape', [positionIds], { start: 1, end: 2 }), g.o('Shape', [positionIds], { start: 1, end: 2 })], { axis: 0 })]);
      attentionBias = g.o('Where', [full, g.constScalar(0, ACT), half ? g.constScalar(-65504, ACT) : maskValue]);
    }
    const flat = (t: string) => g.o('Reshape', [t, shapeBTD]); // [B,T,D]
    let scale = spec.scaleAttnWeights || spec.family === 'distilbert' ? 1 / Math.sqrt(HD) : 1;
    if (spec.scaleAttnByInverseLayerIdx) scale /= layer + 1; // GLOBAL layer index
    const inputs = [flat(q4), flat(k4), flat(v), '', '', attentionBias];
    const outputs: string[] = [`attn_${layer}`];
    if (spec.causal) {
      inputs.push(g.input(IO.pastKey(layer), ACT, ['batch', H, 'past_seq', HD]), g.input(IO.pastValue(layer), ACT, ['batch', H, 'past_seq', HD]));
      outputs.push(`present_key_raw_${layer}`, `present_value_raw_${layer}`);
    }
    g.op('MultiHeadAttention', inputs, { num_heads: H, scale: { float: scale } }, outputs, 'com.microsoft');
    if (spec.causal) {
      g.output(outputs[1], IO.presentKey(layer), ACT, ['batch', H, 'total_seq', HD]);
      g.output(outputs[2], IO.presentValue(layer), ACT, ['batch', H, 'total_seq', HD]);
    }
    return g.o('Reshape', [outputs[0], g.constInt64([-1, D])]);
  };

  /** residual + norm; the fused kernel also returns the sum (4th output) for the next residual. */
  const addNorm = (x: string, y: string, norm: [WeightRef, WeightRef]): { sum: string; normed: string } => {
    if (!opts.fused || half) {
      const sum = g.o('Add', [x, y]);
      return { sum, normed: layerNorm(sum, norm) };
    }
    const [normed, , , sum] = g.op('SkipLayerNormalization', [y, x, W32(norm[0]), W32(norm[1])], { epsilon: { float: spec.eps } }, 4, 'com.microsoft');
    return { sum, normed };
  };

  const attention = (h: string, b: BlockWeights, layer: number): string => {
    let q: string, k: string, v: string;
    if ('fused' in b.qkv) {
      [q, k, v] = g.op('Split', [linear(h, b.qkv.fused, b.qkv.bias, true), g.constInt64([D, D, D])], { axis: 1 }, 3);
    } else {
      q = linear(h, b.qkv.q, b.qkv.qb, false);
      k = linear(h, b.qkv.k, b.qkv.kb, false);
      v = linear(h, b.qkv.v, b.qkv.vb, false);
    }
    const heads = (t: string) => g.o('Reshape', [t, shapeBTHd]); // [B,T,H,hd]
    let [q4, k4] = [heads(q), heads(k)];
    if (rotary) [q4, k4] = [applyRotary(q4), applyRotary(k4)];
    const toBHTd = (t: string) => g.o('Transpose', [t], { perm: [0, 2, 1, 3] });
    let qh = toBHTd(q4);
    let kh = toBHTd(k4);
    let vh = toBHTd(heads(v));
    if (opts.fused) return linear(fusedAttention(q4, k4, v, layer), b.out, b.outBias, b.conv1d);
    if (spec.causal) {
      const pk = g.input(IO.pastKey(layer), ACT, ['batch', H, 'past_seq', HD]);
      const pv = g.input(IO.pastValue(layer), ACT, ['batch', H, 'past_seq', HD]);
      kh = g.o('Concat', [pk, kh], { axis: 2 });
      vh = g.o('Concat', [pv, vh], { axis: 2 });
      g.output(kh, IO.presentKey(layer), ACT, ['batch', H, 'total_seq', HD]);
      g.output(vh, IO.presentValue(layer), ACT, ['batch', H, 'total_seq', HD]);
    }
    // Scale where each HF implementation does: DistilBERT scales q first, GPT-2/GPT-J divide the scores.
    const sqrtHd = Math.sqrt(HD);
    if (spec.family === 'distilbert') qh = g.o('Div', [qh, g.constScalar(sqrtHd, ACT)]);
    let scores = g.o('MatMul', [qh, g.o('Transpose', [kh], { perm: [0, 1, 3, 2] })]); // [B,H,T,S]
    if (half) scores = g.o('Cast', [scores], { to: F32 }); // softmax in fp32, as HF upcasts
    if (spec.family !== 'distilbert' && spec.scaleAttnWeights) scores = g.o('Div', [scores, g.constScalar(sqrtHd, F32)]);
    if (spec.scaleAttnByInverseLayerIdx) scores = g.o('Div', [scores, g.constScalar(layer + 1, F32)]); // GLOBAL layer index
    let probs = g.o('Softmax', [g.o('Where', [allowed, scores, maskValue])], { axis: -1 });
    if (half) probs = g.o('Cast', [probs], { to: ACT });
    const ctx = g.o('MatMul', [probs, vh]); // [B,H,T,hd]
    const merged = g.o('Reshape', [g.o('Transpose', [ctx], { perm: [0, 2, 1, 3] }), g.constInt64([-1, D])]);
    return linear(merged, b.out, b.outBias, b.conv1d);
  };
  const mlp = (h: string, b: BlockWeights) => linear(activation(linear(h, b.fcIn, b.fcInBias, b.conv1d)), b.fcOut, b.fcOutBias, b.conv1d);

  sw.blocks.forEach((b, i) => {
    const layer = range.first + i;
    if (spec.family === 'gpt2') {
      const { sum, normed } = addNorm(x, attention(layerNorm(x, b.ln1), b, layer), b.ln2!);
      x = g.o('Add', [sum, mlp(normed, b)]);
    } else if (spec.family === 'gptj') {
      // Parallel residual: attention and MLP both read ln_1's output.
      const h = layerNorm(x, b.ln1);
      x = g.o('Add', [g.o('Add', [attention(h, b, layer), mlp(h, b)]), x]);
    } else {
      // DistilBERT is post-LN.
      const sa = addNorm(x, attention(x, b, layer), b.ln1).normed;
      x = addNorm(sa, mlp(sa, b), b.ln2!).normed;
    }
  });

  if (lastStage) {
    const head = sw.head!;
    // Only the requested positions go through the head (generation needs just the last one).
    const positions = g.input(IO.logitPositions, ElemType.INT64, ['rows']);
    let h = head.norm ? layerNorm(x, head.norm) : x;
    // HF's base-model last_hidden_state (after the final norm for GPT), for embeddings.
    g.output(g.o('Reshape', [h, shapeBTD]), IO.lastHidden, ACT, ['batch', 'seq', D]);
    const picked = g.o('Gather', [g.o('Reshape', [h, shapeBTD]), positions], { axis: 1 }); // [B,R,D]
    h = g.o('Reshape', [picked, g.constInt64([-1, D])]);
    if (head.transform) h = layerNorm(activation(linear(h, head.transform.weight, head.transform.bias, false)), head.transform.norm);
    let logits = linear(h, head.weight, head.bias, false);
    if (half) logits = g.o('Cast', [logits], { to: F32 });
    const shapeBRV = g.o('Concat', [g.o('Shape', [positionIds], { start: 0, end: 1 }), g.o('Shape', [positions]), g.constInt64([spec.vocab])], { axis: 0 });
    g.output(g.o('Reshape', [logits, shapeBRV]), IO.logits, F32, ['batch', 'rows', spec.vocab]);
  } else {
    g.output(g.o('Reshape', [x, shapeBTD]), IO.hiddenOut, ACT, ['batch', 'seq', D]);
  }

  const model = g.encode(`strata_${spec.family}_${range.first}_${range.last}`, { '': 20, ...(opts.fused ? { 'com.microsoft': 1 } : {}) }, {
    'strata.fused': String(!!opts.fused),
    'strata.family': spec.family,
    'strata.range': `${range.first},${range.last}`,
    'strata.dtype': opts.dtype,
  });
  return { model, paramBytes: g.paramBytes };
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
