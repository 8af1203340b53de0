/**
 * The request queue on Redis (BullMQ). Producers (the HTTP API, `strata submit`, or any BullMQ client) add a
 * job whose data is a self-describing JSON payload (see api/jobs/types.ts); the consumer runs it against the pipeline,
 * streams tokens as job progress and returns the result as the job's return value. One file per part, as BullMQ's
 * own classes: queue/producer.ts, queue/consumer.ts, queue/connection.ts (Redis), queue/failure.ts (the stored
 * failure format), queue/idempotency.ts (client-chosen job ids).
 */
export type { JobPayload, JobResult, TokenProgress, ServingPipeline } from './api/jobs/types.ts';
export { checkEvictionPolicy, QUEUE_NAME, redisUnavailable, redisUrlFromEnv, withTimeout, type QueueConfig } from './queue/connection.ts';
export { formatFailure, parseFailure } from './queue/failure.ts';
export { canonical, checkJobId } from './queue/idempotency.ts';
export { DEFAULT_JOB_OPTIONS, RequestQueue, type SubmitOptions } from './queue/producer.ts';
export { jobLockSettings, startQueueWorker, type QueueWorkerHandle, type QueueWorkerOptions } from './queue/consumer.ts';
