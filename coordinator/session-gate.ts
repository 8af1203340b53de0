import { StrataError } from '../model/errors.ts';

/** How long a request waits for a KV slot before it is refused (STRATA_SLOT_WAIT_MS; default 10 minutes). */
export const DEFAULT_SLOT_WAIT_MS = Number(process.env.STRATA_SLOT_WAIT_MS ?? 600_000);

interface Waiter {
  rows: number;
  admit: () => void;
}

/**
 * Admits sessions up to the pipeline's KV slot capacity: the fewest slot rows any stage holds (each stage sizes its
 * slots from its --kv-budget-mb: a slot of 14 GPT-J blocks at its 2048-position context is 0.9 GiB). A session past it waits here,
 * in arrival order, until one ends, as vLLM's scheduler holds a request while its KV blocks are spoken for. Without
 * the gate, concurrent requests past the capacity reached a stage with no free slot and failed with
 * `kv_slots_exhausted` (429), although the coordinator itself had accepted them.
 */
export class SessionGate {
  private capacity = Infinity;
  private readonly admitted = new Map<string, number>();
  private readonly waiting: Waiter[] = [];
  private held = 0;

  constructor(
    /** How long a session waits for a slot before kv_slots_exhausted (here, and in RemotePipeline's retries). */
    readonly waitMs = DEFAULT_SLOT_WAIT_MS,
    private readonly onWait?: (waiting: number, held: number, capacity: number) => void,
  ) {}

  /** Slot rows per stage, as the workers report them; 0 or none (a worker from before the report): no limit. */
  setCapacity(stageSlots: (number | undefined)[]): void {
    const known = stageSlots.filter((n): n is number => !!n && n > 0);
    this.capacity = known.length ? Math.min(...known) : Infinity;
    this.pump();
  }

  get limit(): number {
    return this.capacity;
  }

  /** Sessions waiting for a slot. */
  get queued(): number {
    return this.waiting.length;
  }

  /** Resolves once `id` holds `rows` slot rows (at once when it already does). */
  async admit(id: string, rows = 1): Promise<void> {
    if (this.admitted.has(id)) return;
    if (rows > this.capacity) {
      throw new StrataError('kv_slots_exhausted', `a request of ${rows} rows needs more KV slots than a stage holds (${this.capacity}); raise --kv-budget-mb or send fewer rows`, 'resource_exhausted');
    }
    if (!this.waiting.length && this.held + rows <= this.capacity) return this.take(id, rows);
    await new Promise<void>((resolve, reject) => {
      const w: Waiter = { rows, admit: () => (clearTimeout(timer), this.take(id, rows), resolve()) };
      const timer = setTimeout(() => {
        this.waiting.splice(this.waiting.indexOf(w), 1);
        reject(new StrataError('kv_slots_exhausted', `waited ${Math.round(this.waitMs / 1000)} s for one of the pipeline's ${this.capacity} KV slots, all held by running sessions; raise --kv-budget-mb, add workers, or retry later`, 'resource_exhausted'));
        this.pump();
      }, this.waitMs);
      this.waiting.push(w);
      this.onWait?.(this.waiting.length, this.held, this.capacity);
    });
  }

  /** The session ended: its rows go to the next waiters (nothing for a session never admitted). */
  release(id: string): void {
    const rows = this.admitted.get(id);
    if (rows === undefined) return;
    this.admitted.delete(id);
    this.held -= rows;
    this.pump();
  }

  private take(id: string, rows: number): void {
    this.admitted.set(id, rows);
    this.held += rows;
  }

  private pump(): void {
    while (this.waiting.length && this.held + this.waiting[0].rows <= this.capacity) this.waiting.shift()!.admit();
  }
}
