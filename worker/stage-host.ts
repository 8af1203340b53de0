import { Worker } from 'node:worker_threads';
import { fromErrorRecord, StrataError } from '../model/errors.ts';
import type { PipelineStep } from '../model/generation.ts';
import type { LoadProgress } from '../model/progress.ts';
import type { LoadedInfo, LoadRequest, StepDone, StepOutcome, ThreadReply, ThreadRequest } from './thread-protocol.ts';
import type { RunAheadCounts } from './run-ahead.ts';

/** Main-thread handle on the stage thread: promise-returning calls, one message each way. */
export class StageHost {
  private readonly thread: Worker;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private nextId = 1;

  constructor(private readonly onProgress: (msg: string, load?: LoadProgress) => void = () => {}) {
    this.thread = new Worker(new URL('./stage-thread.js', import.meta.url));
    this.thread.on('message', (msg: ThreadReply) => {
      if ('progress' in msg) return this.onProgress(msg.progress, msg.load);
      const p = this.pending.get(msg.id);
      if (!p) return;
      this.pending.delete(msg.id);
      if (msg.ok) p.resolve(msg.value);
      else p.reject(fromErrorRecord(msg.error));
    });
    this.thread.on('error', (e) => this.failAll(e));
    this.thread.on('exit', (code) => this.failAll(new StrataError('stage_thread_exited', `stage thread exited (code ${code})`, 'internal')));
  }

  private failAll(e: Error): void {
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }

  private call<T>(req: ThreadRequest): Promise<T> {
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.thread.postMessage({ id, req });
    });
  }

  load(req: Omit<LoadRequest, 'type'>): Promise<LoadedInfo> {
    return this.call({ type: 'load', ...req });
  }

  step(sessionId: string, input: PipelineStep): Promise<StepDone> {
    return this.call({ type: 'step', sessionId, input });
  }

  /** Several sessions' steps as one batch; each item's own result or error, in order. */
  stepMany(steps: { sessionId: string; input: PipelineStep }[]): Promise<StepOutcome[]> {
    return this.call({ type: 'steps', steps });
  }

  end(sessionId: string): Promise<void> {
    return this.call({ type: 'end', sessionId });
  }

  stats(): Promise<{ sessions: number; kvBytes: number; kvSlots: number; expired: string[]; runAhead?: RunAheadCounts }> {
    return this.call({ type: 'stats' });
  }

  async close(): Promise<void> {
    await this.thread.terminate();
  }
}
