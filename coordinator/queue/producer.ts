import { randomUUID } from 'node:crypto';
import { Queue, QueueEvents, type Job, type JobsOptions } from 'bullmq';
import type { Redis } from 'ioredis';
import type { Logger } from 'pino';
import { StrataError } from '../../model/errors.ts';
import type { JobPayload, JobResult, TokenProgress } from '../api/jobs/types.ts';
import { connect, defaultLog, hangUp, QUEUE_NAME, redisUrlFromEnv, settlesWithin, throttled, type QueueConfig } from './connection.ts';
import { parseFailure } from './failure.ts';
import { JobFollowers } from './followers.ts';
import { followExisting, pollFollowers, type JobStore, type SameRequest } from './job-state.ts';
import { RedisCalls, streamEnd } from './redis-calls.ts';

/** Retries for transient failures (a worker restarting), retention so Redis does not fill with finished jobs. */
export const DEFAULT_JOB_OPTIONS: JobsOptions = {
  attempts: 3,
  backoff: { type: 'exponential', delay: 1000 },
  removeOnComplete: { age: 3600, count: 1000 },
  removeOnFail: { age: 24 * 3600, count: 5000 },
};

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
  sameRequest?: SameRequest;
  onProgress?: (p: TokenProgress) => void;
  /** Give up waiting (the job itself stays queued and visible under /v1/jobs/:id). Default 10 min. */
  timeoutMs?: number;
}

/**
 * The producer (the API's side): adds jobs and follows them through QueueEvents, with a slow poll of the job state
 * as a back-up for lost events. Every Redis call on a request's path has a deadline and fails as a typed 503.
 */
export class RequestQueue {
  readonly name: string;
  private readonly followers = new JobFollowers();
  private poller: NodeJS.Timeout | null = null;
  private readonly calls: RedisCalls;
  /** What settling followers from stored job state needs (job-state.ts). */
  private readonly store: JobStore;

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
    this.calls = new RedisCalls(url, redis, redisTimeoutMs);
    this.store = { getJob: (id) => this.getJob(id), calls: this.calls, followers: this.followers, log };
    events.on('progress', ({ jobId, data }) => this.followers.progress(jobId, data as unknown as TokenProgress));
    events.on('completed', ({ jobId, returnvalue }) => this.followers.settle(jobId, returnvalue as unknown as JobResult));
    events.on('failed', ({ jobId, failedReason }) => this.followers.settle(jobId, parseFailure(failedReason)));
    // Events can be lost (a reconnect while the stream was trimmed); a slow poll of the job state backs them up.
    this.poller = setInterval(() => void pollFollowers(this.store), 5000);
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
    const lastEventId = await streamEnd(producer, `${prefix}:${name}:events`, timeout);
    const queue = new Queue(name, { connection: producer, prefix, defaultJobOptions: DEFAULT_JOB_OPTIONS, streams: { events: { maxLen: 50_000 } } });
    const events = new QueueEvents(name, { connection: blocking, prefix, lastEventId, blockingTimeout: 5000 });
    queue.on('error', throttled(log, `queue ${name}`));
    events.on('error', throttled(log, `queue events ${name}`));
    return new RequestQueue(url, queue, events, producer, [producer, blocking], log, timeout);
  }

  /** Runs a Redis call on a request's path: a deadline, and any failure becomes a typed 503. */
  redisCall<T>(fn: () => Promise<T>): Promise<T> {
    return this.calls.call(fn);
  }

  ping(): Promise<boolean> {
    return this.calls.ping();
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
   * (rejecting with the job's typed failure). The follower is registered before the add so no event is missed.
   * With `opts.jobId` naming a job that exists already, follows that job instead (`existing: true`).
   */
  async submit(payload: JobPayload, opts: SubmitOptions = {}): Promise<{ jobId: string; result: Promise<JobResult>; abandon(): void; existing: boolean }> {
    const jobId = opts.jobId ?? randomUUID();
    const { follower, result, stop } = this.followers.follow(jobId, opts.timeoutMs ?? 600_000, opts.onProgress);
    let existing = false;
    try {
      existing = opts.jobId !== undefined && (await followExisting(this.store, jobId, payload, follower, opts.sameRequest));
      if (!existing) {
        await opts.beforeAdd?.();
        await this.enqueue(payload, { jobId, priority: opts.priority });
      }
    } catch (e) {
      stop();
      throw e;
    }
    // Abandoning settles the promise (so nothing waits forever); the job itself runs on and stays queryable.
    const abandon = () => this.followers.settleOne(jobId, follower, new StrataError('abandoned', `stopped following job ${jobId}`, 'unavailable'));
    return { jobId, result, abandon, existing };
  }

  async close(): Promise<void> {
    if (this.poller) clearInterval(this.poller);
    for (const jobId of this.followers.jobIds()) this.followers.settle(jobId, new StrataError('shutting_down', 'the API is shutting down; the job may still finish: poll /v1/jobs/:id', 'unavailable'));
    // With Redis gone BullMQ's close would wait for it forever: drop the connections first, then bound the close.
    const up = this.redis.status === 'ready';
    if (!up) for (const c of this.connections) hangUp(c);
    await settlesWithin(Promise.allSettled([this.events.close(), this.queue.close()]), up ? 5000 : 1000);
    for (const c of this.connections) hangUp(c);
  }
}
