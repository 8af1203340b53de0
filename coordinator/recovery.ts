import { StrataError } from '../model/errors.ts';
import type { BlockRange } from '../model/range.ts';
import type { ClientSecurity } from '../transport/link.ts';
import { answers } from './stage-set.ts';

export interface RecoveryOptions {
  /** The workers the pipeline was started with, in stage order. */
  addresses: string[];
  /** Standby workers that take over the range of a worker that died. */
  spares?: string[];
  /** Explicit ranges: kept when as many workers answer, else the planner splits the blocks anew. */
  ranges?: BlockRange[];
  credentials?: ClientSecurity;
  recoveryTimeoutMs?: number;
  /** How long recovery waits for a lost worker to come back (restart, spare) before re-planning onto fewer. */
  replaceGraceMs?: number;
  log?: (obj: object, msg: string) => void;
}

/** What recovery needs of the pipeline it repairs. */
export interface Recoverable {
  /** Bumped by every (re)configuration. */
  generation(): number;
  /** How many workers the pipeline uses now. */
  activeCount(): number;
  /** The pipeline is broken: stop reporting healthy. */
  markDown(): void;
  /** Configures the pipeline onto these workers (explicit ranges, or the planner's when undefined). */
  reconfigure(addresses: string[], ranges?: BlockRange[]): Promise<void>;
  /** Recovery is done: the pipeline was broken for `ms`. */
  recovered(ms: number, workers: string[]): void;
}

/**
 * Re-plans a pipeline that lost a stage onto the workers that answer: a restarted worker at its old address, a live
 * spare, or fewer stages once the grace period is over. One recovery at a time; a failure seen under an older
 * configuration (someone already re-planned) starts none. After shrinking, a returning worker is taken back (regrow).
 */
export class Recovery {
  private running: Promise<void> | null = null;
  recoveries = 0;

  constructor(
    private readonly pipeline: Recoverable,
    private readonly o: RecoveryOptions,
  ) {}

  get inProgress(): boolean {
    return this.running !== null;
  }

  /** Re-plans onto whichever workers answer, within the deadline; resolves once the pipeline is whole again. */
  recover(failedGeneration: number, deadline: number): Promise<void> {
    if (this.pipeline.generation() !== failedGeneration) return Promise.resolve(); // someone already re-planned
    this.running ??= this.replan(deadline).finally(() => {
      this.running = null;
    });
    return this.running;
  }

  private async replan(deadline: number): Promise<void> {
    const started = Date.now();
    this.pipeline.markDown();
    for (let attempt = 0; ; attempt++) {
      const live = await this.liveWorkers();
      const waiting = live.length < this.o.addresses.length && Date.now() - started < (this.o.replaceGraceMs ?? 5_000);
      if (waiting && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 250));
        continue;
      }
      try {
        if (live.length === 0) throw new StrataError('pipeline_unavailable', 'no worker answers', 'unavailable');
        const sameShape = this.o.ranges && live.length === this.o.ranges.length ? this.o.ranges : undefined;
        await this.pipeline.reconfigure(live, sameShape);
        this.recoveries++;
        this.o.log?.({ ms: Date.now() - started, workers: live }, 'pipeline recovered');
        this.pipeline.recovered(Date.now() - started, live);
        return;
      } catch (e) {
        if (Date.now() > deadline) {
          throw new StrataError('pipeline_unavailable', `the pipeline lost a stage and could not be re-planned within ${this.o.recoveryTimeoutMs ?? 60_000} ms (${(e as Error).message}); start a replacement worker or add spares`, 'unavailable');
        }
        await new Promise((r) => setTimeout(r, Math.min(200 * (attempt + 1), 2_000)));
      }
    }
  }

  /**
   * After shrinking, a returning worker (restarted at its address) re-registers: re-plan onto the larger set. Steps in
   * flight then meet a re-configured stage and replay, like after a fault.
   */
  async regrow(): Promise<boolean> {
    const live = await this.liveWorkers();
    if (live.length <= this.pipeline.activeCount() || this.running) return false;
    await this.recover(this.pipeline.generation(), Date.now() + (this.o.recoveryTimeoutMs ?? 60_000));
    return true;
  }

  /** Whether the pipeline runs on fewer workers than it was started with. */
  get shrunk(): boolean {
    return this.pipeline.activeCount() < this.o.addresses.length;
  }

  /** The workers to use now: each original position keeps its worker if it answers, else takes a live spare. */
  private async liveWorkers(): Promise<string[]> {
    const spares = this.o.spares ?? [];
    const status = await Promise.all([...this.o.addresses, ...spares].map((a) => answers(a, this.o.credentials)));
    const liveSpares = spares.filter((_, i) => status[this.o.addresses.length + i]);
    const out: string[] = [];
    this.o.addresses.forEach((a, i) => {
      if (status[i]) out.push(a);
      else if (liveSpares.length) out.push(liveSpares.shift()!);
    });
    return out;
  }
}
