import { StrataError } from '../errors.ts';
import { attention } from '../graph/attention.ts';
import { linear } from '../graph/linear.ts';
import { layerNorm, mlp, type MlpWeights } from '../graph/ops.ts';
import type { EmbedWeights, ModelFamily, NormRefs, WeightRef } from './family.ts';
import { GPT_LEGACY_BUFFERS, GPT_TOKENIZER, gptGraph, gptKeyPrefix, gptStageWeights, gptSyntheticFields, isGptNormWeight, refMaker, type GptHead } from './gpt-common.ts';

/** GPT-J's weights are torch Linear: [out, in]; q/k/v/out have no bias. */
export interface GptjBlock extends MlpWeights {
  ln1: NormRefs;
  out: WeightRef;
  q: WeightRef;
  k: WeightRef;
  v: WeightRef;
}

/**
 * GPT-J: one norm per block, parallel residual (attention and MLP both read ln_1), rotary positions on the first
 * rotary_dim dims of each head, untied head with a bias. Also GPT-J-6B as it first shipped: a gpt_neo config with
 * `"rotary": true` and finetuneanon's fork key names (`attn.attention.*`, `mlp.c_fc/c_proj`).
 */
export const gptj: ModelFamily<EmbedWeights, GptjBlock, GptHead> = {
  name: 'gptj',
  modelTypes: [{ type: 'gptj' }, { type: 'gpt_neo', note: 'with "rotary": true' }],

  normalize(r) {
    const neoRotary = r.modelType === 'gpt_neo';
    if (neoRotary && r.raw.rotary !== true) r.unsupported('a gpt_neo config runs only as GPT-J, with "rotary": true');
    const dModel = r.need<number>(neoRotary ? ['hidden_size'] : ['n_embd'], 'hidden size');
    const heads = r.need<number>(neoRotary ? ['num_heads'] : ['n_head'], 'attention heads');
    const headDim = r.headDim(dModel, heads);
    const rotaryDim = r.opt<number | null>('rotary_dim', null) ?? headDim;
    if (rotaryDim % 2 !== 0 || rotaryDim > headDim) throw new StrataError('config_bad_rotary', `rotary_dim ${rotaryDim} must be even and at most the head size ${headDim}`);
    return {
      family: 'gptj', causal: true,
      blocks: r.need<number>(neoRotary ? ['num_layers'] : ['n_layer'], 'number of blocks'), dModel, heads, headDim,
      inner: r.opt<number | null>(neoRotary ? 'intermediate_size' : 'n_inner', null) ?? 4 * dModel,
      vocab: r.need<number>(['vocab_size'], 'vocabulary size'),
      maxPositions: r.need<number>(neoRotary ? ['max_position_embeddings'] : ['n_positions'], 'context length'),
      eps: r.opt('layer_norm_epsilon', 1e-5), activation: r.activation(r.opt('activation_function', 'gelu_new')),
      positions: 'rotary', rotaryDim, scaleAttnWeights: true, scaleAttnByInverseLayerIdx: false,
      tiedHead: false, headBias: true, keyLayout: neoRotary ? 'neo-fork' : 'hf',
    };
  },

  keyPrefix: gptKeyPrefix,
  weights(spec, range, prefix) {
    const { dModel: D, inner: I } = spec;
    const { w, norm } = refMaker(spec, prefix);
    const fork = spec.keyLayout === 'neo-fork';
    // Field order is the order refs are listed (and synthetic checkpoints written).
    return gptStageWeights(spec, range, prefix, (i) => {
      const b = `h.${i}.`;
      const attn = fork ? `${b}attn.attention.` : `${b}attn.`;
      const [fcIn, fcOut] = fork ? ['c_fc', 'c_proj'] : ['fc_in', 'fc_out'];
      return {
        ln1: norm(`${b}ln_1`),
        out: w(`${attn}out_proj.weight`, D, D),
        fcIn: w(`${b}mlp.${fcIn}.weight`, I, D), fcInBias: w(`${b}mlp.${fcIn}.bias`, I),
        fcOut: w(`${b}mlp.${fcOut}.weight`, D, I), fcOutBias: w(`${b}mlp.${fcOut}.bias`, D),
        q: w(`${attn}q_proj.weight`, D, D), k: w(`${attn}k_proj.weight`, D, D), v: w(`${attn}v_proj.weight`, D, D),
      };
    });
  },
  legacyBuffers: GPT_LEGACY_BUFFERS,

  ...gptGraph,
  block(ctx, x, b, layer) {
    const { g } = ctx;
    const selfAttention = (h: string) => {
      const [q, k, v] = [linear(ctx, h, b.q, null, false), linear(ctx, h, b.k, null, false), linear(ctx, h, b.v, null, false)];
      return linear(ctx, attention(ctx, q, k, v, layer, { sqrtHeadDim: 'scores', inverseLayer: false }), b.out, null, false);
    };
    // Parallel residual: attention and MLP both read ln_1's output.
    const h = layerNorm(ctx, x, b.ln1);
    return g.o('Add', [g.o('Add', [selfAttention(h), mlp(ctx, h, b, false)]), x]);
  },

  tokenizer: GPT_TOKENIZER,
  synthetic: {
    config: (s) => ({ model_type: 'gptj', architectures: ['GPTJForCausalLM'], ...gptSyntheticFields(s), rotary_dim: s.rotaryDim ?? 64, tie_word_embeddings: false }),
    isNormWeight: isGptNormWeight,
    fit(s) {
      if ((s.rotaryDim ?? 64) > s.dModel / s.heads) s.rotaryDim = s.dModel / s.heads;
    },
    keySuffix: (s) => `-r${s.rotaryDim ?? 64}`,
    presets: { 'gpt-j': { family: 'gptj', blocks: 2, dModel: 4096, heads: 16, vocab: 50400, maxPositions: 2048, rotaryDim: 64 } },
  },
};
