import { attention } from '../graph/attention.ts';
import { linear } from '../graph/linear.ts';
import { addNorm, layerNorm, mlp, type MlpWeights } from '../graph/ops.ts';
import type { EmbedWeights, ModelFamily, NormRefs, WeightRef } from './family.ts';
import { GPT_LEGACY_BUFFERS, GPT_TOKENIZER, gptGraph, gptKeyPrefix, gptStageWeights, gptSyntheticFields, isGptNormWeight, refMaker, type GptHead } from './gpt-common.ts';

/** GPT-2's weights are Conv1D: [in, out]. */
export interface Gpt2Block extends MlpWeights {
  ln1: NormRefs;
  ln2: NormRefs;
  out: WeightRef;
  outBias: WeightRef;
  /** One fused c_attn [D, 3D] + bias. */
  qkv: { weight: WeightRef; bias: WeightRef };
}

/** GPT-2 (and BioMedLM): pre-LN blocks, sequential residual, fused c_attn, learned positions, tied head. */
export const gpt2: ModelFamily<EmbedWeights, Gpt2Block, GptHead> = {
  name: 'gpt2',
  modelTypes: [{ type: 'gpt2' }],

  normalize(r) {
    const dModel = r.need<number>(['n_embd'], 'hidden size');
    const heads = r.need<number>(['n_head'], 'attention heads');
    return {
      family: 'gpt2', causal: true,
      blocks: r.need<number>(['n_layer'], 'number of blocks'), dModel, heads, headDim: r.headDim(dModel, heads),
      inner: r.opt('n_inner', 4 * dModel), vocab: r.need<number>(['vocab_size'], 'vocabulary size'),
      maxPositions: r.need<number>(['n_positions', 'n_ctx'], 'context length'), eps: r.opt('layer_norm_epsilon', 1e-5),
      activation: r.activation(r.opt('activation_function', 'gelu_new')), positions: 'learned', rotaryDim: 0,
      scaleAttnWeights: r.opt('scale_attn_weights', true), scaleAttnByInverseLayerIdx: r.opt('scale_attn_by_inverse_layer_idx', false),
      tiedHead: r.opt('tie_word_embeddings', true), headBias: false, keyLayout: 'hf',
    };
  },

  keyPrefix: gptKeyPrefix,
  weights(spec, range, prefix) {
    const { dModel: D, inner: I } = spec;
    const { w, norm } = refMaker(spec, prefix);
    // Field order is the order refs are listed (and synthetic checkpoints written).
    return gptStageWeights(spec, range, prefix, (i) => {
      const b = `h.${i}.`;
      return {
        ln1: norm(`${b}ln_1`), ln2: norm(`${b}ln_2`),
        out: w(`${b}attn.c_proj.weight`, D, D), outBias: w(`${b}attn.c_proj.bias`, D),
        fcIn: w(`${b}mlp.c_fc.weight`, D, I), fcInBias: w(`${b}mlp.c_fc.bias`, I),
        fcOut: w(`${b}mlp.c_proj.weight`, I, D), fcOutBias: w(`${b}mlp.c_proj.bias`, D),
        qkv: { weight: w(`${b}attn.c_attn.weight`, D, 3 * D), bias: w(`${b}attn.c_attn.bias`, 3 * D) },
      };
    });
  },
  legacyBuffers: GPT_LEGACY_BUFFERS,

  ...gptGraph,
  block(ctx, x, b, layer) {
    const { g, spec } = ctx;
    const selfAttention = (h: string) => {
      const D = spec.dModel;
      const [q, k, v] = g.op('Split', [linear(ctx, h, b.qkv.weight, b.qkv.bias, true), g.constInt64([D, D, D])], { axis: 1 }, 3);
      const scaling = { sqrtHeadDim: spec.scaleAttnWeights ? 'scores' : 'none', inverseLayer: spec.scaleAttnByInverseLayerIdx } as const;
      return linear(ctx, attention(ctx, q, k, v, layer, scaling), b.out, b.outBias, true);
    };
    // Pre-LN, sequential residual: x + attn(ln_1(x)), then + mlp(ln_2(·)).
    const { sum, normed } = addNorm(ctx, x, selfAttention(layerNorm(ctx, x, b.ln1)), b.ln2);
    return g.o('Add', [sum, mlp(ctx, normed, b, true)]);
  },

  tokenizer: GPT_TOKENIZER,
  synthetic: {
    config: (s) => ({ model_type: 'gpt2', architectures: ['GPT2LMHeadModel'], ...gptSyntheticFields(s), scale_attn_weights: true }),
    isNormWeight: isGptNormWeight,
    presets: {
      'gpt2-small': { family: 'gpt2', blocks: 12, dModel: 768, heads: 12, vocab: 50257, maxPositions: 1024 },
      biomedlm: { family: 'gpt2', blocks: 4, dModel: 2560, heads: 20, vocab: 28896, maxPositions: 1024 },
    },
  },
};
