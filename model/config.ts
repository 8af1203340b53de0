import { readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { StrataError } from './errors.ts';
import { configReader, type RawConfig } from './families/config-reader.ts';
import { familyFor, knownModelTypes } from './families/index.ts';

/** A registered model family's name (model/families): `gpt2`, `gptj` (GPT-Neo configs with `rotary: true` too), `distilbert`. */
export type Family = string;
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

type Raw = RawConfig;

const tokenId = (raw: Raw, name: string): number | null => (typeof raw[name] === 'number' ? (raw[name] as number) : null);

/** Normalises a Hugging Face `config.json` object through the family that claims its `model_type`. Unknown model types fail listing what is supported. */
export function normalizeConfig(raw: Raw): ModelSpec {
  const modelType = String(raw.model_type ?? '');
  const unsupported = (hint: string): never => {
    throw new StrataError('config_unsupported_model_type', `model_type "${modelType || '(missing)'}" is not supported${hint ? ` (${hint})` : ''}; supported: ${knownModelTypes().join(', ')}`);
  };
  const family = familyFor(modelType) ?? unsupported('');
  const common = { modelType, eosTokenId: tokenId(raw, 'eos_token_id'), bosTokenId: tokenId(raw, 'bos_token_id'), padTokenId: tokenId(raw, 'pad_token_id') };
  return { ...common, ...family.normalize(configReader(raw, modelType, unsupported)) };
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
