import type { ModelSpec } from '../config.ts';
import type { StageContext } from '../graph/context.ts';
import { linear } from '../graph/linear.ts';
import { embedTokens, layerNorm } from '../graph/ops.ts';
import type { BlockRange } from '../range.ts';
import type { EmbedWeights, NormRefs, StageWeights, SyntheticShape, TokenizerDefaults, WeightRef } from './family.ts';

/** What GPT-2 and GPT-J share: `transformer.` keys, wte(/wpe) embeddings, ln_f + lm_head, BPE tokenizers. */

/** GPT checkpoints are saved with or without the `transformer.` prefix (…LMHeadModel vs …Model). */
export const gptKeyPrefix = (hasKey: (k: string) => boolean): string =>
  hasKey('wte.weight') && !hasKey('transformer.wte.weight') ? '' : 'transformer.';

/** The causal-mask and rotary buffers older GPT checkpoints saved beside the weights. */
export const GPT_LEGACY_BUFFERS = [
  /^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$/,
  /^(transformer\.)?h\.\d+\.attn\.attention\.(bias|masked_bias)$/,
  /^(transformer\.)?h\.\d+\.attn\.(rotary_emb\.)?(sin|cos|inv_freq|embed_positions)$/,
];

export interface GptHead {
  norm: NormRefs;
  weight: WeightRef;
  bias: WeightRef | null;
}

/** Key/shape helpers under a prefix. */
export function refMaker(spec: ModelSpec, prefix: string) {
  const w = (key: string, ...shape: number[]): WeightRef => ({ key: prefix + key, shape });
  const norm = (base: string): NormRefs => [w(`${base}.weight`, spec.dModel), w(`${base}.bias`, spec.dModel)];
  return { w, norm };
}

/** A GPT stage: `block(i)` gives block i's weights; embeddings (wte, wpe for learned positions) and head around them. */
export function gptStageWeights<B extends object>(spec: ModelSpec, range: BlockRange, prefix: string, block: (i: number) => B): StageWeights<EmbedWeights, B, GptHead> {
  const { w, norm } = refMaker(spec, prefix);
  const raw = (key: string, ...shape: number[]): WeightRef => ({ key, shape });
  const blocks: B[] = [];
  for (let i = range.first; i < range.last; i++) blocks.push(block(i));
  const tokens = w('wte.weight', spec.vocab, spec.dModel);
  const positions = spec.positions === 'learned' ? w('wpe.weight', spec.maxPositions, spec.dModel) : null;
  const embed = range.first === 0 ? { tokens, positions } : null;
  // lm_head lives outside the `transformer.` prefix.
  const head = range.last !== spec.blocks ? null : {
    norm: norm('ln_f'),
    weight: spec.tiedHead ? tokens : raw('lm_head.weight', spec.vocab, spec.dModel),
    bias: spec.headBias ? raw('lm_head.bias', spec.vocab) : null,
  };
  return { embed, blocks, head };
}

export const gptGraph = {
  embed: (ctx: StageContext, inputIds: string, e: EmbedWeights): string => embedTokens(ctx, inputIds, e),
  finalNorm: (ctx: StageContext, x: string, h: GptHead): string => layerNorm(ctx, x, h.norm),
  lmHead: (ctx: StageContext, x: string, h: GptHead): string => linear(ctx, x, h.weight, h.bias, false),
};

export const GPT_TOKENIZER: TokenizerDefaults = { eosToken: '<|endoftext|>', maskToken: null };

/** The config.json fields GPT-2 and GPT-J name alike, for synthetic checkpoints. */
export const gptSyntheticFields = (s: SyntheticShape) => ({
  n_embd: s.dModel, n_head: s.heads, n_layer: s.blocks, n_positions: s.maxPositions ?? 1024, n_inner: s.inner ?? null, vocab_size: s.vocab,
  activation_function: 'gelu_new', layer_norm_epsilon: 1e-5, eos_token_id: 0, bos_token_id: 0,
});

export const isGptNormWeight = (key: string): boolean => /(ln_\d|ln_f)\.weight$/.test(key);
