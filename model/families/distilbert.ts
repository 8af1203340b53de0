import { attention } from '../graph/attention.ts';
import { linear } from '../graph/linear.ts';
import { activation, addNorm, embedTokens, layerNorm, mlp, type MlpWeights } from '../graph/ops.ts';
import type { EmbedWeights, ModelFamily, NormRefs, WeightRef } from './family.ts';

export interface DistilbertEmbed extends EmbedWeights {
  norm: NormRefs;
}

/** torch Linear weights ([out, in]), each with a bias. */
export interface DistilbertBlock extends MlpWeights {
  /** sa_layer_norm (after attention) and output_layer_norm (after the FFN): post-LN. */
  ln1: NormRefs;
  ln2: NormRefs;
  out: WeightRef;
  outBias: WeightRef;
  q: WeightRef;
  k: WeightRef;
  v: WeightRef;
  qb: WeightRef;
  kb: WeightRef;
  vb: WeightRef;
}

/** The MLM head: tied projector with its own bias, after a vocab_transform + activation + vocab_layer_norm. */
export interface DistilbertHead {
  weight: WeightRef;
  bias: WeightRef;
  transform: { weight: WeightRef; bias: WeightRef; norm: NormRefs };
}

/** DistilBERT (ClinicalBERT): bidirectional encoder, post-LN blocks, embeddings LayerNorm, fill-mask head. */
export const distilbert: ModelFamily<DistilbertEmbed, DistilbertBlock, DistilbertHead> = {
  name: 'distilbert',
  modelTypes: [{ type: 'distilbert' }],

  normalize(r) {
    const dModel = r.need<number>(['dim'], 'hidden size');
    const heads = r.need<number>(['n_heads'], 'attention heads');
    return {
      family: 'distilbert', causal: false,
      blocks: r.need<number>(['n_layers'], 'number of blocks'), dModel, heads, headDim: r.headDim(dModel, heads),
      inner: r.need<number>(['hidden_dim'], 'MLP inner size'), vocab: r.need<number>(['vocab_size'], 'vocabulary size'),
      maxPositions: r.need<number>(['max_position_embeddings'], 'context length'), eps: 1e-12,
      activation: r.activation(r.opt('activation', 'gelu')), positions: 'learned', rotaryDim: 0,
      scaleAttnWeights: true, scaleAttnByInverseLayerIdx: false, tiedHead: true, headBias: true, keyLayout: 'hf',
    };
  },

  keyPrefix: (hasKey) => (hasKey('distilbert.embeddings.word_embeddings.weight') ? 'distilbert.' : ''),
  weights(spec, range, prefix) {
    const { dModel: D, inner: I, vocab: V, maxPositions: P } = spec;
    const w = (key: string, ...shape: number[]): WeightRef => ({ key: prefix + key, shape });
    const raw = (key: string, ...shape: number[]): WeightRef => ({ key, shape });
    const norm = (base: string): NormRefs => [w(`${base}.weight`, D), w(`${base}.bias`, D)];
    const blocks: DistilbertBlock[] = [];
    for (let i = range.first; i < range.last; i++) {
      const b = `transformer.layer.${i}.`;
      const lin = (name: string, o: number, n: number): [WeightRef, WeightRef] => [w(`${b}${name}.weight`, o, n), w(`${b}${name}.bias`, o)];
      const [q, qb] = lin('attention.q_lin', D, D), [k, kb] = lin('attention.k_lin', D, D), [v, vb] = lin('attention.v_lin', D, D);
      const [out, outBias] = lin('attention.out_lin', D, D), [fcIn, fcInBias] = lin('ffn.lin1', I, D), [fcOut, fcOutBias] = lin('ffn.lin2', D, I);
      // Field order is the order refs are listed (and synthetic checkpoints written).
      blocks.push({ ln1: norm(`${b}sa_layer_norm`), ln2: norm(`${b}output_layer_norm`), out, outBias, fcIn, fcInBias, fcOut, fcOutBias, q, k, v, qb, kb, vb });
    }
    const tokens = w('embeddings.word_embeddings.weight', V, D);
    const embed = range.first !== 0 ? null : { tokens, positions: w('embeddings.position_embeddings.weight', P, D), norm: norm('embeddings.LayerNorm') };
    // The MLM head lives outside the `distilbert.` prefix.
    const head = range.last !== spec.blocks ? null : {
      weight: tokens, bias: raw('vocab_projector.bias', V),
      transform: { weight: raw('vocab_transform.weight', D, D), bias: raw('vocab_transform.bias', D), norm: [raw('vocab_layer_norm.weight', D), raw('vocab_layer_norm.bias', D)] as NormRefs },
    };
    return { embed, blocks, head };
  },
  legacyBuffers: [/^(distilbert\.)?embeddings\.position_ids$/],

  embed: (ctx, inputIds, e) => layerNorm(ctx, embedTokens(ctx, inputIds, e), e.norm),
  block(ctx, x, b, layer) {
    const selfAttention = (h: string) => {
      const [q, k, v] = [linear(ctx, h, b.q, b.qb, false), linear(ctx, h, b.k, b.kb, false), linear(ctx, h, b.v, b.vb, false)];
      // DistilBERT scales q before QKᵀ.
      return linear(ctx, attention(ctx, q, k, v, layer, { sqrtHeadDim: 'query', inverseLayer: false }), b.out, b.outBias, false);
    };
    // Post-LN: norm(x + attn(x)), then norm(· + ffn(·)).
    const sa = addNorm(ctx, x, selfAttention(x), b.ln1).normed;
    return addNorm(ctx, sa, mlp(ctx, sa, b, false), b.ln2).normed;
  },
  finalNorm: (_ctx, x) => x,
  lmHead(ctx, h, head) {
    const t = head.transform;
    return linear(ctx, layerNorm(ctx, activation(ctx, linear(ctx, h, t.weight, t.bias, false)), t.norm), head.weight, head.bias, false);
  },

  tokenizer: { eosToken: null, maskToken: '[MASK]' },
  synthetic: {
    config: (s) => ({
      model_type: 'distilbert', architectures: ['DistilBertForMaskedLM'], dim: s.dModel, n_heads: s.heads, n_layers: s.blocks,
      hidden_dim: s.inner ?? 4 * s.dModel, vocab_size: s.vocab, max_position_embeddings: s.maxPositions ?? 512, activation: 'gelu', pad_token_id: 0,
    }),
    isNormWeight: (key) => /(LayerNorm|layer_norm)\.weight$/.test(key),
  },
};
