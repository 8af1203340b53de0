import type { ModelSpec } from '../config.ts';
import type { BlockRange } from '../range.ts';
import type { BlockContext, StageContext } from '../graph/context.ts';
import type { ConfigReader } from './config-reader.ts';

/**
 * Where a weight lives in a Hugging Face checkpoint, and the shape it must have there.
 * Shapes are the checkpoint's own (torch Linear is [out, in]; GPT-2's Conv1D is [in, out]).
 */
export interface WeightRef {
  key: string;
  shape: number[];
}

/** A layer norm's weight and bias. */
export type NormRefs = [WeightRef, WeightRef];

/**
 * The embedding part every family shares: the token table and (learned positions) the position table, each read
 * one row per token. A family adds its other embedding weights (a norm, a projection) as further fields; those are
 * read whole.
 */
export interface EmbedWeights {
  tokens: WeightRef;
  positions: WeightRef | null;
}

/**
 * The weights of blocks `[first, last)`, plus the embeddings when first == 0 and the final norm + head when
 * last == blocks. Block and head records are the family's own; drivers only walk them for `WeightRef`s
 * (`layout.ts refsIn`), in field order — which is also the order a synthetic checkpoint writes them.
 */
export interface StageWeights<E extends EmbedWeights = EmbedWeights, B extends object = object, H extends object = object> {
  embed: E | null;
  blocks: B[];
  head: H | null;
}

/** What a synthetic (random-weight) checkpoint of a family is made from: bench presets and tests. */
export interface SyntheticShape {
  /** A registered family name (`ModelSpec.family`). */
  family: string;
  blocks: number;
  dModel: number;
  heads: number;
  vocab: number;
  maxPositions?: number;
  inner?: number;
  /** Rotary families: dims of each head that rotate (default the family's). */
  rotaryDim?: number;
  seed?: number;
}

export interface SyntheticSupport {
  /** A Hugging Face config.json object for the shape (its `model_type` must be one this family claims). */
  config(shape: SyntheticShape): Record<string, unknown>;
  /** Weights written as 1 (norm scales); biases are 0 and everything else uniform in ±0.05. */
  isNormWeight(key: string): boolean;
  /** Fits a user-edited shape in place (e.g. rotary_dim no wider than the head). */
  fit?(shape: SyntheticShape): void;
  /** Extra part of the cache key for shape fields only this family reads (e.g. `-r64`). */
  keySuffix?(shape: SyntheticShape): string;
  /** Named shapes `strata bench --preset` offers. */
  presets?: Record<string, SyntheticShape>;
}

/** Tokenizer facts a family's checkpoints rely on when their tokenizer files leave them out. */
export interface TokenizerDefaults {
  /** End-of-text token to look up when neither config.json nor tokenizer_config.json names one. */
  eosToken: string | null;
  /** Mask token for fill-mask models. */
  maskToken: string | null;
}

/**
 * One model architecture: everything strata needs to turn a Hugging Face checkpoint of it into stage graphs.
 * A family is one file in model/families/ registered in `index.ts`; no driver names a family.
 * The type parameters are the family's own weight records (embedding, block, head).
 */
export interface ModelFamily<E extends EmbedWeights = EmbedWeights, B extends object = object, H extends object = object> {
  /** `ModelSpec.family`, graph metadata and plan output. */
  readonly name: string;
  /** `model_type` values of config.json this family claims, with a note for the error listing when partial. */
  readonly modelTypes: readonly { type: string; note?: string }[];
  /** config.json → ModelSpec (`modelType` and the special token ids are filled in by the driver). */
  normalize(read: ConfigReader): FamilySpec;

  /** The checkpoint's key prefix (`transformer.`, `distilbert.`, ''), asking which keys exist. */
  keyPrefix(hasKey: (key: string) => boolean): string;
  /** Weight references of a block range under `prefix`. */
  weights(spec: ModelSpec, range: BlockRange, prefix: string): StageWeights<E, B, H>;
  /** Checkpoint buffers that are not weights, matched by exact (pattern) name, never by suffix. */
  readonly legacyBuffers: readonly RegExp[];

  /** Token ids (and positions) → hidden states [B·T, D]. */
  embed(ctx: StageContext, inputIds: string, weights: E): string;
  /** One block: hidden [B·T, D] → hidden [B·T, D]. `layer` is the global block index. */
  block(ctx: BlockContext, x: string, weights: B, layer: number): string;
  /** The final norm: last block's output → `last_hidden_state` (HF's base-model output) [B·T, D]. */
  finalNorm(ctx: StageContext, x: string, weights: H): string;
  /** Picked rows of the final hidden states [R, D] → logits [R, V] (activation dtype). */
  lmHead(ctx: StageContext, h: string, weights: H): string;

  readonly tokenizer: TokenizerDefaults;
  readonly synthetic?: SyntheticSupport;
}

/** The part of ModelSpec a family's `normalize` decides. */
export type FamilySpec = Omit<ModelSpec, 'modelType' | 'eosTokenId' | 'bosTokenId' | 'padTokenId'>;
