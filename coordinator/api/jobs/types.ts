import type { ModelSpec } from '../../../model/config.ts';
import type { Stepper } from '../../../model/generation.ts';
import type { RowLogprobs } from '../../../model/logprobs.ts';
import type { SamplingParams } from '../../../model/sampling.ts';
import type { StrataTokenizer } from '../../../model/tokenizer.ts';

/**
 * The request queue's job contract: payloads (self-describing JSON any BullMQ producer can write), their results and
 * streamed deltas. No Redis here: the API validates with the same code before enqueuing (so an invalid request leaves
 * no job behind), and the queue consumer again (a job from a foreign producer is untrusted).
 */

/** What serves the jobs: a pipeline, plus mean-pooled embeddings once the pipeline offers them. */
export type ServingPipeline = Stepper & { embed?(ids: number[]): Promise<Float32Array> };

// ---- Payloads: snake_case, the OpenAI / HF field names -----------------------------------------------------

export interface GenerateJob {
  kind: 'generate';
  /** One of prompt (text: needs a tokenizer) or prompt_ids; a list of either is a batch of prompts. */
  prompt?: string | number[] | string[] | number[][];
  prompt_ids?: number[] | number[][];
  /** Default 16 (OpenAI), clamped to the context left when not given. */
  max_tokens?: number;
  /** Default 1 (OpenAI); 0 = greedy. */
  temperature?: number;
  top_p?: number;
  /** 0 or -1: off. */
  top_k?: number;
  repetition_penalty?: number;
  /** Choice i uses seed + i; without a seed each choice draws a random one. */
  seed?: number;
  stop?: string | string[];
  /** Stop after emitting any of these ids (vLLM's extension; works without a tokenizer). */
  stop_token_ids?: number[];
  ignore_eos?: boolean;
  n?: number;
  /** Report each generated token's log-probability and this many alternatives (0..20). */
  logprobs?: number;
  /** Return the prompt with each choice (and, with logprobs, the prompt's log-probabilities). */
  echo?: boolean;
}

export interface FillMaskJob {
  kind: 'fill-mask';
  /** Text with the tokenizer's mask token (HF task shape). */
  inputs?: string;
  /** Token ids; `mask_index` names the masked position (found from the tokenizer's mask id when absent). */
  input_ids?: number[];
  mask_index?: number;
  /** Default 5. */
  top_k?: number;
}

export interface EmbedJob {
  kind: 'embed';
  input: string | string[] | number[] | number[][];
}

export type JobPayload = GenerateJob | FillMaskJob | EmbedJob;
export type JobKind = JobPayload['kind'];
export const JOB_KINDS: readonly JobKind[] = ['generate', 'fill-mask', 'embed'];

// ---- Results: the job's return value -----------------------------------------------------------------------

export interface GenerateChoice {
  index: number;
  token_ids: number[];
  /** Present when the model has a tokenizer; cut before a matched stop string. */
  text?: string;
  finish_reason: 'length' | 'stop';
  /** Which prompt of the request this choice continues (index = prompt_index * n + i, as vLLM numbers them). */
  prompt_index?: number;
  /** When the job asked for logprobs: one per token id, and with echo one per prompt id (the first null). */
  logprobs?: { tokens: RowLogprobs[]; prompt?: (RowLogprobs | null)[] };
}
export interface Usage {
  prompt_tokens: number;
  completion_tokens?: number;
  total_tokens: number;
}
export interface GenerateResultBody {
  kind: 'generate';
  /** The (first) prompt. */
  prompt_ids: number[];
  /** Every prompt, when the request held several. */
  prompts?: number[][];
  choices: GenerateChoice[];
  usage: Usage;
}
export interface FillMaskCandidateBody {
  token: number;
  score: number;
  token_str?: string;
  sequence?: string;
}
export interface FillMaskResultBody {
  kind: 'fill-mask';
  input_ids: number[];
  mask_index: number;
  candidates: FillMaskCandidateBody[];
}
export interface EmbedResultBody {
  kind: 'embed';
  data: number[][];
  usage: Usage;
}
export type JobResult = GenerateResultBody | FillMaskResultBody | EmbedResultBody;

/** A streamed delta of one choice (BullMQ job progress). Offsets let a reader drop what a retried attempt repeats. */
export interface TokenProgress {
  index: number;
  /** How many token ids of this choice came before `tokens`. */
  offset: number;
  tokens: number[];
  /** How many characters of this choice's text came before `text`. */
  text_offset: number;
  text: string;
  /** With logprobs: one per token of `tokens`; the first delta of a choice with echo also carries the prompt's. */
  logprobs?: RowLogprobs[];
  prompt_logprobs?: (RowLogprobs | null)[];
  /**
   * Which run of the job produced this delta (BullMQ's attemptsStarted: 1, then 2 after a retry or after the job
   * stalled because its coordinator died). A re-run generates from scratch, so its first delta of each choice has
   * offset 0 again and `restart: true`: a reader keeps what it showed and drops the overlap (the re-run draws the
   * same tokens: greedy, or seeded from the job id), or starts over if it buffers.
   */
  attempt?: number;
  restart?: boolean;
}

// ---- Validated jobs ----------------------------------------------------------------------------------------

export interface ModelContext {
  spec: ModelSpec;
  tokenizer: StrataTokenizer | null;
  /** Whether the pipeline can compute embeddings (it has `embed`). */
  canEmbed?: boolean;
  maxN?: number;
  /** Most prompts one completions request may hold (default STRATA_MAX_PROMPTS, else 64). */
  maxPrompts?: number;
}

export interface ResolvedGenerate {
  kind: 'generate';
  /** One or more prompts; choices are numbered prompt * n + i. */
  prompts: number[][];
  maxTokens: number;
  n: number;
  sampling: SamplingParams;
  stop: string[];
  stopTokenIds: number[];
  ignoreEos: boolean;
  logprobs?: number;
  echo: boolean;
}
export interface ResolvedFillMask {
  kind: 'fill-mask';
  ids: number[];
  maskIndex: number;
  topK: number;
}
export interface ResolvedEmbed {
  kind: 'embed';
  inputs: number[][];
}
export type ResolvedJob = ResolvedGenerate | ResolvedFillMask | ResolvedEmbed;
