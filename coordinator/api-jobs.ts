import { randomInt } from 'node:crypto';
import type { ModelSpec } from '../model/config.ts';
import { StrataError, type ErrorCode } from '../model/errors.ts';
import { fillMask, generate, type Stepper } from '../model/generation.ts';
import { stopSequenceHit, validateSamplingParams, type SamplingParams } from '../model/sampling.ts';
import type { StrataTokenizer } from '../model/tokenizer.ts';

/**
 * The request queue's job contract: payloads (self-describing JSON any BullMQ producer can write), their
 * validation, and how a validated job runs against a pipeline. No Redis here: the API validates with the same
 * code before enqueuing (so an invalid request leaves no job behind), and the queue consumer again (a job from
 * a foreign producer is untrusted).
 */

/** What serves the jobs: a pipeline, plus mean-pooled embeddings once the pipeline offers them. */
export type ServingPipeline = Stepper & { embed?(ids: number[]): Promise<Float32Array> };

// ---- Payloads: snake_case, the OpenAI / HF field names -----------------------------------------------------

export interface GenerateJob {
  kind: 'generate';
  /** One of prompt (text: needs a tokenizer) or prompt_ids. */
  prompt?: string | number[];
  prompt_ids?: number[];
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
}
export interface Usage {
  prompt_tokens: number;
  completion_tokens?: number;
  total_tokens: number;
}
export interface GenerateResultBody {
  kind: 'generate';
  prompt_ids: number[];
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
  /**
   * Which run of the job produced this delta (BullMQ's attemptsStarted: 1, then 2 after a retry or after the job
   * stalled because its coordinator died). A re-run generates from scratch, so its first delta of each choice has
   * offset 0 again and `restart: true`: a reader keeps what it showed and drops the overlap (the re-run draws the
   * same tokens: greedy, or seeded from the job id), or starts over if it buffers.
   */
  attempt?: number;
  restart?: boolean;
}

// ---- Validation --------------------------------------------------------------------------------------------

export interface ModelContext {
  spec: ModelSpec;
  tokenizer: StrataTokenizer | null;
  /** Whether the pipeline can compute embeddings (it has `embed`). */
  canEmbed?: boolean;
  maxN?: number;
}

export interface ResolvedGenerate {
  kind: 'generate';
  promptIds: number[];
  maxTokens: number;
  n: number;
  sampling: SamplingParams;
  stop: string[];
  stopTokenIds: number[];
  ignoreEos: boolean;
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

const bad = (code: ErrorCode, message: string) => new StrataError(code, message, 'invalid_argument');

/** A value quoted in an error message: JSON, cut short (a 10 MB array must not come back in a 400's message). */
export function show(v: unknown, max = 80): string {
  let s: string;
  try {
    s = JSON.stringify(v) ?? String(v);
  } catch {
    s = Array.isArray(v) ? `[array of ${v.length}]` : typeof v;
  }
  return s.length > max ? `${s.slice(0, max)}…` : s;
}
type Obj = Record<string, unknown>;
/** Clients (OpenAI SDKs among them) send null for "not set". */
const given = (v: unknown): boolean => v !== undefined && v !== null;

function num(o: Obj, name: string, ok: (v: number) => boolean, want: string): number | undefined {
  const v = o[name];
  if (!given(v)) return undefined;
  if (typeof v !== 'number' || !Number.isFinite(v) || !ok(v)) throw bad('invalid_field', `${name} must be ${want}, got ${show(v)}`);
  return v;
}
const int = (o: Obj, name: string, min: number, max: number) =>
  num(o, name, (v) => Number.isInteger(v) && v >= min && v <= max, `an integer in [${min}, ${max}]`);

function bool(o: Obj, name: string): boolean | undefined {
  const v = o[name];
  if (!given(v)) return undefined;
  if (typeof v !== 'boolean') throw bad('invalid_field', `${name} must be true or false, got ${show(v)}`);
  return v;
}

/** Token ids the model can look up: integers in [0, vocab). */
function tokenIds(v: unknown, name: string, spec: ModelSpec, allowEmpty = false): number[] {
  if (!Array.isArray(v)) throw bad('invalid_field', `${name} must be an array of token ids`);
  if (v.length === 0 && !allowEmpty) throw bad('input_empty', `${name} is empty; send at least one token`);
  const i = v.findIndex((id) => !Number.isInteger(id) || id < 0 || id >= spec.vocab);
  if (i >= 0) throw bad('token_out_of_range', `${name}[${i}] = ${show(v[i])} is not a token id of this model (integers in [0, ${spec.vocab}))`);
  return v as number[];
}

function encode(text: string, name: string, ctx: ModelContext, addSpecialTokens?: boolean): number[] {
  if (!ctx.tokenizer) {
    throw bad('tokenizer_missing', `this model ships no tokenizer, so ${name} cannot be text; send token ids instead (an array of integers)`);
  }
  const ids = ctx.tokenizer.encode(text, { addSpecialTokens });
  if (ids.length === 0) throw bad('input_empty', `${name} encodes to no tokens`);
  return tokenIds(ids, name, ctx.spec);
}

function fitsContext(ids: number[], name: string, spec: ModelSpec): void {
  if (ids.length > spec.maxPositions) {
    throw bad('input_too_long', `${name} has ${ids.length} tokens, the model's context is ${spec.maxPositions}; shorten it`);
  }
}

/** OpenAI fields strata does not implement: refused when set to anything but their no-op default. */
function refuseUnsupported(o: Obj): void {
  const off: [string, (v: unknown) => boolean][] = [
    ['logprobs', (v) => v === false || v === 0], ['echo', (v) => v === false], ['suffix', (v) => v === ''],
    ['presence_penalty', (v) => v === 0], ['frequency_penalty', (v) => v === 0],
    ['logit_bias', (v) => typeof v === 'object' && v !== null && Object.keys(v).length === 0],
    ['best_of', (v) => v === 1 || v === o.n],
  ];
  for (const [name, isDefault] of off) {
    if (given(o[name]) && !isDefault(o[name])) throw bad('unsupported_field', `${name} is not supported by this server; leave it out`);
  }
}

function resolveGenerate(o: Obj, ctx: ModelContext): ResolvedGenerate {
  const { spec } = ctx;
  if (!spec.causal) {
    throw new StrataError('task_unsupported', `completions need a causal language model; this model is ${spec.modelType} (masked): use /v1/fill-mask or /v1/embeddings`, 'failed_precondition');
  }
  refuseUnsupported(o);
  let prompt = given(o.prompt_ids) ? o.prompt_ids : o.prompt;
  // OpenAI also takes a batch (a list of prompts); a batch of one is the prompt itself.
  if (Array.isArray(prompt) && prompt.length === 1 && (typeof prompt[0] === 'string' || Array.isArray(prompt[0]))) prompt = prompt[0];
  let promptIds: number[];
  if (typeof prompt === 'string') promptIds = encode(prompt, 'prompt', ctx);
  else if (Array.isArray(prompt) && prompt.every((p) => typeof p === 'number')) promptIds = tokenIds(prompt, 'prompt', spec);
  else if (Array.isArray(prompt) && prompt.length > 1) throw bad('batch_unsupported', 'prompt holds several prompts; send one request per prompt');
  else throw bad('prompt_missing', 'prompt is required: a string, or an array of token ids');

  const room = spec.maxPositions - promptIds.length;
  if (room < 1) throw bad('prompt_too_long', `prompt has ${promptIds.length} tokens, which leaves no room to generate in the model's context of ${spec.maxPositions}; shorten the prompt`);
  let maxTokens = int(o, 'max_tokens', 1, Number.MAX_SAFE_INTEGER);
  if (maxTokens === undefined) maxTokens = Math.min(16, room);
  else if (maxTokens > room) {
    throw bad('prompt_too_long', `prompt (${promptIds.length} tokens) + max_tokens (${maxTokens}) exceeds the model's context of ${spec.maxPositions}; shorten the prompt or lower max_tokens to ${room}`);
  }

  const topK = int(o, 'top_k', -1, Number.MAX_SAFE_INTEGER);
  const sampling: SamplingParams = {
    temperature: num(o, 'temperature', (v) => v >= 0, 'a number >= 0 (0 = greedy)') ?? 1,
    topP: num(o, 'top_p', (v) => v > 0 && v <= 1, 'a number in (0, 1]'),
    topK: topK === -1 ? 0 : topK,
    repetitionPenalty: num(o, 'repetition_penalty', (v) => v > 0, 'a number > 0 (1 = off)'),
    seed: num(o, 'seed', Number.isSafeInteger, 'an integer'),
  };
  validateSamplingParams(sampling);

  let stop: string[] = [];
  if (given(o.stop)) {
    stop = typeof o.stop === 'string' ? [o.stop] : (o.stop as string[]);
    if (!Array.isArray(stop) || stop.length > 8 || stop.some((s) => typeof s !== 'string' || s.length === 0)) {
      throw bad('invalid_field', 'stop must be a non-empty string or an array of at most 8 non-empty strings');
    }
    if (stop.length > 0 && !ctx.tokenizer) throw bad('tokenizer_missing', 'stop strings need a tokenizer and this model ships none; use stop_token_ids instead');
  }
  return {
    kind: 'generate', promptIds, maxTokens, sampling, stop,
    n: int(o, 'n', 1, ctx.maxN ?? 16) ?? 1,
    stopTokenIds: given(o.stop_token_ids) ? tokenIds(o.stop_token_ids, 'stop_token_ids', spec, true) : [],
    ignoreEos: bool(o, 'ignore_eos') ?? false,
  };
}

function resolveFillMask(o: Obj, ctx: ModelContext): ResolvedFillMask {
  const { spec, tokenizer } = ctx;
  if (spec.causal) {
    throw new StrataError('task_unsupported', `fill-mask needs a masked language model (distilbert); this model is ${spec.modelType}: use /v1/completions`, 'failed_precondition');
  }
  let ids: number[];
  if (given(o.input_ids)) ids = tokenIds(o.input_ids, 'input_ids', spec);
  else if (typeof o.inputs === 'string') ids = encode(o.inputs, 'inputs', ctx);
  else throw bad('input_missing', 'send inputs (text with the mask token) or input_ids with mask_index');
  fitsContext(ids, given(o.input_ids) ? 'input_ids' : 'inputs', spec);

  let maskIndex = int(o, 'mask_index', 0, ids.length - 1);
  if (maskIndex === undefined) {
    const maskId = tokenizer?.maskToken?.id;
    if (maskId === undefined) throw bad('mask_missing', 'this model has no tokenizer mask token; give mask_index with input_ids');
    const at = ids.flatMap((id, i) => (id === maskId ? [i] : []));
    if (at.length !== 1) {
      throw bad(at.length === 0 ? 'mask_missing' : 'multiple_masks', `the input must hold exactly one ${tokenizer!.maskToken!.token} token, found ${at.length}`);
    }
    maskIndex = at[0];
  }
  return { kind: 'fill-mask', ids, maskIndex, topK: int(o, 'top_k', 1, spec.vocab) ?? 5 };
}

function resolveEmbed(o: Obj, ctx: ModelContext): ResolvedEmbed {
  if (!ctx.canEmbed) {
    throw new StrataError('not_implemented', 'this pipeline does not compute embeddings yet', 'failed_precondition');
  }
  const input = o.input;
  let items: unknown[];
  if (typeof input === 'string') items = [input];
  else if (Array.isArray(input) && input.length > 0 && input.every((x) => typeof x === 'number')) items = [input];
  else if (Array.isArray(input) && input.length > 0) items = input;
  else throw bad('input_missing', 'input is required: a string, an array of strings, an array of token ids, or an array of such arrays');
  if (items.length > 256) throw bad('input_too_many', `input holds ${items.length} items; send at most 256 per request`);
  const inputs = items.map((item, i) => {
    const name = items.length === 1 ? 'input' : `input[${i}]`;
    const ids = typeof item === 'string' ? encode(item, name, ctx) : tokenIds(item, name, ctx.spec);
    fitsContext(ids, name, ctx.spec);
    return ids;
  });
  return { kind: 'embed', inputs };
}

/**
 * Validates a job payload (`kind` from the payload, else the BullMQ job name) into what `runJob` needs.
 * Throws StrataError: kind invalid_argument for bad fields, failed_precondition for a task the model cannot do.
 */
export function resolveJob(data: unknown, ctx: ModelContext, jobName?: string): ResolvedJob {
  if (!data || typeof data !== 'object' || Array.isArray(data)) throw bad('invalid_payload', 'the job payload must be a JSON object');
  const o = data as Obj;
  const kind = o.kind ?? jobName;
  if (kind === 'generate') return resolveGenerate(o, ctx);
  if (kind === 'fill-mask') return resolveFillMask(o, ctx);
  if (kind === 'embed') return resolveEmbed(o, ctx);
  throw bad('invalid_kind', `job kind ${show(kind)} is not one of ${JOB_KINDS.join(', ')}`);
}

// ---- Execution ---------------------------------------------------------------------------------------------

export interface RunHooks {
  /** Streams a delta; a failure to publish it must not fail the job (the result still carries every token). */
  progress?: (p: TokenProgress) => Promise<unknown> | unknown;
  /** Publish at most this often per choice (the first token always at once). Default 20 ms. */
  progressIntervalMs?: number;
  /**
   * Seed for choices whose request gave none. The consumer derives it from the job id, so a retried attempt
   * draws the same tokens as the first (a stream that already showed some stays consistent).
   */
  defaultSeed?: number;
  /** A token was chosen (for TTFT / inter-token metrics). */
  onToken?: (choice: number, at: number) => void;
  /** Which run of the job this is (1 = first); deltas of a later run carry it and mark their restart. */
  attempt?: number;
}

/** Runs a validated job against the pipeline. */
export async function runJob(req: ResolvedJob, pipeline: ServingPipeline, ctx: ModelContext, hooks: RunHooks = {}): Promise<JobResult> {
  if (req.kind === 'generate') return runGenerate(req, pipeline, ctx, hooks);
  if (req.kind === 'fill-mask') return runFillMask(req, pipeline, ctx);
  if (!pipeline.embed) throw new StrataError('not_implemented', 'this pipeline does not compute embeddings yet', 'failed_precondition');
  const data = await Promise.all(req.inputs.map(async (ids) => Array.from(await pipeline.embed!(ids))));
  const tokens = req.inputs.reduce((s, ids) => s + ids.length, 0);
  return { kind: 'embed', data, usage: { prompt_tokens: tokens, total_tokens: tokens } };
}

async function runGenerate(req: ResolvedGenerate, pipeline: ServingPipeline, ctx: ModelContext, hooks: RunHooks): Promise<GenerateResultBody> {
  const { spec, tokenizer } = ctx;
  const eos = req.ignoreEos ? null : (tokenizer?.eosTokenId ?? spec.eosTokenId);
  const maxStop = Math.max(0, ...req.stop.map((s) => s.length));
  const interval = hooks.progressIntervalMs ?? 20;
  const pending: Promise<unknown>[] = [];

  // The n choices run at once: their steps interleave in the pipeline like separate requests.
  const choices = await Promise.all(Array.from({ length: req.n }, async (_, index): Promise<GenerateChoice> => {
    const seed = (req.sampling.seed ?? hooks.defaultSeed ?? randomInt(2 ** 32)) + index;
    const ids: number[] = [];
    let text = '';
    let cut: number | null = null; // where a stop string starts in `text`
    let sentTokens = 0;
    let sentText = 0;
    let lastSent = 0;
    let checked = 0; // text length already searched for stop strings

    // Text that can no longer change: a tail that may still become a stop string is held back, and so is a
    // trailing U+FFFD (an incomplete UTF-8 sequence the next token completes).
    const stableText = (final: boolean) => {
      if (cut !== null) return text.slice(0, cut);
      if (final) return text;
      let end = Math.max(0, text.length - Math.max(0, maxStop - 1));
      while (end > 0 && text[end - 1] === '\uFFFD') end--;
      return text.slice(0, end);
    };
    const publish = (final: boolean) => {
      if (!hooks.progress) return;
      const visible = stableText(final);
      if (ids.length === sentTokens && visible.length <= sentText) return;
      const delta: TokenProgress = { index, offset: sentTokens, tokens: ids.slice(sentTokens), text_offset: sentText, text: visible.slice(sentText) };
      if (hooks.attempt !== undefined) {
        delta.attempt = hooks.attempt;
        if (hooks.attempt > 1 && sentTokens === 0 && sentText === 0) delta.restart = true;
      }
      sentTokens = ids.length;
      sentText = Math.max(sentText, visible.length);
      lastSent = Date.now();
      pending.push(Promise.resolve().then(() => hooks.progress!(delta)).catch(() => {}));
    };

    const { outputIds, finishReason } = await generate(pipeline, req.promptIds, {
      maxNewTokens: req.maxTokens, eosTokenId: eos, maxPositions: spec.maxPositions, sampling: { ...req.sampling, seed },
      onToken: (id) => {
        const now = Date.now();
        hooks.onToken?.(index, now);
        ids.push(id);
        let stop = req.stopTokenIds.includes(id);
        if (tokenizer) {
          text = tokenizer.decode(ids, { skipSpecialTokens: true });
          if (maxStop > 0) {
            // A new match must end in the new text: only the tail needs searching.
            const from = Math.max(0, checked - maxStop + 1);
            checked = text.length;
            const hit = stopSequenceHit(text.slice(from), req.stop);
            if (hit) {
              cut = from + hit.index;
              stop = true;
            }
          }
        }
        if (!stop && (sentTokens === 0 || now - lastSent >= interval)) publish(false);
        return !stop;
      },
    });
    publish(true);
    return { index, token_ids: outputIds, ...(tokenizer ? { text: stableText(true) } : {}), finish_reason: finishReason };
  }));
  // Progress events go out before the job completes, so a stream reader sees every delta before the result.
  await Promise.all(pending);
  const completion = choices.reduce((s, c) => s + c.token_ids.length, 0);
  return {
    kind: 'generate', prompt_ids: req.promptIds, choices,
    usage: { prompt_tokens: req.promptIds.length, completion_tokens: completion, total_tokens: req.promptIds.length + completion },
  };
}

async function runFillMask(req: ResolvedFillMask, pipeline: ServingPipeline, ctx: ModelContext): Promise<FillMaskResultBody> {
  const top = await fillMask(pipeline, req.ids, req.maskIndex, req.topK);
  const tok = ctx.tokenizer;
  const candidates = top.map(({ id, score }): FillMaskCandidateBody => {
    if (!tok) return { token: id, score };
    // As HF's fill-mask pipeline: token_str is the decoded candidate, sequence the decoded input with it filled in.
    const filled = req.ids.map((t, i) => (i === req.maskIndex ? id : t));
    return { token: id, score, token_str: tok.decode([id]), sequence: tok.decode(filled, { skipSpecialTokens: true }) };
  });
  return { kind: 'fill-mask', input_ids: req.ids, mask_index: req.maskIndex, candidates };
}
