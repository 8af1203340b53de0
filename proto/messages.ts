import type { ErrorRecord } from '../model/errors.ts';
import type { WireIdentity, WireTensor } from './wire.ts';

/**
 * The Stage service's messages (stage.proto) as TypeScript shapes, field names as on the wire. Every transport
 * carries these; the gRPC one encodes them with protobuf.
 */

export interface WireStepRequest {
  session_id: string;
  fingerprint: string;
  first: number;
  input_ids?: WireTensor | null;
  hidden?: WireTensor | null;
  position_ids: WireTensor;
  attention_mask: WireTensor;
  logit_positions?: WireTensor | null;
  select?: {
    sampling: { temperature: number; top_k: number; top_p: number; repetition_penalty: number; seed: number };
    history: { ids: number[] }[];
    step: number;
  } | null;
  output?: 'TOKENS_OR_LOGITS' | 'HIDDEN_MEAN';
  logprobs?: { top: number; targets: number[] } | null;
  reply_to?: string;
  timings?: WireTiming[];
  /** Decode steps to chain on a one-stage pipeline (absent or 0 from older coordinators: one), and where to stop. */
  steps?: number;
  stop_tokens?: number[];
  /** The session's generation ends with this request unless it stops early (a hint for run-ahead). */
  final_request?: boolean;
}

export interface WireStepReply {
  logits?: WireTensor | null;
  tokens: number[];
  hidden_mean?: WireTensor | null;
  logprobs?: { top: number; rows: number; ids: number[]; values: number[] } | null;
  timings: WireTiming[];
  delivered?: boolean;
}

export type WireStepError = ErrorRecord;

/** One item of a StepBatch reply: `reply` when the step succeeded, else `error`. */
export interface WireStepOutcome {
  reply?: WireStepReply | null;
  error?: WireStepError | null;
}

export interface WireStepBatch {
  call_id?: number;
  steps?: WireStepRequest[];
}

export interface WireStepBatchReply {
  call_id: number;
  outcomes: WireStepOutcome[];
  error?: WireStepError | null;
}

/** What a stage sends on a coordinator's Results subscription: `ready` once, then replies and pass-on errors. */
export interface WireResultsMessage {
  ready: boolean;
  replies: WireDelivered[];
}

export interface WireDelivered {
  session_id: string;
  reply?: WireStepReply | null;
  error?: WireStepError | null;
}

export interface WireTiming {
  first: number;
  last: number;
  run_ms: number;
  start_unix_ms: number;
  batch: number;
  pid: number;
  /** Host↔device bytes of that run (absent from older workers), and of them KV bytes. */
  host_to_device_bytes?: number;
  device_to_host_bytes?: number;
  kv_host_bytes?: number;
  /** The run was made before the step arrived (a one-stage pipeline's run-ahead; absent from older workers). */
  ahead?: boolean;
  /** Decode steps the timing covers (a chained request; absent or 0: one), run_ms their sum. */
  steps?: number;
}

export interface WireInfo {
  identity: WireIdentity;
  configured: boolean;
  next_address: string;
  pid: number;
  device: string;
  memory_bytes: number;
  speed: number;
  sessions: number;
  kv_bytes: number;
  /** Load progress (stage protocol field 10): null from a worker that predates it. */
  load?: WireLoadState | null;
  /** Run-ahead's counts on a one-stage worker (stage protocol field 11; null when it does not run ahead). */
  run_ahead?: { ran: number; claimed: number; undone: number; unclaimed: number } | null;
  /** KV slot rows the loaded stage holds (stage protocol field 12; 0 when none is loaded or the worker predates it). */
  kv_slots?: number;
}

/** model/progress.ts's LoadProgress on the wire (eta_ms -1 = unknown). */
export interface WireLoadState {
  phase: string;
  range: string;
  done_bytes: number;
  total_bytes: number;
  tensors: number;
  tensors_total: number;
  elapsed_ms: number;
  bytes_per_sec: number;
  eta_ms: number;
  cached: boolean;
  error: string;
}

export interface WireConfigureRequest {
  first: number;
  last: number;
  dtype: string;
  next_address: string;
  fingerprint: string;
}

export interface WireIdentityReply {
  identity: WireIdentity;
}
