import type { Job } from 'bullmq';
import type { Logger } from 'pino';
import { StrataError } from '../../model/errors.ts';
import type { JobPayload, JobResult } from '../api/jobs/types.ts';
import { NON_RETRYABLE, parseFailure } from './failure.ts';
import type { Follower, JobFollowers } from './followers.ts';
import { canonical } from './idempotency.ts';
import type { RedisCalls } from './redis-calls.ts';

// Followers settled from a job's stored state rather than its events: an idempotent resubmission of a job that
// exists, and the slow poll that backs up lost events.

export interface JobStore {
  getJob(id: string): Promise<Job | undefined>;
  readonly calls: RedisCalls;
  readonly followers: JobFollowers;
  readonly log: Logger;
}

/** Whether an existing job's data is the same request as a payload (see SubmitOptions.sameRequest). */
export type SameRequest = (existing: unknown, payload: JobPayload) => boolean;

/**
 * An idempotent resubmission: when job `jobId` exists, checks it is the same request and settles `follower` from
 * its state (or leaves it to the job's events). False when there is no such job.
 */
export async function followExisting(store: JobStore, jobId: string, payload: JobPayload, follower: Follower, same?: SameRequest): Promise<boolean> {
  const job = await store.getJob(jobId);
  if (!job) return false;
  if (!(same ? same(job.data, payload) : canonical(job.data) === canonical(payload))) {
    throw new StrataError('idempotency_key_reused', `job ${jobId} exists with a different request; an idempotency key (Idempotency-Key header or job_id) names one request: use a new key for a new request`, 'failed_precondition');
  }
  const state = await store.calls.call(() => job.getState());
  if (state === 'completed') store.followers.settleOne(jobId, follower, job.returnvalue as JobResult);
  else if (state === 'failed') {
    const failure = parseFailure(job.failedReason);
    // A failure a retry can cure (the pipeline was down) runs again; one that cannot is the answer.
    if (NON_RETRYABLE.has(failure.kind)) store.followers.settleOne(jobId, follower, failure);
    else {
      store.log.info({ jobId, reason: job.failedReason }, 'resubmitted job had failed; retrying it');
      await store.calls.call(() => job.retry('failed', { resetAttemptsMade: true }));
    }
  }
  return true;
}

/** Settles the followers of every finished job (events can be lost: a reconnect while the stream was trimmed). */
export async function pollFollowers(store: JobStore): Promise<void> {
  if (store.followers.size === 0 || !store.calls.ready) return;
  for (const jobId of store.followers.jobIds()) {
    try {
      const job = await store.getJob(jobId);
      const state = job && (await job.getState());
      if (state === 'completed') store.followers.settle(jobId, job!.returnvalue as JobResult);
      else if (state === 'failed') store.followers.settle(jobId, parseFailure(job!.failedReason));
    } catch {
      return; // Redis trouble: try again next round
    }
  }
}
