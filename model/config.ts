import { readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { StrataError } from './errors.ts';

/** The three architectures strata computes. GPT-Neo configs with `rotary: true` are GPT-J. */
export type Family = 'gpt2' | 'gptj' | 'distilbert';
export type Activation = 'gelu_tanh' | 'gelu_erf' | 'relu';

/** One description of a checkpoint, whatever config class it shipped with. */
export interface ModelSpec {
  family: Family;
  /** `model_type` as the config spelled it (`gpt2`, `gptj`, `gpt_neo`, `distilbert`). */
  modelType: string;
  /** Decoders see only tokens to their left and keep a KV cache; the encoder sees the whole sequence. */
  causal: boolean;
  blocks: number;
  dModel: number;
  heads: number;
  headDim: number;
  /** MLP inner width (`n_inner` / `intermediate_size` / `hidden_dim`; null means 4·d). */
  inner: number;
  vocab: number;
  maxPositions: number;
  eps: number;
  activation: Activation;
  /** Learned absolute position embeddings (GPT-2, DistilBERT) or rotary (GPT-J). */
  positions: 'learned' | 'rotary';
  /** GPT-J: rotary applied to the first `rotaryDim` dims of each head, interleaved (rotate-every-two). */
  rotaryDim: number;
  /** GPT-2: scores divided by sqrt(head_dim) and, when set, by (global layer index + 1). */
  scaleAttnWeights: boolean;
  scaleAttnByInverseLayerIdx: boolean;
  /** LM head shares the word embedding matrix (GPT-2, DistilBERT) or has its own (GPT-J). */
  tiedHead: boolean;
  headBias: boolean;
  /** Weight names: Hugging Face's own, or finetuneanon's GPT-Neo fork (GPT-J shipped as gpt_neo). */
  keyLayout: 'hf' | 'neo-fork';
  eosTokenId: number | null;
  bosTokenId: number | null;
  padTokenId: number | null;
}

export const SUPPORTED_MODEL_TYPES = ['gpt2', 'gptj', 'gpt_neo (with "rotary": true)', 'distilbert'] as const;

type Raw = Record<string, unknown>;

function field<T>(raw: Raw, names: string[], what: string, modelType: string): T {
  for (const n of names) if (raw[n] !== undefined && raw[n] !== null) return raw[n] as T;
  throw new StrataError('config_missing_field', `config.json (${modelType}) has no ${names.join(' / ')} (${what}); the config is incomplete or not a Hugging Face config`);
}
const optional = <T>(raw: Raw, name: string, fallback: T): T => (raw[name] === undefined || raw[name] === null ? fallback : (raw[name] as T));
const tokenId = (raw: Raw, name: string): number | null => (typeof raw[name] === 'number' ? (raw[name] as number) : null);

function activation(name: string): Activation {
  if (name === 'gelu_new' || name === 'gelu_pytorch_tanh') return 'gelu_tanh';
  if (name === 'gelu') return 'gelu_erf';
  if (name === 'relu') return 'relu';
  throw new StrataError('config_unsupported_activation', `activation "${name}" is not supported; supported: gelu_new, gelu_pytorch_tanh, gelu, relu`);
}

function headDimOf(d: number, heads: number): number {
  if (d % heads !== 0) throw new StrataError('config_bad_heads', `hidden size ${d} is not divisible by ${heads} heads`);
  return d / heads;
}

/** Normalises a Hugging Face `config.json` object. Unknown model types fail listing what is supported. */
export function normalizeConfig(raw: Raw): ModelSpec {
  const modelType = String(raw.model_type ?? '');
  const common = { modelType, eosTokenId: tokenId(raw, 'eos_token_id'), bosTokenId: tokenId(raw, 'bos_token_id'), padTokenId: tokenId(raw, 'pad_token_id') };
  const f = <T>(names: string[], what: string) => field<T>(raw, names, what, modelType);

  if (modelType === 'gpt2') {
    const dModel = f<number>(['n_embd'], 'hidden size');
    const heads = f<number>(['n_head'], 'attention heads');
    return {
      ...common, family: 'gpt2', causal: true,
      blocks: f<number>(['n_layer'], 'number of blocks'), dModel, heads, headDim: headDimOf(dModel, heads),
      inner: optional(raw, 'n_inner', 4 * dModel), vocab: f<number>(['vocab_size'], 'vocabulary size'),
      maxPositions: f<number>(['n_positions', 'n_ctx'], 'context length'), eps: optional(raw, 'layer_norm_epsilon', 1e-5),
      activation: activation(optional(raw, 'activation_function', 'gelu_new')), positions: 'learned', rotaryDim: 0,
      scaleAttnWeights: optional(raw, 'scale_attn_weights', true), scaleAttnByInverseLayerIdx: optional(raw, 'scale_attn_by_inverse_layer_idx', false),
      tiedHead: optional(raw, 'tie_word_embeddings', true), headBias: false, keyLayout: 'hf',
    };
  }
  const neoRotary = modelType === 'gpt_neo' && raw.rotary === true;
  if (modelType === 'gptj' || neoRotary) {
    const dModel = f<number>(neoRotary ? ['hidden_size'] : ['n_embd'], 'hidden size');
    const heads = f<number>(neoRotary ? ['num_heads'] : ['n_head'], 'attention heads');
    const headDim = headDimOf(dModel, heads);
    const rotaryDim = optional<number | null>(raw, 'rotary_dim', null) ?? headDim;
    if (rotaryDim % 2 !== 0 || rotaryDim > headDim) throw new StrataError('config_bad_rotary', `rotary_dim ${rotaryDim} must be even and at most the head size ${headDim}`);
    return {
      ...common, family: 'gptj', causal: true,
      blocks: f<number>(neoRotary ? ['num_layers'] : ['n_layer'], 'number of blocks'), dModel, heads, headDim,
      inner: optional<number | null>(raw, neoRotary ? 'intermediate_size' : 'n_inner', null) ?? 4 * dModel,
      vocab: f<number>(['vocab_size'], 'vocabulary size'),
      maxPositions: f<number>(neoRotary ? ['max_position_embeddings'] : ['n_positions'], 'context length'),
      eps: optional(raw, 'layer_norm_epsilon', 1e-5), activation: activation(optional(raw, 'activation_function', 'gelu_new')),
      positions: 'rotary', rotaryDim, scaleAttnWeights: true, scaleAttnByInverseLayerIdx: false,
      tiedHead: false, headBias: true, keyLayout: neoRotary ? 'neo-fork' : 'hf',
    };
  }
  if (modelType === 'distilbert') {
    const dModel = f<number>(['dim'], 'hidden size');
    const heads = f<number>(['n_heads'], 'attention heads');
    return {
      ...common, family: 'distilbert', causal: false,
      blocks: f<number>(['n_layers'], 'number of blocks'), dModel, heads, headDim: headDimOf(dModel, heads),
      inner: f<number>(['hidden_dim'], 'MLP inner size'), vocab: f<number>(['vocab_size'], 'vocabulary size'),
      maxPositions: f<number>(['max_position_embeddings'], 'context length'), eps: 1e-12,
      activation: activation(optional(raw, 'activation', 'gelu')), positions: 'learned', rotaryDim: 0,
      scaleAttnWeights: true, scaleAttnByInverseLayerIdx: false, tiedHead: true, headBias: true, keyLayout: 'hf',
    };
  }
  const hint = modelType === 'gpt_neo' ? ' (a gpt_neo config runs only as GPT-J, with "rotary": true)' : '';
  throw new StrataError('config_unsupported_model_type', `model_type "${modelType || '(missing)'}" is not supported${hint}; supported: ${SUPPORTED_MODEL_TYPES.join(', ')}`);
}

export function loadModelSpec(modelDir: string): ModelSpec {
  const path = join(modelDir, 'config.json');
  if (!existsSync(path)) throw new StrataError('model_dir_invalid', `${modelDir} has no config.json: --model must name a Hugging Face model directory (config.json + safetensors weights)`);
  let raw: Raw;
  try {
    raw = JSON.parse(readFileSync(path, 'utf8'));
  } catch (e) {
    throw new StrataError('config_unreadable', `${path} is not valid JSON: ${(e as Error).message}`);
  }
  return normalizeConfig(raw);
}
