import { randomUUID } from 'node:crypto';
import type { StepInput, StepOutput } from './stage.ts';
import { float16ToFloat32 } from './dtype.ts';
import type { TensorData } from './tensor.ts';
import { createRng, selectNextToken, validateSamplingParams, type SamplingParams } from './sampling.ts';
import { StrataError } from './errors.ts';
import { logprobsOf, type LogprobRequest, type RowLogprobs } from './logprobs.ts';

/**
 * How the last stage turns logits into tokens. Stateless per step (the RNG is seeded from seed and step index),
 * so any replica of the last stage, or a replay after a fault, picks the same token.
 */
export interface SelectSpec {
  sampling: SamplingParams;
  /** Per batch row: every id so far (prompt + generated), for the repetition penalty; empty when there is none. */
  history: number[][];
  step: number;
}

export interface PipelineStep extends StepInput {
  /** When set, the last stage returns chosen token ids instead of logits. */
  select?: SelectSpec;
  /** 'hidden_mean': the last stage returns the mask-weighted mean of its final hidden states (embeddings). */
  output?: 'tokens_or_logits' | 'hidden_mean';
  /** Log-probabilities of the requested logit rows (top-N and a target each), computed on the last stage. */
  logprobs?: LogprobRequest;
  /**
   * Decode steps to run in a row (a one-stage pipeline; other stages run one): each next step feeds the token the
   * last one chose, as generate() would send it (nextDecodeStep). The result then holds one token (and logprob row)
   * per step run, ending early after any of `stopTokens`.
   */
  steps?: number;
  stopTokens?: number[];
  /**
   * No request of this session follows this one unless it stops early: generation ends with it by length. With
   * `stopTokens` (sent on every decode request) a one-stage worker then knows not to run the session's next step
   * ahead (worker/run-ahead.ts). A hint only: answers never depend on it.
   */
  finalRequest?: boolean;
}

/** The most decode steps one request may ask for (PipelineStep.steps). */
export const MAX_DECODE_STEPS = 64;

export interface StepResult {
  logits?: TensorData;
  tokens?: number[];
  /** float32 [B, D] */
  hiddenMean?: TensorData;
  /** [B][R] when the step asked for `logprobs`. */
  logprobs?: RowLogprobs[][];
}

/**
 * Whether the last stage needs only each row's greedy token for this step (Stage.step's fetch 'greedy'): the step
 * selects at temperature 0 without a repetition penalty, and asks for no logprobs, logits or pooled states.
 */
export function greedyOnly(input: PipelineStep): boolean {
  const s = input.select?.sampling;
  return !!s && (s.temperature ?? 0) === 0 && (s.repetitionPenalty ?? 1) === 1 && !input.logprobs && input.output !== 'hidden_mean';
}

/** What the last stage sends back for a step: chosen tokens, logits, or pooled hidden states. */
export function finishStep(out: StepOutput, input: PipelineStep): StepResult {
  if (input.output === 'hidden_mean') return { hiddenMean: meanPool(out.lastHidden!, input.attentionMask) };
  if (!out.logits && out.nextTokens && input.select && greedyOnly(input)) {
    // A greedy run fetched only the graph's argmax: each batch row's token at its last requested position.
    validateSamplingParams(input.select.sampling);
    const [batch, rows] = out.nextTokens.dims;
    const ids = out.nextTokens.data as BigInt64Array;
    return { tokens: Array.from({ length: batch }, (_, b) => Number(ids[b * rows + rows - 1])) };
  }
  if (input.logprobs) {
    // Logprobs replace the logits on the wire: only 1 + N values per row leave the stage.
    const tokens = input.select ? pickTokens(out.logits!, input.select) : undefined;
    return { tokens, logprobs: logprobsOf(out.logits!, input.logprobs, tokens) };
  }
  if (input.select) return { tokens: pickTokens(out.logits!, input.select) };
  return { logits: out.logits };
}

/** Mean over the positions the mask keeps (its last T columns: a decoder mask also spans the past). */
export function meanPool(hidden: TensorData, mask: TensorData): TensorData {
  const [batch, seq, d] = hidden.dims;
  const total = mask.dims[1];
  const src = hidden.dtype === 'float16' ? float16ToFloat32(hidden.data as Uint16Array) : (hidden.data as Float32Array);
  const m = mask.data as BigInt64Array;
  const out = new Float32Array(batch * d);
  for (let b = 0; b < batch; b++) {
    let count = 0;
    for (let t = 0; t < seq; t++) {
      if (m[b * total + total - seq + t] === 0n) continue;
      count++;
      for (let i = 0; i < d; i++) out[b * d + i] += src[(b * seq + t) * d + i];
    }
    for (let i = 0; i < d; i++) out[b * d + i] /= Math.max(count, 1);
  }
  return { dtype: 'float32', dims: [batch, d], data: out };
}

/** A whole pipeline as the request logic sees it: in-process stages, or K workers over gRPC. */
export interface Stepper {
  step(sessionId: string, input: PipelineStep): Promise<StepResult>;
  /** Frees the session's KV caches on every stage. */
  end(sessionId: string): Promise<void>;
  /** Decode steps generate() asks for per request (PipelineStep.steps); absent: one. */
  readonly decodeSteps?: number;
}

/** Applies `sel` to logits [B, R, V]: one token per batch row, from its last requested position. */
export function pickTokens(logits: TensorData, sel: SelectSpec): number[] {
  const [batch, rows, vocab] = logits.dims;
  const data = logits.data as Float32Array;
  const seed = sel.sampling.seed ?? 0;
  const rng = createRng((Math.imul(seed | 0, 0x9e3779b1) ^ Math.imul(sel.step + 1, 0x85ebca6b)) >>> 0);
  const out: number[] = [];
  for (let b = 0; b < batch; b++) {
    const start = (b * rows + rows - 1) * vocab;
    out.push(selectNextToken(data.subarray(start, start + vocab), sel.sampling, rng, sel.history[b] ?? []));
  }
  return out;
}

export const i64 = (rows: number[][]): TensorData => ({ dtype: 'int64', dims: [rows.length, rows[0].length], data: BigInt64Array.from(rows.flat(), BigInt) });
/** One row's attention mask over n positions, all attended (no padding): made every decode step, so no BigInt per position. */
export const attendAll = (n: number): TensorData => ({ dtype: 'int64', dims: [1, n], data: new BigInt64Array(n).fill(1n) });
const range = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => from + i);

/**
 * The decode step generate() sends after `input` chose `token`: that token, one position on, the same sampling at the
 * next step index. A one-stage worker runs it ahead of its request (worker/run-ahead.ts) and chains it when a request
 * asks for several steps (PipelineStep.steps). null when there is none to take (several rows, no selection, a padded
 * mask, the context's end).
 */
export function nextDecodeStep(input: PipelineStep, token: number, maxPositions: number): PipelineStep | null {
  const [rows, seq] = input.positionIds.dims;
  const total = input.attentionMask.dims[1];
  if (rows !== 1 || !input.select || input.output === 'hidden_mean' || total + 1 > maxPositions) return null;
  if ((input.attentionMask.data as BigInt64Array).some((v) => v !== 1n)) return null;
  const position = Number((input.positionIds.data as BigInt64Array)[seq - 1]) + 1;
  const { sampling, history, step } = input.select;
  return {
    inputIds: i64([[token]]),
    positionIds: i64([[position]]),
    attentionMask: attendAll(total + 1),
    output: 'tokens_or_logits',
    select: { sampling, history: history.length ? [[...history[0], token]] : [], step: step + 1 },
    logprobs: input.logprobs ? { top: input.logprobs.top, targets: [[-1]] } : undefined,
  };
}

/** The steps a chained request ran after its first, given the tokens it chose (what replaying it must feed). */
export function chainedSteps(input: PipelineStep, tokens: number[]): PipelineStep[] {
  const steps: PipelineStep[] = [];
  let at = input;
  for (const token of tokens.slice(0, -1)) {
    const next = nextDecodeStep(at, token, Infinity);
    if (!next) break;
    steps.push((at = next));
  }
  return steps;
}

export interface GenerateOptions {
  maxNewTokens: number;
  sampling?: SamplingParams;
  /** Stop after emitting this id (HF generate's default behaviour). null: never. */
  eosTokenId?: number | null;
  /** Called with each new token as soon as it is chosen (and its logprobs when asked); return false to stop. */
  onToken?: (id: number, index: number, logprobs?: RowLogprobs) => boolean | void;
  /** Report each generated token's log-probability and this many alternatives (0..20). */
  logprobs?: number;
  /** Also report the prompt's (needs `logprobs`): entry p scores prompt[p] given prompt[0..p); entry 0 is null. */
  promptLogprobs?: boolean;
  /** Called once the prompt's logprobs are complete (before the first token's onToken). */
  onPromptLogprobs?: (lp: (RowLogprobs | null)[]) => void;
  maxPositions?: number;
  /** Prompt tokens per prefill step (default STRATA_PREFILL_CHUNK, else 256). */
  prefillChunk?: number;
}

export const DEFAULT_PREFILL_CHUNK = Number(process.env.STRATA_PREFILL_CHUNK ?? 256);

export interface GenerateResult {
  outputIds: number[];
  finishReason: 'length' | 'stop';
  /** One per output id, when `logprobs` was asked. */
  tokenLogprobs?: RowLogprobs[];
  /** One per prompt id (the first null), when `promptLogprobs` was asked. */
  promptLogprobs?: (RowLogprobs | null)[];
}

/** A step that asked for logprobs must get them: a last stage from before they existed answers without. */
function logprobsFrom(r: StepResult, rows: number): RowLogprobs[] {
  const lp = r.logprobs?.[0];
  if (!lp || lp.length !== rows) {
    throw new StrataError('logprobs_unsupported', 'the last stage returned no logprobs: it runs an older strata; upgrade the workers', 'failed_precondition');
  }
  return lp;
}

/**
 * Prefill once, then one token per step through the KV caches. With `promptLogprobs` every prefill position's logits
 * are scored against the next prompt token on the last stage; maxNewTokens 0 then scores the prompt alone.
 */
export async function generate(stepper: Stepper, promptIds: number[], opts: GenerateOptions): Promise<GenerateResult> {
  if (promptIds.length === 0) throw new StrataError('prompt_empty', 'the prompt has no tokens');
  const top = opts.logprobs;
  const scorePrompt = opts.promptLogprobs === true && top !== undefined;
  const promptLogprobs: (RowLogprobs | null)[] | undefined = scorePrompt ? [null] : undefined;
  const tokenLogprobs: RowLogprobs[] | undefined = top !== undefined ? [] : undefined;
  /** Logit rows for positions [from, to) of the prompt: every one when scoring it, else just the last. */
  const prefillRows = (from: number, to: number): Pick<PipelineStep, 'logitPositions' | 'logprobs'> => {
    if (!scorePrompt) return { logitPositions: { dtype: 'int64', dims: [1], data: BigInt64Array.of(BigInt(to - from - 1)) } };
    return {
      logitPositions: { dtype: 'int64', dims: [to - from], data: BigInt64Array.from(range(0, to - from), BigInt) },
      logprobs: { top: top!, targets: [range(from, to).map((p) => promptIds[p + 1] ?? -1)] },
    };
  };
  const keepPrompt = (r: StepResult, from: number, to: number) => {
    if (!promptLogprobs) return;
    // Row p scores prompt[p + 1]; the last prompt position scores the first generated token (or nothing).
    const rows = logprobsFrom(r, to - from);
    promptLogprobs.push(...rows.slice(0, Math.min(to, promptIds.length - 1) - from));
    if (to === promptIds.length) opts.onPromptLogprobs?.(promptLogprobs);
    return rows.at(-1);
  };
  if (opts.maxPositions !== undefined && promptIds.length + opts.maxNewTokens > opts.maxPositions) {
    throw new StrataError('prompt_too_long', `prompt (${promptIds.length} tokens) + max new tokens (${opts.maxNewTokens}) exceeds the model's context of ${opts.maxPositions}; shorten the prompt or lower max_tokens`);
  }
  // The last stage seeds its RNG from (seed, step); an unseeded request draws its seed once, here.
  const sampling = { ...opts.sampling, seed: opts.sampling?.seed ?? Math.floor(Math.random() * 2 ** 31) };
  const sessionId = randomUUID();
  const history = [...promptIds];
  // Only the repetition penalty reads the ids so far: without one a step does not carry them (they grow with the
  // context, and every hop encodes and decodes them).
  const penalized = (sampling.repetitionPenalty ?? 1) !== 1;
  const outputIds: number[] = [];
  let finishReason: GenerateResult['finishReason'] = 'length';
  try {
    // Chunked prefill: a long prompt goes through in pieces (each extending the KV cache), so the decode steps of
    // other sessions run between the pieces at every stage instead of waiting for the whole prompt.
    const chunk = Math.max(1, opts.prefillChunk ?? DEFAULT_PREFILL_CHUNK);
    let start = 0;
    for (; promptIds.length - start > chunk; start += chunk) {
      const r = await stepper.step(sessionId, {
        inputIds: i64([promptIds.slice(start, start + chunk)]), positionIds: i64([range(start, start + chunk)]), attentionMask: attendAll(start + chunk),
        ...prefillRows(start, start + chunk),
      });
      keepPrompt(r, start, start + chunk);
    }
    let input: PipelineStep = {
      inputIds: i64([promptIds.slice(start)]), positionIds: i64([range(start, promptIds.length)]), attentionMask: attendAll(promptIds.length),
      ...prefillRows(start, promptIds.length),
    };
    // Scoring only: the last prefill piece still runs, for its logprobs.
    if (opts.maxNewTokens === 0 && scorePrompt) keepPrompt(await stepper.step(sessionId, input), start, promptIds.length);
    // The first token comes alone (time to first token); later requests may ask for several decode steps each.
    const chain = Math.max(1, Math.min(MAX_DECODE_STEPS, stepper.decodeSteps ?? 1));
    const stopTokens = opts.eosTokenId != null ? [opts.eosTokenId] : [];
    decode: for (let i = 0; i < opts.maxNewTokens; ) {
      if (top !== undefined && !input.logprobs) input.logprobs = { top, targets: [[-1]] };
      const steps = i === 0 ? 1 : Math.min(chain, opts.maxNewTokens - i);
      const r = await stepper.step(sessionId, {
        ...input, select: { sampling, history: penalized ? [history] : [], step: i }, ...(steps > 1 ? { steps } : {}), ...(stopTokens.length ? { stopTokens } : {}),
        ...(i + steps >= opts.maxNewTokens ? { finalRequest: true } : {}),
      });
      const tokens = r.tokens ?? [];
      // A stage may run fewer steps than asked (a stop token, the context's end, a worker from before chains): never more.
      if (tokens.length < 1 || tokens.length > steps) throw new StrataError('stage_error', `the last stage chose ${tokens.length} tokens for a request of ${steps} steps`, 'internal');
      const lps = i === 0 && scorePrompt ? [keepPrompt(r, start, promptIds.length)] : top !== undefined ? logprobsFrom(r, tokens.length) : [];
      for (const [k, next] of tokens.entries()) {
        const lp = lps[k];
        if (lp) tokenLogprobs!.push(lp);
        outputIds.push(next);
        history.push(next);
        if (opts.onToken?.(next, i + k, lp) === false || (opts.eosTokenId != null && next === opts.eosTokenId)) {
          finishReason = 'stop';
          break decode;
        }
      }
      i += tokens.length;
      input = { inputIds: i64([[history.at(-1)!]]), positionIds: i64([[history.length - 1]]), attentionMask: attendAll(history.length) };
    }
  } finally {
    await stepper.end(sessionId);
  }
  return { outputIds, finishReason, ...(tokenLogprobs ? { tokenLogprobs } : {}), ...(promptLogprobs ? { promptLogprobs } : {}) };
}

/** Logits for every position of one sequence: [T][vocab]. */
export async function forwardLogits(stepper: Stepper, ids: number[]): Promise<number[][]> {
  const logits = await forwardRows(stepper, ids, range(0, ids.length));
  return toRows(logits);
}

/** One step over a whole sequence in a throw-away session: logits for `positions`, or the pooled hidden state. */
async function oneShot(stepper: Stepper, ids: number[], positions: number[], output?: PipelineStep['output']): Promise<StepResult> {
  if (ids.length === 0) throw new StrataError('prompt_empty', 'the input has no tokens');
  const sessionId = randomUUID();
  try {
    return await stepper.step(sessionId, {
      inputIds: i64([ids]), positionIds: i64([range(0, ids.length)]), attentionMask: i64([ids.map(() => 1)]),
      logitPositions: { dtype: 'int64', dims: [positions.length], data: BigInt64Array.from(positions, BigInt) }, output,
    });
  } finally {
    await stepper.end(sessionId);
  }
}

const forwardRows = async (stepper: Stepper, ids: number[], positions: number[]): Promise<TensorData> => (await oneShot(stepper, ids, positions)).logits!;

export function toRows(logits: TensorData): number[][] {
  const [, rows, vocab] = logits.dims;
  const data = logits.data as Float32Array;
  return range(0, rows).map((r) => Array.from(data.subarray(r * vocab, (r + 1) * vocab)));
}

export interface FillMaskCandidate {
  id: number;
  score: number;
}

/** Top-k candidates (softmax probabilities) for the token at `maskIndex`, as HF's fill-mask pipeline scores them. */
export async function fillMask(stepper: Stepper, ids: number[], maskIndex: number, topK: number): Promise<FillMaskCandidate[]> {
  if (!Number.isInteger(maskIndex) || maskIndex < 0 || maskIndex >= ids.length) {
    throw new StrataError('mask_index_invalid', `mask index ${maskIndex} is outside the input (length ${ids.length})`);
  }
  const row = toRows(await forwardRows(stepper, ids, [maskIndex]))[0];
  return topKSoftmax(row, topK);
}

export function topKSoftmax(row: number[], k: number): FillMaskCandidate[] {
  const max = Math.max(...row);
  let sum = 0;
  for (const v of row) sum += Math.exp(v - max);
  return row
    .map((v, id) => ({ id, score: Math.exp(v - max) / sum }))
    .sort((a, b) => b.score - a.score || a.id - b.id)
    .slice(0, k);
}

/** Mean-pooled last hidden state of one sequence (the /v1/embeddings vector). */
export async function embed(stepper: Stepper, ids: number[]): Promise<Float32Array> {
  return (await oneShot(stepper, ids, [ids.length - 1], 'hidden_mean')).hiddenMean!.data as Float32Array;
}
