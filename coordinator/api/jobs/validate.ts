import { StrataError, type ErrorCode } from '../../../model/errors.ts';
import { MAX_TOP_LOGPROBS } from '../../../model/logprobs.ts';
import { validateSamplingParams, type SamplingParams } from '../../../model/sampling.ts';
import type { ModelSpec } from '../../../model/config.ts';
import { JOB_KINDS, type ModelContext, type ResolvedEmbed, type ResolvedFillMask, type ResolvedGenerate, type ResolvedJob } from './types.ts';

/** Validation of job payloads: the API runs it before enqueuing, the queue consumer again before running a job. */

export const bad = (code: ErrorCode, message: string) => new StrataError(code, message, 'invalid_argument');

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
export function tokenIds(v: unknown, name: string, spec: ModelSpec, allowEmpty = false): number[] {
  if (!Array.isArray(v)) throw bad('invalid_field', `${name} must be an array of token ids`);
  if (v.length === 0 && !allowEmpty) throw bad('input_empty', `${name} is empty; send at least one token`);
  const i = v.findIndex((id) => !Number.isInteger(id) || id < 0 || id >= spec.vocab);
  if (i >= 0) throw bad('token_out_of_range', `${name}[${i}] = ${show(v[i])} is not a token id of this model (integers in [0, ${spec.vocab}))`);
  return v as number[];
}

export function encode(text: string, name: string, ctx: ModelContext, addSpecialTokens?: boolean): number[] {
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
    ['suffix', (v) => v === ''], ['presence_penalty', (v) => v === 0], ['frequency_penalty', (v) => v === 0],
    ['logit_bias', (v) => typeof v === 'object' && v !== null && Object.keys(v).length === 0],
    ['best_of', (v) => v === 1 || v === o.n],
  ];
  for (const [name, isDefault] of off) {
    if (given(o[name]) && !isDefault(o[name])) throw bad('unsupported_field', `${name} is not supported by this server; leave it out`);
  }
}

const isIds = (v: unknown): v is unknown[] => Array.isArray(v) && v.length > 0 && v.every((x) => typeof x === 'number');

/**
 * The prompt field as a list of prompts: a string or an id list is one prompt; a list of strings or of id lists
 * is a batch (OpenAI's and vLLM's forms). A batch mixing the two is refused.
 */
function promptsOf(o: Obj, ctx: ModelContext): number[][] {
  const prompt = given(o.prompt_ids) ? o.prompt_ids : o.prompt;
  // Messages name `prompt` whichever field carried it (the API's job payloads carry prompt_ids).
  const field = 'prompt';
  if (typeof prompt === 'string') return [encode(prompt, field, ctx)];
  if (isIds(prompt) || (Array.isArray(prompt) && prompt.length === 0)) return [tokenIds(prompt, field, ctx.spec)];
  if (!Array.isArray(prompt) || prompt.length === 0) throw bad('prompt_missing', `${field} is required: a string, an array of token ids, or a list of either`);
  const strings = prompt.every((p) => typeof p === 'string');
  const lists = prompt.every((p) => Array.isArray(p));
  if (!strings && !lists) {
    throw bad('invalid_field', `${field} mixes kinds: send a string, an array of token ids, a list of strings or a list of token-id arrays`);
  }
  const max = ctx.maxPrompts ?? (Number(process.env.STRATA_MAX_PROMPTS) || 64);
  if (prompt.length > max) throw bad('input_too_many', `${field} holds ${prompt.length} prompts; send at most ${max} per request`);
  return prompt.map((p, i) => (strings ? encode(p as string, `${field}[${i}]`, ctx) : tokenIds(p, `${field}[${i}]`, ctx.spec)));
}

function resolveGenerate(o: Obj, ctx: ModelContext): ResolvedGenerate {
  const { spec } = ctx;
  if (!spec.causal) {
    throw new StrataError('task_unsupported', `completions need a causal language model; this model is ${spec.modelType} (masked): use /v1/fill-mask or /v1/embeddings`, 'failed_precondition');
  }
  refuseUnsupported(o);
  const prompts = promptsOf(o, ctx);
  const echo = bool(o, 'echo') ?? false;
  const logprobs = int(o, 'logprobs', 0, MAX_TOP_LOGPROBS);
  const longest = Math.max(...prompts.map((p) => p.length));
  const which = prompts.length > 1 ? 'the longest prompt' : 'prompt';
  const room = spec.maxPositions - longest;
  if (room < (echo ? 0 : 1)) throw bad('prompt_too_long', `${which} has ${longest} tokens, which leaves no room to generate in the model's context of ${spec.maxPositions}; shorten the prompt`);
  // max_tokens 0 with echo scores the prompt alone (lm-evaluation-harness's loglikelihood requests).
  let maxTokens = int(o, 'max_tokens', echo ? 0 : 1, Number.MAX_SAFE_INTEGER);
  if (maxTokens === undefined) maxTokens = Math.min(16, room);
  else if (maxTokens > room) {
    throw bad('prompt_too_long', `${which} (${longest} tokens) + max_tokens (${maxTokens}) exceeds the model's context of ${spec.maxPositions}; shorten the prompt or lower max_tokens to ${room}`);
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
    kind: 'generate', prompts, maxTokens, sampling, stop, echo, ...(logprobs !== undefined ? { logprobs } : {}),
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
