import { MAX_DECODE_STEPS, type PipelineStep, type StepResult } from '../model/generation.ts';
import { StrataError } from '../model/errors.ts';
import type { TensorData } from '../model/tensor.ts';
import type { WireStepReply, WireStepRequest } from './messages.ts';
import { fromWire, toWire } from './wire.ts';
import { flattenLogprobs, MAX_TOP_LOGPROBS, unflattenLogprobs } from '../model/logprobs.ts';

/** Stop tokens one chained step may name (an EOS id or a few). */
const MAX_STOP_TOKENS = 16;

/** PipelineStep → StepRequest. `hidden` replaces token ids on hops after stage 0. */
export function stepToWire(sessionId: string, target: { fingerprint: string; first: number }, input: PipelineStep, hidden?: TensorData): WireStepRequest {
  const sel = input.select;
  return {
    session_id: sessionId,
    fingerprint: target.fingerprint,
    first: target.first,
    input_ids: hidden || !input.inputIds ? null : toWire(input.inputIds),
    hidden: hidden ? toWire(hidden) : null,
    position_ids: toWire(input.positionIds),
    attention_mask: toWire(input.attentionMask),
    logit_positions: input.logitPositions ? toWire(input.logitPositions) : null,
    select: sel
      ? {
          sampling: {
            temperature: sel.sampling.temperature ?? 0, top_k: sel.sampling.topK ?? 0, top_p: sel.sampling.topP ?? 0,
            repetition_penalty: sel.sampling.repetitionPenalty ?? 0, seed: sel.sampling.seed ?? 0,
          },
          history: sel.history.map((ids) => ({ ids })),
          step: sel.step,
        }
      : null,
    output: input.output === 'hidden_mean' ? 'HIDDEN_MEAN' : 'TOKENS_OR_LOGITS',
    logprobs: input.logprobs ? { top: input.logprobs.top, targets: input.logprobs.targets.flat() } : null,
    steps: input.steps ?? 0,
    stop_tokens: input.stopTokens ?? [],
    final_request: input.finalRequest === true,
  };
}

/** StepRequest → PipelineStep, validating every tensor (dtype, shape, byte count) before anything allocates. */
export function stepFromWire(req: WireStepRequest): { input: PipelineStep; hidden?: TensorData } {
  const need = (t: TensorData | undefined, name: string, dtype: string, rank: number): TensorData => {
    if (!t) throw new StrataError('step_field_missing', `StepRequest has no ${name}`);
    if (t.dtype !== dtype || t.dims.length !== rank) throw new StrataError('tensor_shape_invalid', `${name} must be a rank-${rank} ${dtype} tensor, got ${t.dtype} [${t.dims.join(', ')}]`);
    return t;
  };
  if (typeof req.session_id !== 'string' || req.session_id.length === 0 || req.session_id.length > 128) {
    throw new StrataError('session_id_invalid', 'session_id must be a non-empty string of at most 128 characters');
  }
  const positionIds = need(fromWire(req.position_ids, 'position_ids'), 'position_ids', 'int64', 2);
  const attentionMask = need(fromWire(req.attention_mask, 'attention_mask'), 'attention_mask', 'int64', 2);
  const inputIds = fromWire(req.input_ids, 'input_ids');
  if (inputIds) need(inputIds, 'input_ids', 'int64', 2);
  const hidden = fromWire(req.hidden, 'hidden');
  const logitPositions = fromWire(req.logit_positions, 'logit_positions');
  if (logitPositions) {
    need(logitPositions, 'logit_positions', 'int64', 1);
    const seq = positionIds.dims[1];
    for (const p of logitPositions.data as BigInt64Array) {
      if (p < 0n || p >= BigInt(seq)) throw new StrataError('logit_positions_invalid', `logit position ${p} is outside the step's ${seq} positions`);
    }
  }
  if (positionIds.dims[0] !== attentionMask.dims[0] || attentionMask.dims[1] < positionIds.dims[1]) {
    throw new StrataError('tensor_shape_invalid', `attention_mask [${attentionMask.dims}] does not cover position_ids [${positionIds.dims}]`);
  }
  const s = req.select;
  const rows = logitPositions ? logitPositions.dims[0] : positionIds.dims[1];
  const lp = req.logprobs;
  if (lp && (!Number.isInteger(lp.top) || lp.top > MAX_TOP_LOGPROBS || (lp.targets ?? []).length !== positionIds.dims[0] * rows)) {
    throw new StrataError('logprobs_invalid', `logprobs must ask for at most ${MAX_TOP_LOGPROBS} top tokens and name one target per batch row and logit row (${positionIds.dims[0]} × ${rows})`);
  }
  const steps = req.steps ?? 0;
  if (!Number.isInteger(steps) || steps < 0 || steps > MAX_DECODE_STEPS) {
    throw new StrataError('steps_invalid', `a step may chain at most ${MAX_DECODE_STEPS} decode steps, got ${steps}`);
  }
  const stopTokens = (req.stop_tokens ?? []).map(Number);
  if (stopTokens.length > MAX_STOP_TOKENS) throw new StrataError('steps_invalid', `a step may name at most ${MAX_STOP_TOKENS} stop tokens, got ${stopTokens.length}`);
  const input: PipelineStep = {
    inputIds, positionIds, attentionMask, logitPositions,
    ...(steps > 1 ? { steps } : {}),
    ...(stopTokens.length ? { stopTokens } : {}),
    ...(req.final_request ? { finalRequest: true } : {}),
    output: req.output === 'HIDDEN_MEAN' ? 'hidden_mean' : 'tokens_or_logits',
    select: s
      ? {
          sampling: {
            temperature: s.sampling?.temperature || undefined, topK: s.sampling?.top_k || undefined, topP: s.sampling?.top_p || undefined,
            repetitionPenalty: s.sampling?.repetition_penalty || undefined, seed: s.sampling?.seed ?? 0,
          },
          history: (s.history ?? []).map((h) => h.ids.map(Number)),
          step: s.step,
        }
      : undefined,
    logprobs: lp
      ? { top: lp.top, targets: Array.from({ length: positionIds.dims[0] }, (_, b) => lp.targets.slice(b * rows, (b + 1) * rows).map(Number)) }
      : undefined,
  };
  return { input, hidden };
}

export function resultToWire(r: StepResult, timings: WireStepReply['timings']): WireStepReply {
  return {
    logits: r.logits ? toWire(r.logits) : null,
    tokens: r.tokens ?? [],
    hidden_mean: r.hiddenMean ? toWire(r.hiddenMean) : null,
    logprobs: r.logprobs ? flattenLogprobs(r.logprobs, Math.max(0, ...r.logprobs.flat().map((x) => x.top.length))) : null,
    timings,
  };
}

export function resultFromWire(r: WireStepReply): StepResult & { timings: WireStepReply['timings'] } {
  return {
    logits: fromWire(r.logits, 'logits'),
    tokens: r.tokens?.length ? r.tokens.map(Number) : undefined,
    hiddenMean: fromWire(r.hidden_mean, 'hidden_mean'),
    logprobs: r.logprobs ? unflattenLogprobs({ ...r.logprobs, ids: r.logprobs.ids.map(Number) }) : undefined,
    timings: r.timings ?? [],
  };
}
