import { createHash } from 'node:crypto';
import { UnrecoverableError, Worker, type Job } from 'bullmq';
import type { ModelSpec } from '../../model/config.ts';
import { isStrataError, StrataError } from '../../model/errors.ts';
import type { StrataTokenizer } from '../../model/tokenizer.ts';
import { runJob } from '../api/jobs/run.ts';
import type { JobResult, ModelContext, ResolvedJob, ServingPipeline } from '../api/jobs/types.ts';
import { resolveJob } from '../api/jobs/validate.ts';
import {
  e2eLatency, generationTokens, promptTokens, requestFailure, requestSuccess, timePerOutputToken, timeToFirstToken,
} from '../metrics.ts';
import { checkEvictionPolicy, connect, defaultLog, hangUp, QUEUE_NAME, redisUnavailable, redisUrlFromEnv, settlesWithin, throttled, withTimeout, type QueueConfig } from './connection.ts';
import { formatFailure, NON_RETRYABLE } from './failure.ts';

export interface QueueWorkerOptions extends QueueConfig {
  pipeline: ServingPipeline;
  spec: ModelSpec;
  tokenizer: StrataTokenizer | null;
  /** Jobs in flight at once: enough to keep every stage busy (default 8, `STRATA_CONCURRENCY`). */
  concurrency?: number;
  /** Most choices per completion (n). Default 16. */
  maxN?: number;
  /** Minimum interval between two progress events of one choice (default 20 ms). */
  progressIntervalMs?: number;
  /** How long to wait for Redis at startup before failing (default 10 s). */
  startupTimeoutMs?: number;
  /** How long close() waits for active jobs (default 60 s). */
  closeTimeoutMs?: number;
  /**
   * BullMQ job lock: a consumer renews it every half of this while it runs a job; when the consumer dies the lock
   * lapses and another consumer's stalled-job check hands the job to itself (a re-run from scratch).
   * Default `STRATA_JOB_LOCK_MS`, else 30 000.
   */
  lockDurationMs?: number;
  /** How often this consumer looks for stalled jobs (default `STRATA_JOB_STALLED_INTERVAL_MS`, else the lock duration). */
  stalledIntervalMs?: number;
  /** Stalls a job may survive before it fails (default `STRATA_JOB_MAX_STALLED`, else 1 = BullMQ's). */
  maxStalledCount?: number;
}

/** Lock and stalled-job settings from options, then `STRATA_JOB_*`, then defaults; validated. */
export function jobLockSettings(o: Pick<QueueWorkerOptions, 'lockDurationMs' | 'stalledIntervalMs' | 'maxStalledCount'> = {}) {
  const pick = (v: number | undefined, env: string, dflt: number, min: number, what: string): number => {
    const raw = v ?? (process.env[env] ? Number(process.env[env]) : dflt);
    if (!Number.isInteger(raw) || raw < min) {
      throw new StrataError('invalid_config', `${what} must be an integer >= ${min}, got ${raw} (${env})`, 'invalid_argument');
    }
    return raw;
  };
  const lockDuration = pick(o.lockDurationMs, 'STRATA_JOB_LOCK_MS', 30_000, 500, 'the job lock duration (ms)');
  return {
    lockDuration,
    stalledInterval: pick(o.stalledIntervalMs, 'STRATA_JOB_STALLED_INTERVAL_MS', lockDuration, 100, 'the stalled-job check interval (ms)'),
    maxStalledCount: pick(o.maxStalledCount, 'STRATA_JOB_MAX_STALLED', 1, 0, 'the most stalls a job survives'),
  };
}

export interface QueueWorkerHandle {
  worker: Worker;
  /** Stops taking jobs and waits for the active ones to finish (BullMQ `worker.close()`). */
  close(): Promise<void>;
}

/** The consumer: a BullMQ worker that runs jobs on the pipeline, streams tokens as job progress and returns the result. */
export async function startQueueWorker(opts: QueueWorkerOptions): Promise<QueueWorkerHandle> {
  const url = opts.redisUrl ?? redisUrlFromEnv();
  const log = opts.log ?? defaultLog();
  const name = opts.queueName ?? QUEUE_NAME;
  const ctx: ModelContext = { spec: opts.spec, tokenizer: opts.tokenizer, canEmbed: typeof opts.pipeline.embed === 'function', maxN: opts.maxN };
  const connection = connect(url, 'blocking', log);
  const concurrency = opts.concurrency ?? (Number(process.env.STRATA_CONCURRENCY) || 8);
  const locks = jobLockSettings(opts);

  const processor = async (job: Job): Promise<JobResult> => {
    let req: ResolvedJob;
    try {
      req = resolveJob(job.data, ctx, job.name);
    } catch (e) {
      // A bad job fails once with the reason; retrying it cannot help.
      requestFailure.inc({ code: isStrataError(e) ? e.code : 'invalid_payload' });
      throw new UnrecoverableError(formatFailure(e));
    }
    const enqueued = job.timestamp || Date.now();
    const lastToken = new Map<number, number>();
    // BullMQ counts every start: > 1 means a retry after a failure, or a re-run after the job stalled (its
    // consumer died or lost its lock). Generation restarts from scratch; the deltas say so.
    const attempt = Math.max(1, job.attemptsStarted || 1);
    if (attempt > 1) log.info({ jobId: job.id, attempt, stalled: job.stalledCounter, failed: job.attemptsMade }, 're-running job from the start');
    try {
      const result = await runJob(req, opts.pipeline, ctx, {
        attempt,
        progressIntervalMs: opts.progressIntervalMs,
        defaultSeed: createHash('sha256').update(String(job.id)).digest().readUInt32BE(0),
        progress: (p) => job.updateProgress(p as unknown as object),
        onToken: (choice, at) => {
          const prev = lastToken.get(choice);
          if (prev === undefined) timeToFirstToken.observe(Math.max(0, at - enqueued) / 1000);
          else timePerOutputToken.observe((at - prev) / 1000);
          lastToken.set(choice, at);
        },
      });
      recordSuccess(req, result, enqueued);
      return result;
    } catch (e) {
      requestFailure.inc({ code: isStrataError(e) ? e.code : 'internal_error' });
      const reason = formatFailure(e);
      if (isStrataError(e) && NON_RETRYABLE.has(e.kind)) throw new UnrecoverableError(reason);
      log.warn({ jobId: job.id, attempt: job.attemptsMade + 1, reason }, 'job attempt failed; BullMQ retries it with backoff while attempts remain');
      throw new Error(reason);
    }
  };

  const worker = new Worker(name, processor, { connection, prefix: opts.prefix ?? 'bull', concurrency, autorun: false, ...locks });
  worker.on('error', throttled(log, `worker ${name}`));
  worker.on('failed', (job, err) => log.info({ jobId: job?.id, reason: err.message }, 'job failed'));
  worker.on('stalled', (jobId) => log.warn({ jobId }, 'job stalled (its consumer stopped renewing the lock); it runs again from the start'));

  try {
    await withTimeout(connection.status === 'ready' ? Promise.resolve() : new Promise<void>((r) => connection.once('ready', () => r())), opts.startupTimeoutMs ?? 10_000, () => redisUnavailable(url, 'is not reachable'));
  } catch (e) {
    hangUp(connection);
    await settlesWithin(worker.close(true), 1000);
    hangUp(connection);
    throw e;
  }
  await checkEvictionPolicy(connection, log);
  void worker.run().catch((e) => log.error({ err: (e as Error).message }, 'queue worker stopped'));
  log.info({ queue: name, concurrency, ...locks }, 'queue worker started');

  return {
    worker,
    async close() {
      // Graceful: active jobs finish and report. Without Redis nothing can report (their locks lapse and another
      // worker retries them), so the worker is then closed by force instead of waiting for Redis.
      const up = connection.status === 'ready';
      if (!up) hangUp(connection);
      if (!(await settlesWithin(worker.close(!up), up ? (opts.closeTimeoutMs ?? 60_000) : 1000)) && up) {
        log.warn('queue worker did not close in time; disconnecting (unfinished jobs are retried once their lock expires)');
      }
      hangUp(connection);
    },
  };
}

function recordSuccess(req: ResolvedJob, result: JobResult, enqueued: number): void {
  e2eLatency.observe({ kind: req.kind }, (Date.now() - enqueued) / 1000);
  if (result.kind === 'generate') {
    promptTokens.inc(result.usage.prompt_tokens);
    generationTokens.inc(result.usage.completion_tokens ?? 0);
    for (const c of result.choices) requestSuccess.inc({ finish_reason: c.finish_reason });
  } else {
    promptTokens.inc(result.kind === 'embed' ? result.usage.prompt_tokens : result.input_ids.length);
    requestSuccess.inc({ finish_reason: 'complete' });
  }
}
