import { StrataError } from '../model/errors.ts';
import { kvCacheBytes, type KvCache } from '../model/stage.ts';

interface Entry {
  cache: KvCache;
  bytes: number;
  lastUsed: number;
}

/**
 * The KV caches of every session this stage serves, under a memory budget: least-recently-used sessions are
 * evicted when a step would exceed it, idle ones expire after a TTL. Evicted ids are remembered (bounded) so
 * their owner gets a clear `session_evicted` instead of a wrong answer computed without the past.
 */
export class KvStore {
  private readonly entries = new Map<string, Entry>(); // Map iteration order = LRU order
  private readonly evicted = new Map<string, string>();
  private total = 0;

  constructor(
    readonly budgetBytes: number,
    readonly ttlMs: number,
    private readonly now: () => number = Date.now,
  ) {}

  get sessions(): number {
    return this.entries.size;
  }

  get bytes(): number {
    return this.total;
  }

  has(sessionId: string): boolean {
    return this.entries.has(sessionId);
  }

  /** The cache a step continues from; `pastLength` is what the request's attention mask implies. */
  take(sessionId: string, pastLength: number, create: () => KvCache): KvCache {
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
    return create();
  }

  /** Records the cache after a step, evicting other sessions (oldest first) to stay within budget. */
  commit(sessionId: string, cache: KvCache): string[] {
    const bytes = kvCacheBytes(cache);
    if (bytes > this.budgetBytes) {
      this.drop(sessionId);
      throw new StrataError('kv_budget_exceeded', `session ${sessionId} needs ${bytes} bytes of KV cache, more than this stage's whole budget (${this.budgetBytes}); raise --kv-budget-mb or shorten the request`, 'resource_exhausted');
    }
    this.drop(sessionId);
    const victims: string[] = [];
    let kept = this.total;
    for (const [id, e] of this.entries) {
      if (kept + bytes <= this.budgetBytes) break;
      victims.push(id);
      kept -= e.bytes;
    }
    for (const id of victims) this.forget(id, 'memory budget');
    this.entries.set(sessionId, { cache, bytes, lastUsed: this.now() });
    this.total += bytes;
    return victims;
  }

  drop(sessionId: string): boolean {
    const e = this.entries.get(sessionId);
    if (!e) return false;
    this.entries.delete(sessionId);
    this.total -= e.bytes;
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
