import type { Logger } from 'pino';
import type { ModelSpec } from '../../model/config.ts';
import { StrataError } from '../../model/errors.ts';
import type { StrataTokenizer } from '../../model/tokenizer.ts';
import type { ChatTemplate } from '../../model/chat-template.ts';
import { canonical, checkJobId, type RequestQueue } from '../queue.ts';
import { resolveJob, show, bad } from './jobs/validate.ts';
import type { JobPayload, ModelContext, TokenProgress } from './jobs/types.ts';

/** What every route module shares: the options, the model, and the steps from a request to a followed job. */

export interface StageInfo {
  blocks: [number, number];
  address: string;
  pid?: number;
  healthy: boolean;
  [extra: string]: unknown;
}

export interface ApiOptions {
  queue: RequestQueue;
  spec: ModelSpec;
  tokenizer: StrataTokenizer | null;
  /** The `model` clients name (and /v1/models lists). */
  modelName: string;
  pipelineInfo: () => { stages: StageInfo[] };
  /** Whether the pipeline can serve right now (every stage healthy). */
  health: () => boolean;
  /** Merged into /health's body: why it is 503 (e.g. which stage is still loading). */
  healthDetail?: () => Record<string, unknown>;
  /** Bearer token required on /v1/*; default `STRATA_API_TOKEN`; unset or empty = no auth. */
  authToken?: string;
  /** 429 once this many jobs wait (default `STRATA_MAX_QUEUED`, else 1000; 0 = no limit). */
  maxQueued?: number;
  /** Whether the pipeline computes embeddings (else /v1/embeddings answers 501). */
  canEmbed?: boolean;
  maxN?: number;
  /** Most prompts in one completions request (default STRATA_MAX_PROMPTS, else 64). */
  maxPrompts?: number;
  /** A chat template that overrides the tokenizer's (`--chat-template FILE`). */
  chatTemplate?: ChatTemplate;
  /** How long a request waits for its job (default 10 min; then 504, the job stays queryable). */
  requestTimeoutMs?: number;
  logger?: Logger;
}

/** The response header naming the job a request created or followed (also embedded in the OpenAI `id`). */
export const JOB_ID_HEADER = 'x-strata-job-id';

export interface RouteContext {
  opts: ApiOptions;
  model: ModelContext;
  /** Unix seconds the server started (/v1/models' `created`). */
  started: number;
  checkModel(o: Record<string, unknown>): void;
  priorityOf(o: Record<string, unknown>): number | undefined;
  idempotencyKey(headers: Record<string, unknown>, o: Record<string, unknown>): string | undefined;
  submit(payload: JobPayload, priority: number | undefined, jobId: string | undefined, onProgress?: (p: TokenProgress) => void): ReturnType<RequestQueue['submit']>;
}

export function createRouteContext(opts: ApiOptions): RouteContext {
  const { queue, modelName } = opts;
  const maxQueued = opts.maxQueued ?? (Number(process.env.STRATA_MAX_QUEUED) || 1000);
  const model: ModelContext = { spec: opts.spec, tokenizer: opts.tokenizer, canEmbed: opts.canEmbed ?? false, maxN: opts.maxN, maxPrompts: opts.maxPrompts };

  /** 429 once too many jobs wait; checked only when a new job would be added. */
  const checkCapacity = async () => {
    if (maxQueued > 0 && (await queue.waitingCount()) >= maxQueued) {
      throw new StrataError('queue_full', `the request queue holds ${maxQueued} or more waiting jobs; retry later`, 'resource_exhausted');
    }
  };
  /** Two job payloads ask for the same thing when they validate to the same request. */
  const sameRequest = (existing: unknown, payload: JobPayload): boolean => {
    try {
      return canonical(resolveJob(existing, model)) === canonical(resolveJob(payload, model));
    } catch {
      return false;
    }
  };

  return {
    opts, model, started: Math.floor(Date.now() / 1000),
    checkModel(o) {
      if (o.model !== undefined && o.model !== null && o.model !== modelName) {
        throw new StrataError('model_not_found', `model ${show(o.model)} is not served here; this server serves "${modelName}" (GET /v1/models)`, 'not_found');
      }
    },
    /** vLLM's `priority`: lower runs sooner, 0 (default) first. BullMQ: no priority runs before any priority 1..2^21. */
    priorityOf(o) {
      const p = o.priority;
      if (p === undefined || p === null || p === 0) return undefined;
      if (!Number.isInteger(p) || (p as number) < 0 || (p as number) > 2_097_151) throw bad('invalid_field', `priority must be an integer in [0, 2097151] (lower runs sooner), got ${show(p)}`);
      return p as number;
    },
    /**
     * The client's idempotency key: the `Idempotency-Key` header or the body's `job_id` (the same if both). It becomes
     * the BullMQ job id, so a resubmission follows the first job (or gets its stored answer) instead of running twice.
     */
    idempotencyKey(headers, o) {
      const header = headers['idempotency-key'];
      const h = header === undefined ? undefined : checkJobId(Array.isArray(header) ? header[0] : header, 'the Idempotency-Key header');
      const b = o.job_id === undefined || o.job_id === null ? undefined : checkJobId(o.job_id, 'job_id');
      if (h !== undefined && b !== undefined && h !== b) throw bad('invalid_job_id', 'the Idempotency-Key header and job_id differ; send one of them');
      return h ?? b;
    },
    submit: (payload, priority, jobId, onProgress) =>
      queue.submit(payload, { priority, jobId, onProgress, timeoutMs: opts.requestTimeoutMs, beforeAdd: checkCapacity, sameRequest }),
  };
}
