import { createHash, randomUUID } from 'node:crypto';
import { Queue, QueueEvents, UnrecoverableError, Worker, type Job, type JobsOptions } from 'bullmq';
import { Redis, type RedisOptions } from 'ioredis';
import { pino, type Logger } from 'pino';
import type { ModelSpec } from '../model/config.ts';
import { fromErrorRecord, isStrataError, StrataError, type ErrorKind } from '../model/errors.ts';
import type { StrataTokenizer } from '../model/tokenizer.ts';
import { resolveJob } from './api/jobs/validate.ts';
import { runJob } from './api/jobs/run.ts';
import type { JobPayload, JobResult, ModelContext, ResolvedJob, ServingPipeline, TokenProgress } from './api/jobs/types.ts';
import {
  e2eLatency, generationTokens, promptTokens, requestFailure, requestSuccess, timePerOutputToken, timeToFirstToken,
} from './metrics.ts';

export type { JobPayload, JobResult, TokenProgress, ServingPipeline } from './api/jobs/types.ts';

/**
 * The request queue on Redis (BullMQ). Producers (the HTTP API, `strata submit`, or any BullMQ client) add a
 * job whose data is a self-describing JSON payload (see api/jobs/types.ts); the consumer runs it against the pipeline,
 * streams tokens as job progress and returns the result as the job's return value.
 */
export const QUEUE_NAME = 'strata-requests';
export const redisUrlFromEnv = (): string => process.env.REDIS_URL || 'redis://127.0.0.1:6379';

/** Retries for transient failures (a worker restarting), retention so Redis does not fill with finished jobs. */
export const DEFAULT_JOB_OPTIONS: JobsOptions = {
  attempts: 3,
  backoff: { type: 'exponential', delay: 1000 },
  removeOnComplete: { age: 3600, count: 1000 },
  removeOnFail: { age: 24 * 3600, count: 5000 },
};

export interface QueueConfig {
  /** Default `REDIS_URL`, else redis://127.0.0.1:6379. */
  redisUrl?: string;
  /** Default `strata-requests`. */
  queueName?: string;
  /** BullMQ key prefix (default `bull`). */
  prefix?: string;
  log?: Logger;
}

const defaultLog = () => pino({ name: 'strata', level: process.env.STRATA_LOG_LEVEL ?? 'info' });

/**
 * Connections as BullMQ's production guide asks: blocking ones (Worker, QueueEvents) retry forever
 * (`maxRetriesPerRequest: null`); the producer's fail fast (no offline queue), so the API can answer 503 at once
 * when Redis is down instead of hanging.
 */
function connect(url: string, role: 'blocking' | 'fail-fast', log: Logger): Redis {
  // A short disconnectTimeout: after a Redis outage a closing socket is destroyed in 0.5 s, not ioredis' 2 s.
  const common: RedisOptions = { connectTimeout: 2000, disconnectTimeout: 500, retryStrategy: (times) => Math.min(times * 200, 2000) };
  const opts: RedisOptions = role === 'blocking'
    ? { ...common, maxRetriesPerRequest: null }
    : { ...common, maxRetriesPerRequest: 1, enableOfflineQueue: false };
  const redis = new Redis(url, opts);
  redis.on('error', throttled(log, `redis ${redactUrl(url)}`));
  // BullMQ duplicates a connection it is given for its blocking reads, and its close() waits for Redis forever
  // when Redis is gone. Tracking the duplicates lets hangUp() drop every socket so the process can exit.
  const copies: Redis[] = [];
  const duplicate = redis.duplicate.bind(redis);
  redis.duplicate = ((...args: Parameters<Redis['duplicate']>) => {
    const copy = duplicate(...args);
    copies.push(copy);
    return copy;
  }) as Redis['duplicate'];
  duplicates.set(redis, copies);
  return redis;
}

const duplicates = new WeakMap<Redis, Redis[]>();

/** Disconnects a connection and every copy BullMQ made of it, whatever state they are in. */
function hangUp(redis: Redis): void {
  // Not twice: ioredis arms a 2 s destroy timer per disconnect() that a closed socket never clears.
  for (const r of [redis, ...(duplicates.get(redis) ?? [])]) if (r.status !== 'end') r.disconnect();
}

/** One warning per 10 s per source: a Redis outage would otherwise log every reconnect attempt. */
function throttled(log: Logger, what: string): (err: Error) => void {
  let last = 0;
  return (err) => {
    if (Date.now() - last < 10_000) return;
    last = Date.now();
    log.warn({ err: err.message }, `${what}: ${err.message}`);
  };
}

/** Waits for a connection in progress to become ready (false after `ms`, or at once when it is known down). */
function whenReady(redis: Redis, ms: number): Promise<boolean> {
  if (redis.status === 'ready') return Promise.resolve(true);
  if (redis.status !== 'connecting' && redis.status !== 'connect' && redis.status !== 'wait') return Promise.resolve(false);
  return new Promise((resolve) => {
    const done = (ok: boolean) => { clearTimeout(timer); redis.off('ready', onReady); redis.off('close', onClose); resolve(ok); };
    const onReady = () => done(true);
    const onClose = () => done(false);
    const timer = setTimeout(() => done(false), ms);
    redis.once('ready', onReady);
    redis.once('close', onClose);
  });
}

const redactUrl = (url: string) => url.replace(/\/\/[^@/]*@/, '//***@');

/** Rejects with `onTimeout()` when `p` does not settle in `ms` (every Redis call on a request path has a deadline). */
export function withTimeout<T>(p: Promise<T>, ms: number, onTimeout: () => Error): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([p, new Promise<never>((_, reject) => { timer = setTimeout(() => reject(onTimeout()), ms); })]).finally(() => clearTimeout(timer));
}

/** True when `p` settles within `ms` (a close must not hang on a Redis that is gone). */
const settlesWithin = (p: Promise<unknown>, ms: number): Promise<boolean> =>
  withTimeout(p.then(() => true, () => true), ms, () => new Error('timeout')).catch(() => false);

export const redisUnavailable = (url: string, detail = 'did not answer in time') =>
  new StrataError('queue_unavailable', `the request queue's Redis (${redactUrl(url)}) ${detail}; check that Redis is running and REDIS_URL is right, then retry`, 'unavailable');

/**
 * BullMQ needs `maxmemory-policy noeviction`: with an evicting policy Redis may drop job keys under memory
 * pressure and jobs vanish. Warns (does not fail): managed Redis services sometimes forbid CONFIG.
 */
export async function checkEvictionPolicy(redis: Redis, log: Logger): Promise<string | null> {
  try {
    const reply = (await withTimeout(redis.config('GET', 'maxmemory-policy'), 3000, () => new Error('timeout'))) as string[];
    const policy = reply[1] ?? null;
    if (policy !== 'noeviction') {
      log.warn({ policy }, `Redis maxmemory-policy is "${policy}"; BullMQ needs "noeviction" or queued jobs can be evicted (redis-cli CONFIG SET maxmemory-policy noeviction)`);
    }
    return policy;
  } catch (e) {
    log.info({ err: (e as Error).message }, 'could not read Redis maxmemory-policy (CONFIG GET refused?); make sure it is "noeviction"');
    return null;
  }
}

// ---- Failure reasons: "[kind/code] message", so a plain BullMQ reader gets the message and the API its status.

export function formatFailure(e: unknown): string {
  if (isStrataError(e)) return `[${e.kind}/${e.code}] ${e.message}`;
  return `[internal/internal_error] ${(e as Error)?.message ?? String(e)}`;
}

export function parseFailure(reason: string | undefined): StrataError {
  const m = /^\[(\w+)\/([\w.-]+)\] ([\s\S]*)$/.exec(reason ?? '');
  if (!m) return new StrataError('job_failed', reason || 'the job failed without a reason', 'internal');
  return fromErrorRecord({ code: m[2], message: m[3], kind: m[1] });
}

/** JSON with sorted keys and undefined fields dropped: two payloads compare equal when Redis would store the same. */
export function canonical(v: unknown): string {
  return JSON.stringify(v, (_k, x) => (x && typeof x === 'object' && !Array.isArray(x) ? Object.fromEntries(Object.keys(x).sort().map((k) => [k, x[k]])) : x));
}

/**
 * Job ids clients choose (idempotency keys): 1..128 of [A-Za-z0-9._~-], not all digits (BullMQ reserves integer
 * ids for its own counter and ':' for its keys). Throws invalid_argument naming `field`.
 */
export function checkJobId(id: unknown, field = 'job_id'): string {
  if (typeof id !== 'string' || !/^[A-Za-z0-9._~-]{1,128}$/.test(id) || /^\d+$/.test(id)) {
    const shown = typeof id === 'string' ? JSON.stringify(id.length > 40 ? `${id.slice(0, 40)}…` : id) : typeof id;
    throw new StrataError('invalid_job_id', `${field} must be 1 to 128 characters of A-Z a-z 0-9 . _ ~ - and not only digits (a UUID works), got ${shown}`, 'invalid_argument');
  }
  return id;
}

/** Failures a retry cannot fix: the job itself is wrong, or the model cannot do it. */
const NON_RETRYABLE: ReadonlySet<ErrorKind> = new Set(['invalid_argument', 'not_found', 'failed_precondition']);

// ---- Producer side (the API): enqueue, then follow the job through QueueEvents --------------------------------

export interface SubmitOptions {
  /** BullMQ priority: 1 (first) .. 2_097_152; absent = ahead of all prioritized jobs (BullMQ's rule). */
  priority?: number;
  /**
   * The job id to use: an idempotency key (see `checkJobId`). When a job with this id exists already, nothing is
   * added: the same payload follows that job (its stored result at once when it is finished; a retryable failure
   * is retried), a different payload is refused (`idempotency_key_reused`). Default: a fresh UUID.
   */
  jobId?: string;
  /** Runs just before a new job is added (not when following an existing one): back-pressure checks. */
  beforeAdd?: () => Promise<void>;
  /**
   * Whether an existing job's data is the same request as `payload` (default: equal JSON, key order aside). The
   * API compares validated requests instead, so defaults spelled out or left out do not matter.
   */
  sameRequest?: (existing: unknown, payload: JobPayload) => boolean;
  onProgress?: (p: TokenProgress) => void;
  /** Give up waiting (the job itself stays queued and visible under /v1/jobs/:id). Default 10 min. */
  timeoutMs?: number;
}

interface Waiter {
  resolve(v: JobResult): void;
  reject(e: Error): void;
  onProgress?: (p: TokenProgress) => void;
}

export class RequestQueue {
  readonly name: string;
  /** Who follows which job; several requests may follow one job (an idempotent resubmission). */
  private readonly waiters = new Map<string, Set<Waiter>>();
  private poller: NodeJS.Timeout | null = null;

  private constructor(
    readonly url: string,
    readonly queue: Queue,
    readonly events: QueueEvents,
    private readonly redis: Redis,
    private readonly connections: Redis[],
    readonly log: Logger,
    /** Deadline for each Redis call made on a request's path. */
    readonly redisTimeoutMs: number,
  ) {
    this.name = queue.name;
    events.on('progress', ({ jobId, data }) => {
      for (const w of this.waiters.get(jobId) ?? []) w.onProgress?.(data as unknown as TokenProgress);
    });
    events.on('completed', ({ jobId, returnvalue }) => this.settle(jobId, returnvalue as unknown as JobResult));
    events.on('failed', ({ jobId, failedReason }) => this.settle(jobId, parseFailure(failedReason)));
    // Events can be lost (a reconnect while the stream was trimmed); a slow poll of the job state backs them up.
    this.poller = setInterval(() => void this.pollWaiters(), 5000);
    this.poller.unref();
  }

  /**
   * Opens the producer and its event listener. Never throws for an unreachable Redis: the API must still start
   * and answer 503 (and recover when Redis comes back).
   */
  static async open(cfg: QueueConfig & { redisTimeoutMs?: number } = {}): Promise<RequestQueue> {
    const url = cfg.redisUrl ?? redisUrlFromEnv();
    const log = cfg.log ?? defaultLog();
    const name = cfg.queueName ?? QUEUE_NAME;
    const prefix = cfg.prefix ?? 'bull';
    const timeout = cfg.redisTimeoutMs ?? 2000;
    const producer = connect(url, 'fail-fast', log);
    const blocking = connect(url, 'blocking', log);
    // Listen from the stream's current end, read before QueueEvents starts: a job added after open() returns
    // cannot complete "before" the listener ('$' would only be fixed at the first XREAD, some time later).
    let lastEventId: string | undefined;
    try {
      await whenReady(producer, timeout);
      const last = await withTimeout(producer.xrevrange(`${prefix}:${name}:events`, '+', '-', 'COUNT', 1), timeout, () => new Error('timeout'));
      lastEventId = last[0]?.[0] ?? '0-0';
    } catch {
      lastEventId = undefined; // Redis down now: '$' when it comes back, the poller covers the gap
    }
    const queue = new Queue(name, { connection: producer, prefix, defaultJobOptions: DEFAULT_JOB_OPTIONS, streams: { events: { maxLen: 50_000 } } });
    const events = new QueueEvents(name, { connection: blocking, prefix, lastEventId, blockingTimeout: 5000 });
    queue.on('error', throttled(log, `queue ${name}`));
    events.on('error', throttled(log, `queue events ${name}`));
    return new RequestQueue(url, queue, events, producer, [producer, blocking], log, timeout);
  }

  private unavailable(detail?: string) {
    return redisUnavailable(this.url, detail);
  }

  /** Runs a Redis call on a request's path: a deadline, and any failure becomes a typed 503. */
  async redisCall<T>(fn: () => Promise<T>): Promise<T> {
    // A connection attempt in progress gets the deadline; a connection known to be down fails at once.
    if (!(await whenReady(this.redis, this.redisTimeoutMs))) throw this.unavailable(`is not connected (${this.redis.status})`);
    try {
      return await withTimeout(fn(), this.redisTimeoutMs, () => this.unavailable());
    } catch (e) {
      throw isStrataError(e) ? e : this.unavailable(`failed: ${(e as Error).message}`);
    }
  }

  async ping(): Promise<boolean> {
    try {
      return (await this.redisCall(() => this.redis.ping())) === 'PONG';
    } catch {
      return false;
    }
  }

  /** Jobs not started yet (waiting + prioritized + delayed retries). */
  waitingCount(): Promise<number> {
    return this.redisCall(() => this.queue.getJobCountByTypes('waiting', 'prioritized', 'delayed'));
  }

  counts(): Promise<Record<string, number>> {
    return this.redisCall(() => this.queue.getJobCounts());
  }

  prometheus(): Promise<string> {
    return this.redisCall(() => this.queue.exportPrometheusMetrics());
  }

  getJob(id: string): Promise<Job | undefined> {
    return this.redisCall(() => this.queue.getJob(id));
  }

  /** Adds a job without waiting for it (fire and forget; poll /v1/jobs/:id). */
  async enqueue(payload: JobPayload, opts: { priority?: number; jobId?: string } = {}): Promise<string> {
    const jobId = opts.jobId ?? randomUUID();
    await this.redisCall(() => this.queue.add(payload.kind, payload, { jobId, priority: opts.priority }));
    return jobId;
  }

  /**
   * Adds a job and follows it. Resolves once the job is in Redis, with its id and a promise of its result
   * (rejecting with the job's typed failure). The waiter is registered before the add so no event is missed.
   * With `opts.jobId` naming a job that exists already, follows that job instead (`existing: true`).
   */
  async submit(payload: JobPayload, opts: SubmitOptions = {}): Promise<{ jobId: string; result: Promise<JobResult>; abandon(): void; existing: boolean }> {
    const jobId = opts.jobId ?? randomUUID();
    let timer: NodeJS.Timeout | undefined;
    const waiter = {} as Waiter;
    const result = new Promise<JobResult>((resolve, reject) => {
      Object.assign(waiter, { resolve, reject, onProgress: opts.onProgress });
      let set = this.waiters.get(jobId);
      if (!set) this.waiters.set(jobId, (set = new Set()));
      set.add(waiter);
      timer = setTimeout(() => {
        this.settleOne(jobId, waiter, new StrataError('job_timeout', `job ${jobId} did not finish in ${Math.round((opts.timeoutMs ?? 600_000) / 1000)} s; it may still run: GET /v1/jobs/${jobId}`, 'unavailable'));
      }, opts.timeoutMs ?? 600_000);
    }).finally(() => clearTimeout(timer));
    result.catch(() => {});
    let existing = false;
    try {
      existing = opts.jobId !== undefined && (await this.followExisting(jobId, payload, waiter, opts.sameRequest));
      if (!existing) {
        await opts.beforeAdd?.();
        await this.enqueue(payload, { jobId, priority: opts.priority });
      }
    } catch (e) {
      this.dropWaiter(jobId, waiter);
      clearTimeout(timer);
      throw e;
    }
    // Abandoning settles the promise (so nothing waits forever); the job itself runs on and stays queryable.
    const abandon = () => this.settleOne(jobId, waiter, new StrataError('abandoned', `stopped following job ${jobId}`, 'unavailable'));
    return { jobId, result, abandon, existing };
  }

  /**
   * An idempotent resubmission: when job `jobId` exists, checks it is the same request and settles `waiter` from
   * its state (or leaves it to the job's events). False when there is no such job.
   */
  private async followExisting(jobId: string, payload: JobPayload, waiter: Waiter, same?: SubmitOptions['sameRequest']): Promise<boolean> {
    const job = await this.getJob(jobId);
    if (!job) return false;
    if (!(same ? same(job.data, payload) : canonical(job.data) === canonical(payload))) {
      throw new StrataError('idempotency_key_reused', `job ${jobId} exists with a different request; an idempotency key (Idempotency-Key header or job_id) names one request: use a new key for a new request`, 'failed_precondition');
    }
    const state = await this.redisCall(() => job.getState());
    if (state === 'completed') this.settleOne(jobId, waiter, job.returnvalue as JobResult);
    else if (state === 'failed') {
      const failure = parseFailure(job.failedReason);
      // A failure a retry can cure (the pipeline was down) runs again; one that cannot is the answer.
      if (NON_RETRYABLE.has(failure.kind)) this.settleOne(jobId, waiter, failure);
      else {
        this.log.info({ jobId, reason: job.failedReason }, 'resubmitted job had failed; retrying it');
        await this.redisCall(() => job.retry('failed', { resetAttemptsMade: true }));
      }
    }
    return true;
  }

  private dropWaiter(jobId: string, waiter: Waiter): void {
    const set = this.waiters.get(jobId);
    set?.delete(waiter);
    if (set?.size === 0) this.waiters.delete(jobId);
  }

  private settleOne(jobId: string, waiter: Waiter, outcome: JobResult | Error): void {
    if (!this.waiters.get(jobId)?.has(waiter)) return;
    this.dropWaiter(jobId, waiter);
    if (outcome instanceof Error) waiter.reject(outcome);
    else waiter.resolve(outcome);
  }

  private settle(jobId: string, outcome: JobResult | Error): void {
    for (const w of this.waiters.get(jobId) ?? []) this.settleOne(jobId, w, outcome);
  }

  private async pollWaiters(): Promise<void> {
    if (this.waiters.size === 0 || this.redis.status !== 'ready') return;
    for (const jobId of [...this.waiters.keys()]) {
      try {
        const job = await this.getJob(jobId);
        const state = job && (await job.getState());
        if (state === 'completed') this.settle(jobId, job!.returnvalue as JobResult);
        else if (state === 'failed') this.settle(jobId, parseFailure(job!.failedReason));
      } catch {
        return; // Redis trouble: try again next round
      }
    }
  }

  async close(): Promise<void> {
    if (this.poller) clearInterval(this.poller);
    for (const jobId of [...this.waiters.keys()]) this.settle(jobId, new StrataError('shutting_down', 'the API is shutting down; the job may still finish: poll /v1/jobs/:id', 'unavailable'));
    // With Redis gone BullMQ's close would wait for it forever: drop the connections first, then bound the close.
    const up = this.redis.status === 'ready';
    if (!up) for (const c of this.connections) hangUp(c);
    await settlesWithin(Promise.allSettled([this.events.close(), this.queue.close()]), up ? 5000 : 1000);
    for (const c of this.connections) hangUp(c);
  }
}

// ---- Consumer side: the BullMQ worker that runs jobs on the pipeline -----------------------------------------

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
