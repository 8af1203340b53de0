import type { PipelineStep, StepResult } from '../model/generation.ts';
import type { WeightDType } from '../model/stage-graph.ts';
import type { BlockRange } from '../model/range.ts';
import type { ErrorRecord } from '../model/errors.ts';
import type { LoadProgress } from '../model/progress.ts';
import type { Transfer } from '../model/executor.ts';

/** Messages between a worker's main thread (gRPC) and the thread that owns the ORT session and KV caches. */
export interface LoadRequest {
  type: 'load';
  modelDir: string;
  range: BlockRange;
  dtype: WeightDType;
  cacheDir?: string;
  threads?: number;
  device?: string;
  kvBudgetBytes: number;
  sessionTtlMs: number;
  maxBatch?: number;
  /** A one-stage pipeline runs each session's next decode step before it is asked (worker/run-ahead.ts; default on). */
  runAhead?: boolean;
  /**
   * A chained request (PipelineStep.steps) is answered once its steps have run this long, however many it asked for
   * (default DEFAULT_CHAIN_MS): a streaming client hears from a one-stage worker at least that often (plus one step),
   * and a model whose one step takes longer (GPT-J-6B on a CPU) answers one token per request. So a request may ask
   * for a long chain (--decode-steps, default 16), which pays off where steps are fast.
   */
  chainMs?: number;
}

export const DEFAULT_CHAIN_MS = 50;

export interface LoadedInfo {
  fingerprint: string;
  paramBytes: number;
  provider: string;
  built: boolean;
  /** KV slots the stage allocated (0 for encoders). */
  kvSlots: number;
}

export type ThreadRequest =
  | LoadRequest
  | { type: 'step'; sessionId: string; input: PipelineStep }
  | { type: 'steps'; steps: { sessionId: string; input: PipelineStep }[] }
  | { type: 'end'; sessionId: string }
  | { type: 'stats' };

export interface StepDone {
  result: StepResult;
  /** Only when this stage is not the last: the hidden states to forward. */
  hidden?: StepResult['logits'];
  runMs: number;
  startUnixMs: number;
  /** Sessions that shared the ORT run. */
  batch: number;
  /** Bytes that run moved between host and device memory (0 on the CPU EP), and how many of them were KV cache. */
  transfer?: Transfer;
  /** The run was made ahead of the request, from the stage's prediction of it (worker/run-ahead.ts). */
  ahead?: boolean;
  /** Decode steps a chained request ran (PipelineStep.steps); runMs and transfer are their sums. Absent: one. */
  steps?: number;
}

export type ThreadReply = { id: number; ok: true; value: unknown } | { id: number; ok: false; error: ThreadError } | { id: -1; progress: string; load?: LoadProgress };

export type ThreadError = ErrorRecord;

/** One item of a 'steps' request: its own result or its own error. */
export type StepOutcome = { ok: true; done: StepDone } | { ok: false; error: ThreadError };
