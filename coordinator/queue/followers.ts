import { StrataError } from '../../model/errors.ts';
import type { JobResult, TokenProgress } from '../api/jobs/types.ts';

/** One request following a job: settled once, with the job's result or a typed failure. */
export interface Follower {
  resolve(v: JobResult): void;
  reject(e: Error): void;
  onProgress?: (p: TokenProgress) => void;
}

/**
 * Who follows which job. Several requests may follow one job (an idempotent resubmission); each is settled once
 * and then forgotten, whichever of the job's events, the state poll, a timeout or an abandon comes first.
 */
export class JobFollowers {
  private readonly byJob = new Map<string, Set<Follower>>();

  get size(): number {
    return this.byJob.size;
  }

  jobIds(): string[] {
    return [...this.byJob.keys()];
  }

  /**
   * A new follower of `jobId`: its result settles with the job's, or fails as job_timeout after `timeoutMs` (the job
   * itself may still run). `stop` forgets it without settling (the job could not be added).
   */
  follow(jobId: string, timeoutMs: number, onProgress?: (p: TokenProgress) => void): { follower: Follower; result: Promise<JobResult>; stop(): void } {
    let timer: NodeJS.Timeout | undefined;
    const follower = {} as Follower;
    const result = new Promise<JobResult>((resolve, reject) => {
      Object.assign(follower, { resolve, reject, onProgress });
      this.add(jobId, follower);
      timer = setTimeout(() => {
        this.settleOne(jobId, follower, new StrataError('job_timeout', `job ${jobId} did not finish in ${Math.round(timeoutMs / 1000)} s; it may still run: GET /v1/jobs/${jobId}`, 'unavailable'));
      }, timeoutMs);
    }).finally(() => clearTimeout(timer));
    result.catch(() => {});
    const stop = () => {
      this.drop(jobId, follower);
      clearTimeout(timer);
    };
    return { follower, result, stop };
  }

  add(jobId: string, f: Follower): void {
    let set = this.byJob.get(jobId);
    if (!set) this.byJob.set(jobId, (set = new Set()));
    set.add(f);
  }

  drop(jobId: string, f: Follower): void {
    const set = this.byJob.get(jobId);
    set?.delete(f);
    if (set?.size === 0) this.byJob.delete(jobId);
  }

  progress(jobId: string, p: TokenProgress): void {
    for (const f of this.byJob.get(jobId) ?? []) f.onProgress?.(p);
  }

  /** Settles one follower (when it still follows the job). */
  settleOne(jobId: string, f: Follower, outcome: JobResult | Error): void {
    if (!this.byJob.get(jobId)?.has(f)) return;
    this.drop(jobId, f);
    if (outcome instanceof Error) f.reject(outcome);
    else f.resolve(outcome);
  }

  /** Settles every follower of the job. */
  settle(jobId: string, outcome: JobResult | Error): void {
    for (const f of this.byJob.get(jobId) ?? []) this.settleOne(jobId, f, outcome);
  }
}
