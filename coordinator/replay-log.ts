import type { PipelineStep } from '../model/generation.ts';
import type { TensorData } from '../model/tensor.ts';
import { isQuantized } from '../model/dtype.ts';

/** One session as the coordinator remembers it, to rebuild its KV caches after a stage is lost. */
export interface SessionLog {
  /** The session id the stages know now: a replay starts a fresh one so no stale cache can interfere. */
  wireId: string;
  epoch: number;
  /** Every step's token-level input so far (no hidden states: the coordinator never has them). */
  steps: PipelineStep[];
  /**
   * The session asked for logprobs: a replay re-runs its steps one by one as they first ran, so the rebuilt KV cache,
   * and every logprob after the fault, is bit-identical (one prefill of the same tokens rounds differently, ~1e-6).
   */
  exact?: boolean;
}

/**
 * Every live session's token-level inputs (causal models only: a masked model's request is one stateless pass).
 * After a fault the pipeline replays a session's log as one prefill under a fresh wire id, so greedy output is the
 * same as without the fault.
 */
export class ReplayLog {
  private readonly sessions = new Map<string, SessionLog>();

  /** `exact`: replay every session step by step (replayExactly), not only those that asked for logprobs. */
  constructor(
    private readonly causal: boolean,
    private readonly exact = false,
  ) {}

  /** The session's log; a new session's starts empty under its own id. */
  open(sessionId: string): SessionLog {
    let log = this.sessions.get(sessionId);
    if (!log) {
      log = { wireId: sessionId, epoch: 0, steps: [] };
      if (this.causal) this.sessions.set(sessionId, log);
    }
    return log;
  }

  /**
   * Keeps a step's token-level input for replay. A single-row step's mask covers every earlier position, and a
   * single-row replay uses only the last mask (concatSteps): the previous one is dropped, or a long generation would
   * keep masks of quadratic total size.
   */
  record(log: SessionLog, input: PipelineStep): void {
    if (!this.causal) return;
    if (input.logprobs || this.exact) log.exact = true;
    const prev = log.steps.at(-1);
    if (prev && prev.positionIds.dims[0] === 1 && input.positionIds.dims[0] === 1) prev.attentionMask = SUBSUMED_MASK;
    log.steps.push({ inputIds: input.inputIds, positionIds: input.positionIds, attentionMask: input.attentionMask });
  }

  /**
   * Moves a session to a fresh wire id and returns the old one and the steps that rebuild its caches: one prefill of
   * every token so far (each step as it was when the session had several rows). Even a session with no step recorded
   * yet gets the fresh id: its failed first step may have filled some stages' caches, and a retry under the old id
   * would meet them (session_out_of_step, again and again).
   */
  renew(log: SessionLog): { old: string; steps: PipelineStep[] } {
    const old = log.wireId;
    log.epoch++;
    log.wireId = `${old.replace(/#\d+$/, '')}#${log.epoch}`;
    if (log.steps.length === 0) return { old, steps: [] };
    const singleRow = log.steps.every((s) => s.positionIds.dims[0] === 1);
    const steps = !singleRow ? log.steps : log.exact ? withMasks(log.steps) : [concatSteps(log.steps)];
    return {
      old,
      steps: steps.map((s) => ({ ...s, logitPositions: { dtype: 'int64', dims: [1], data: BigInt64Array.of(BigInt(s.positionIds.dims[1] - 1)) } })),
    };
  }

  /** Forgets a session; returns the wire id the stages know it by. */
  end(sessionId: string): string {
    const log = this.sessions.get(sessionId);
    this.sessions.delete(sessionId);
    return log?.wireId ?? sessionId;
  }
}

/**
 * Whether sessions are replayed step by step after a fault. One prefill of the same tokens computes each row along
 * other kernel paths: in float32 it rounds ~1e-6 differently (a greedy pick could flip only on an exact near-tie);
 * with int8 weights (MatMulNBits, int8 activations) a GPT-J-sized random-weight model's greedy pick flipped after the
 * replay (1 of 3 requests, from its 8th token, in two runs) and step-by-step replay kept 3/3 identical. So quantized
 * stages replay exactly by default; STRATA_REPLAY=exact|prefill chooses for every dtype. Exact costs one pipeline
 * step per token generated so far instead of one prefill.
 */
export function replayExactly(dtype: string | undefined, env = process.env.STRATA_REPLAY): boolean {
  if (env === 'exact' || env === 'prefill') return env === 'exact';
  return dtype !== undefined && isQuantized(dtype);
}

/** Stands in for a recorded single-row mask that a later step's mask covers (see ReplayLog.record). */
const SUBSUMED_MASK: TensorData = { dtype: 'int64', dims: [1, 0], data: new BigInt64Array(0) };

/** Single-row steps as they ran: each subsumed mask is the prefix of the last one that covers its positions. */
function withMasks(steps: PipelineStep[]): PipelineStep[] {
  const last = steps.at(-1)!.attentionMask;
  let end = 0;
  return steps.map((s) => {
    end += s.positionIds.dims[1];
    if (s.attentionMask !== SUBSUMED_MASK) return s;
    return { ...s, attentionMask: { dtype: 'int64', dims: [1, end], data: (last.data as BigInt64Array).slice(0, end) } };
  });
}

/** Concatenates single-row steps into one prefill: same tokens, positions and mask, in one run. */
function concatSteps(steps: PipelineStep[]): PipelineStep {
  const cat = (pick: (s: PipelineStep) => TensorData | undefined): TensorData | undefined => {
    const parts = steps.map(pick);
    if (parts.some((p) => !p)) return undefined;
    const data = new BigInt64Array(parts.reduce((n, p) => n + p!.data.length, 0));
    let at = 0;
    for (const p of parts) (data.set(p!.data as BigInt64Array, at), (at += p!.data.length));
    return { dtype: 'int64', dims: [1, data.length], data };
  };
  const last = steps.at(-1)!;
  return { inputIds: cat((s) => s.inputIds), positionIds: cat((s) => s.positionIds)!, attentionMask: last.attentionMask };
}
