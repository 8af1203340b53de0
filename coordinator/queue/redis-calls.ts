import type { Redis } from 'ioredis';
import { isStrataError } from '../../model/errors.ts';
import { redisUnavailable, whenReady, withTimeout } from './connection.ts';

/**
 * The Redis calls on a request's path: each has a deadline and any failure becomes a typed 503 (redis_unavailable),
 * so a request never hangs on a Redis that is down or slow.
 */
export class RedisCalls {
  constructor(
    readonly url: string,
    private readonly redis: Redis,
    /** Deadline for each call. */
    readonly timeoutMs: number,
  ) {}

  /** The connection is up now (the state poll skips a round otherwise). */
  get ready(): boolean {
    return this.redis.status === 'ready';
  }

  async call<T>(fn: () => Promise<T>): Promise<T> {
    // A connection attempt in progress gets the deadline; a connection known to be down fails at once.
    if (!(await whenReady(this.redis, this.timeoutMs))) throw redisUnavailable(this.url, `is not connected (${this.redis.status})`);
    try {
      return await withTimeout(fn(), this.timeoutMs, () => redisUnavailable(this.url));
    } catch (e) {
      throw isStrataError(e) ? e : redisUnavailable(this.url, `failed: ${(e as Error).message}`);
    }
  }

  async ping(): Promise<boolean> {
    try {
      return (await this.call(() => this.redis.ping())) === 'PONG';
    } catch {
      return false;
    }
  }
}

/** The id of a stream's last entry ('0-0' when empty); undefined when Redis does not answer in time. */
export async function streamEnd(redis: Redis, key: string, timeoutMs: number): Promise<string | undefined> {
  try {
    await whenReady(redis, timeoutMs);
    const last = await withTimeout(redis.xrevrange(key, '+', '-', 'COUNT', 1), timeoutMs, () => new Error('timeout'));
    return last[0]?.[0] ?? '0-0';
  } catch {
    return undefined; // Redis down now: '$' when it comes back, the poller covers the gap
  }
}
