import type { ModelSpec } from './config.ts';
import type { BlockRange } from './range.ts';
import { checkRange } from './range.ts';
import { ElemType, GraphBuilder, type WeightSink } from './onnx-builder.ts';
import { familyNamed } from './families/index.ts';
import { stageContext, type BlockContext, type StageGraphOptions, type WeightSource } from './graph/context.ts';
import { IO } from './graph/io.ts';
import { isQuantized } from './dtype.ts';
import { attentionMask } from './graph/mask.ts';
import { rotaryInputs } from './graph/rotary.ts';

export { IO } from './graph/io.ts';
export { rotaryTables } from './graph/rotary.ts';
export type { StageGraphOptions, WeightDType, WeightSource } from './graph/context.ts';

/** Bump when the graph a given checkpoint/range/dtype produces changes, so disk caches rebuild. */
export const GRAPH_VERSION = 15; // 4: decoders keep KV in fixed slots (GroupQueryAttention per batch row); 5: host slots get the new K/V as outputs; 6: host slots attended by plain ops; 7: host rows 1… behind an If (batch > 1); 8: rows 1…' plans too (constants at batch 1); 9: batch 1 attends row 0 as it is; 10: host slots score K·qᵀ; 11: q·Kᵀ again, q scaled first (MLAS's one-row kernel); 12: device slots take each row's plan as inputs; 13: a one-row graph attends row 0 as it is, each row's slot capacity read once; 14: the last stage's greedy tokens (next_tokens); 15: batches of two or more attend the new tokens once for the whole batch, each row only its own slot

/**
 * Builds the ONNX graph of blocks `[first, last)` of a model, exactly as Hugging Face computes them:
 * embeddings when first == 0, final norm + head when last == blocks. The spec's family (model/families) supplies
 * the pieces; this driver owns the stage's I/O. Hidden states stay [B·T, D] inside so every linear layer is one
 * Gemm against the checkpoint's own weight layout (transB for torch Linear, none for Conv1D).
 */
export function buildStageGraph(spec: ModelSpec, range: BlockRange, source: WeightSource, sink: WeightSink, opts: StageGraphOptions): { model: Uint8Array; paramBytes: number } {
  checkRange(range, spec.blocks);
  const family = familyNamed(spec.family);
  const g = new GraphBuilder(sink);
  const sw = family.weights(spec, range, source.prefix);
  const ctx = stageContext(g, spec, source, opts);
  const { ACT, F32 } = ctx;
  const D = spec.dModel;

  let x: string; // [B·T, D]
  if (range.first === 0) {
    x = family.embed(ctx, g.input(IO.inputIds, ElemType.INT64, ['batch', 'seq']), sw.embed!);
  } else {
    const h = g.input(IO.hiddenIn, ACT, ['batch', 'seq', D]);
    x = g.o('Reshape', [h, g.constInt64([-1, D])]);
  }

  // Shared by every block: the attention mask, and rotary tables when positions are rotary.
  const mask = attentionMask(ctx);
  const block: BlockContext = { ...ctx, mask, rotary: spec.positions === 'rotary' ? rotaryInputs(ctx) : null };
  sw.blocks.forEach((b, i) => {
    x = family.block(block, x, b, range.first + i);
  });

  if (range.last === spec.blocks) {
    // Only the requested positions go through the head (generation needs just the last one).
    const positions = g.input(IO.logitPositions, ElemType.INT64, ['rows']);
    let h = family.finalNorm(ctx, x, sw.head!);
    // HF's base-model last_hidden_state (after the final norm for GPT), for embeddings.
    g.output(g.o('Reshape', [h, ctx.shapeBTD]), IO.lastHidden, ACT, ['batch', 'seq', D]);
    const picked = g.o('Gather', [g.o('Reshape', [h, ctx.shapeBTD]), positions], { axis: 1 }); // [B,R,D]
    h = g.o('Reshape', [picked, g.constInt64([-1, D])]);
    let logits = family.lmHead(ctx, h, sw.head!);
    if (ctx.half) logits = g.o('Cast', [logits], { to: F32 });
    const shapeBRV = g.o('Concat', [g.o('Shape', [ctx.positionIds], { start: 0, end: 1 }), g.o('Shape', [positions]), g.constInt64([spec.vocab])], { axis: 0 });
    const rows = g.o('Reshape', [logits, shapeBRV]);
    g.output(rows, IO.logits, F32, ['batch', 'rows', spec.vocab]);
    // The greedy token of each row, the first index of the largest logit as sampling.ts's argmax (a row whose first
    // logit is NaN aside: ORT keeps index 0 there): a greedy step fetches this instead of the logits, which cost a
    // copy out of ORT, another per batch row and a 45 µs scan in JavaScript per row (50,257 of them for GPT-2).
    g.output(g.o('ArgMax', [rows], { axis: -1, keepdims: 0, select_last_index: 0 }), IO.nextTokens, ElemType.INT64, ['batch', 'rows']);
  } else {
    g.output(g.o('Reshape', [x, ctx.shapeBTD]), IO.hiddenOut, ACT, ['batch', 'seq', D]);
  }

  const model = g.encode(`strata_${spec.family}_${range.first}_${range.last}`, { '': 20, ...(opts.fused || spec.causal || isQuantized(opts.dtype) ? { 'com.microsoft': 1 } : {}) }, {
    'strata.fused': String(!!opts.fused),
    'strata.family': spec.family,
    'strata.range': `${range.first},${range.last}`,
    'strata.dtype': opts.dtype,
  });
  return { model, paramBytes: g.paramBytes };
}
