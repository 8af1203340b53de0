/**
 * Every error code strata raises, in one list: its kind, the HTTP and gRPC status it answers with, and whether the
 * coordinator may recover from it (re-plan the pipeline and replay the session's tokens) instead of failing the
 * request. `StrataError`'s code is typed as a key of this list, so a misspelt code fails `tsc`.
 *
 * Adding a code is one line here: `my_code: entry('invalid_argument')`, with `{ http: 501 }` to answer other than
 * the kind's HTTP status, `{ recoverable: true }` when a re-plan and replay can cure it. Kinds `unavailable` are
 * recoverable unless `{ recoverable: false }`.
 */
export type ErrorKind = 'invalid_argument' | 'not_found' | 'failed_precondition' | 'unavailable' | 'resource_exhausted' | 'internal';

/** The gRPC status names strata answers with (grpc.status keys; model/ imports no gRPC). */
export type GrpcStatusName = 'INVALID_ARGUMENT' | 'NOT_FOUND' | 'FAILED_PRECONDITION' | 'UNAVAILABLE' | 'RESOURCE_EXHAUSTED' | 'INTERNAL';

export interface ErrorEntry {
  kind: ErrorKind;
  http: number;
  grpc: GrpcStatusName;
  /** A re-plan of the pipeline plus a replay of the session's tokens can cure it (coordinator/recovery.ts). */
  recoverable: boolean;
}

/** What each kind answers with, unless an entry says otherwise. */
export const KIND_STATUS: Record<ErrorKind, { http: number; grpc: GrpcStatusName }> = {
  invalid_argument: { http: 400, grpc: 'INVALID_ARGUMENT' },
  not_found: { http: 404, grpc: 'NOT_FOUND' },
  failed_precondition: { http: 422, grpc: 'FAILED_PRECONDITION' },
  resource_exhausted: { http: 429, grpc: 'RESOURCE_EXHAUSTED' },
  unavailable: { http: 503, grpc: 'UNAVAILABLE' },
  internal: { http: 500, grpc: 'INTERNAL' },
};

function entry(kind: ErrorKind, o: Partial<Omit<ErrorEntry, 'kind'>> = {}): ErrorEntry {
  return { kind, ...KIND_STATUS[kind], recoverable: kind === 'unavailable', ...o };
}

const replay = { recoverable: true };

export const ERROR_CATALOGUE = {
  // ---- model directory, config, weights, tokenizer (model/) ----
  model_dir_invalid: entry('invalid_argument'),
  config_unreadable: entry('invalid_argument'),
  config_missing_field: entry('invalid_argument'),
  config_bad_heads: entry('invalid_argument'),
  config_bad_rotary: entry('invalid_argument'),
  config_unsupported_activation: entry('invalid_argument'),
  config_unsupported_model_type: entry('invalid_argument'),
  family_duplicate: entry('internal'),
  family_unknown: entry('failed_precondition'),
  synthetic_unsupported: entry('invalid_argument'),
  weights_missing: entry('invalid_argument'),
  weights_invalid: entry('invalid_argument'),
  weight_missing: entry('invalid_argument'),
  weight_shape_mismatch: entry('invalid_argument'),
  weight_dtype_unsupported: entry('invalid_argument'),
  tokenizer_invalid: entry('failed_precondition'),
  tokenizer_missing: entry('invalid_argument'),
  invalid_block_range: entry('invalid_argument'),
  invalid_stage_count: entry('invalid_argument'),

  // ---- a step's input (model/, proto/ codecs) ----
  prompt_empty: entry('invalid_argument'),
  prompt_too_long: entry('invalid_argument'),
  mask_index_invalid: entry('invalid_argument'),
  invalid_sampling: entry('invalid_argument'),
  batch_input_invalid: entry('invalid_argument'),
  stage_input_invalid: entry('invalid_argument'),
  token_id_out_of_range: entry('invalid_argument'),
  tensor_dtype_invalid: entry('invalid_argument'),
  tensor_dtype_mismatch: entry('invalid_argument'),
  tensor_shape_invalid: entry('invalid_argument'),
  tensor_shape_mismatch: entry('invalid_argument'),
  tensor_size_mismatch: entry('invalid_argument'),
  tensor_too_large: entry('invalid_argument'),
  step_field_missing: entry('invalid_argument'),
  session_id_invalid: entry('invalid_argument'),
  logit_positions_invalid: entry('invalid_argument'),
  logprobs_invalid: entry('invalid_argument'),
  steps_invalid: entry('invalid_argument'),
  logprobs_unsupported: entry('failed_precondition'),
  stage_graph_invalid: entry('internal'),

  // ---- a stage worker (worker/) and its wire ----
  request_malformed: entry('invalid_argument'),
  step_batch_invalid: entry('invalid_argument'),
  subscriber_invalid: entry('invalid_argument'),
  dtype_invalid: entry('invalid_argument'),
  next_stage_missing: entry('invalid_argument'),
  checkpoint_mismatch: entry('failed_precondition'),
  peer_mismatch: entry('failed_precondition'),
  peer_range_mismatch: entry('failed_precondition'),
  stage_not_configured: entry('failed_precondition', replay),
  stage_mismatch: entry('failed_precondition', replay),
  session_unknown: entry('not_found', replay),
  session_evicted: entry('failed_precondition', replay),
  session_out_of_step: entry('failed_precondition', replay),
  kv_budget_exceeded: entry('resource_exhausted'),
  kv_slots_exhausted: entry('resource_exhausted'),
  attention_mask_unsupported: entry('invalid_argument'),
  device_invalid: entry('invalid_argument'),
  device_unavailable: entry('failed_precondition'),
  stage_thread_exited: entry('internal', replay),
  stage_internal: entry('internal'),
  stage_error: entry('internal'),
  stage_unavailable: entry('unavailable'),
  internal: entry('internal'),
  tls_file_unreadable: entry('invalid_argument'),
  tls_incomplete: entry('invalid_argument'),

  // ---- the coordinator's pipeline (coordinator/) ----
  no_workers: entry('failed_precondition'),
  protocol_mismatch: entry('failed_precondition'),
  plan_unusable: entry('failed_precondition'),
  pipeline_unavailable: entry('unavailable'),
  plan_bad_args: entry('invalid_argument'),
  plan_bad_dtype: entry('invalid_argument'),
  plan_bad_max_stages: entry('invalid_argument'),
  plan_bad_reserve: entry('invalid_argument'),
  plan_bad_size: entry('invalid_argument'),
  plan_bad_worker: entry('invalid_argument'),
  plan_bad_workers: entry('invalid_argument'),
  plan_no_workers: entry('invalid_argument'),
  plan_does_not_fit: entry('failed_precondition'),
  memory_limit_exceeded: entry('failed_precondition'),   // a stage's weights + KV + activations + runtime exceed its worker's memory
  float16_on_cpu: entry('invalid_argument'),             // the CPU EP would hold fp16 weights twice (fp16 + fp32 copies)

  // ---- the request queue (coordinator/queue/) ----
  queue_unavailable: entry('unavailable'),
  queue_full: entry('resource_exhausted'),
  invalid_config: entry('invalid_argument'),
  invalid_job_id: entry('invalid_argument'),
  idempotency_key_reused: entry('failed_precondition'),
  job_failed: entry('internal'),
  job_timeout: entry('unavailable', { http: 504 }),
  job_not_found: entry('not_found'),
  abandoned: entry('unavailable'),
  shutting_down: entry('unavailable'),

  // ---- the HTTP API and the jobs it validates (coordinator/api*.ts) ----
  invalid_body: entry('invalid_argument'),
  invalid_field: entry('invalid_argument'),
  invalid_kind: entry('invalid_argument'),
  invalid_payload: entry('invalid_argument'),
  unsupported_field: entry('invalid_argument'),
  batch_unsupported: entry('invalid_argument'),
  prompt_missing: entry('invalid_argument'),
  input_missing: entry('invalid_argument'),
  input_empty: entry('invalid_argument'),
  input_too_long: entry('invalid_argument'),
  input_too_many: entry('invalid_argument'),
  token_out_of_range: entry('invalid_argument'),
  mask_missing: entry('invalid_argument'),
  multiple_masks: entry('invalid_argument'),
  task_unsupported: entry('failed_precondition'),
  not_implemented: entry('failed_precondition', { http: 501 }),
  model_not_found: entry('not_found'),
  stream_restarted: entry('unavailable'),
  chat_template_missing: entry('invalid_argument'),
  chat_template_error: entry('invalid_argument'),
  internal_error: entry('internal'),
  // Answered by the HTTP layer itself (framework and socket errors), never thrown as a StrataError.
  invalid_request: entry('invalid_argument'),
  bad_http_request: entry('invalid_argument'),
  request_timeout: entry('invalid_argument', { http: 408 }),
  headers_too_large: entry('invalid_argument', { http: 431 }),

  // ---- quantization (model/quantize.ts) ----
  quant_bits_invalid: entry('invalid_argument'),
  quant_block_invalid: entry('invalid_argument'),
  quant_kernel_unavailable: entry('failed_precondition'),
  quant_source_dtype_unsupported: entry('invalid_argument'),

  // ---- the CLI and local clusters (bin/, bench/) ----
  ids_invalid: entry('invalid_argument'),
  redis_missing: entry('unavailable'),
  redis_start_failed: entry('unavailable'),
  worker_exited: entry('unavailable'),
  worker_start_timeout: entry('unavailable'),
  worker_failed: entry('unavailable'),                 // strata up: a worker died more often than it may be restarted
  flag_invalid: entry('invalid_argument'),
  bench_flag_invalid: entry('invalid_argument'),
  bench_preset_unknown: entry('invalid_argument'),
  bench_shape_invalid: entry('invalid_argument'),
  bench_suite_unknown: entry('invalid_argument'),
  bench_read_failed: entry('internal'),
  bench_anchor_failed: entry('internal'),
  bench_cache_missing: entry('internal'),
  bench_memory_failed: entry('internal'),

  // ---- raised only by tests (a stand-in transient failure) ----
  stage_unreachable: entry('unavailable'),
} satisfies Record<string, ErrorEntry>;

export type ErrorCode = keyof typeof ERROR_CATALOGUE;

/** The entry of a code, or undefined for a code this version does not know (a newer peer's). */
export const errorEntry = (code: string): ErrorEntry | undefined =>
  Object.hasOwn(ERROR_CATALOGUE, code) ? ERROR_CATALOGUE[code as ErrorCode] : undefined;

/**
 * The status an error answers with: its code's entry, unless it was raised with another kind than the entry's (or a
 * code this version does not know), when its kind's.
 */
export function statusOf(e: { code: string; kind: ErrorKind }): { http: number; grpc: GrpcStatusName } {
  const entry = errorEntry(e.code);
  return entry && entry.kind === e.kind ? entry : (KIND_STATUS[e.kind] ?? KIND_STATUS.internal);
}
