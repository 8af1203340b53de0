import { StrataError } from '../model/errors.ts';
import type { KvCache } from '../model/stage.ts';

/** Where sessions' caches come from: a stage's fixed KV slots (model/stage.ts). */
export interface SlotSource {
  openCache(batch: number): KvCache | null;
  closeCache(cache: KvCache): void;
}

interface Entry {
  cache: KvCache;
  lastUsed: number;
}

/** How long a session must have been idle before a new session may take its slot (STRATA_KV_EVICT_IDLE_MS). */
export const DEFAULT_EVICT_IDLE_MS = Number(process.env.STRATA_KV_EVICT_IDLE_MS ?? 10_000);

/**
 * The sessions this stage serves and the KV slots they hold. A session takes its slots at its first step and keeps
 * them until it ends, expires (TTL) or is evicted. When every slot is held, a new session takes the slot of the
 * least-recently-used session that has been idle at least `evictIdleMs` (its owner later gets `session_evicted` and
 * replays); with none that idle it gets `kv_slots_exhausted` (resource_exhausted → 429): never a wrong answer.
 * Evicted ids are remembered (bounded) so their owner gets a clear `session_evicted`.
 */
export class KvStore {
  private readonly entries = new Map<string, Entry>(); // Map iteration order = LRU order
  private readonly evicted = new Map<string, string>();

  constructor(
    private readonly slots: SlotSource & { readonly slots: { capacity: number; slotBytes: number } | null },
    readonly ttlMs: number,
    readonly evictIdleMs = DEFAULT_EVICT_IDLE_MS,
    private readonly now: () => number = Date.now,
  ) {}

  get sessions(): number {
    return this.entries.size;
  }

  /** Bytes of KV slots held by sessions. */
  get bytes(): number {
    let rows = 0;
    for (const e of this.entries.values()) rows += e.cache.slots.length;
    return rows * (this.slots.slots?.slotBytes ?? 0);
  }

  get capacity(): number {
    return this.slots.slots?.capacity ?? 0;
  }

  has(sessionId: string): boolean {
    return this.entries.has(sessionId);
  }

  /** The cache a step continues from; `pastLength` is what the request's attention mask implies. */
  take(sessionId: string, pastLength: number, batch: number): KvCache {
    const entry = this.entries.get(sessionId);
    if (entry) {
      if (entry.cache.length !== pastLength) {
        throw new StrataError('session_out_of_step', `session ${sessionId}: this stage holds ${entry.cache.length} cached tokens but the request implies ${pastLength}; replay the session from its prompt`, 'failed_precondition');
      }
      this.entries.delete(sessionId);
      this.entries.set(sessionId, entry);
      entry.lastUsed = this.now();
      return entry.cache;
    }
    if (pastLength > 0) {
      const why = this.evicted.get(sessionId);
      if (why) throw new StrataError('session_evicted', `session ${sessionId}: its KV cache was evicted (${why}); replay the session from its prompt`, 'failed_precondition');
      throw new StrataError('session_unknown', `session ${sessionId} is unknown to this stage (expired, or the stage restarted); replay the session from its prompt`, 'not_found');
    }
    let cache = this.slots.openCache(batch);
    while (!cache) {
      const victim = this.idleVictim();
      if (!victim) {
        throw new StrataError('kv_slots_exhausted', `all ${this.capacity} KV slots of this stage are held by active sessions; retry shortly, raise --kv-budget-mb, or send fewer concurrent requests`, 'resource_exhausted');
      }
      this.forget(victim, 'its slot went to a new session after it was idle; KV slots are limited by --kv-budget-mb');
      cache = this.slots.openCache(batch);
    }
    this.entries.set(sessionId, { cache, lastUsed: this.now() });
    return cache;
  }

  /** The least-recently-used session idle long enough to give up its slot. */
  private idleVictim(): string | null {
    const cutoff = this.now() - this.evictIdleMs;
    for (const [id, e] of this.entries) if (e.lastUsed <= cutoff) return id;
    return null;
  }

  /** How many positions the session's cache holds (undefined: this stage does not hold it). */
  lengthOf(sessionId: string): number | undefined {
    return this.entries.get(sessionId)?.cache.length;
  }

  /** Undoes a step run ahead (worker/run-ahead.ts): the cache goes back from `past + 1` to `past` positions. */
  rewind(sessionId: string, past: number): void {
    const e = this.entries.get(sessionId);
    if (e && e.cache.length === past + 1) e.cache.length = past;
  }

  /** Marks a step done: the session stays most recent. */
  commit(sessionId: string): void {
    const e = this.entries.get(sessionId);
    if (e) e.lastUsed = this.now();
  }

  /** Ends a session: its slots are free for the next one. */
  drop(sessionId: string): boolean {
    const e = this.entries.get(sessionId);
    if (!e) return false;
    this.entries.delete(sessionId);
    this.slots.closeCache(e.cache);
    return true;
  }

  /** Drops sessions idle longer than the TTL (abandoned by a client or a dead coordinator). */
  sweep(): string[] {
    const cutoff = this.now() - this.ttlMs;
    const expired = [...this.entries].filter(([, e]) => e.lastUsed < cutoff).map(([id]) => id);
    for (const id of expired) this.forget(id, `idle for more than ${Math.round(this.ttlMs / 1000)} s`);
    return expired;
  }

  private forget(id: string, why: string): void {
    this.drop(id);
    this.evicted.set(id, why);
    if (this.evicted.size > 10_000) this.evicted.delete(this.evicted.keys().next().value!);
  }
}
