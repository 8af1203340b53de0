import { Redis, type RedisOptions } from 'ioredis';
import { pino, type Logger } from 'pino';
import { StrataError } from '../../model/errors.ts';

// The queue's Redis connections: how they are opened, bounded in time, and dropped when Redis is gone.

export const QUEUE_NAME = 'strata-requests';
export const redisUrlFromEnv = (): string => process.env.REDIS_URL || 'redis://127.0.0.1:6379';

export interface QueueConfig {
  /** Default `REDIS_URL`, else redis://127.0.0.1:6379. */
  redisUrl?: string;
  /** Default `strata-requests`. */
  queueName?: string;
  /** BullMQ key prefix (default `bull`). */
  prefix?: string;
  log?: Logger;
}

export const defaultLog = () => pino({ name: 'strata', level: process.env.STRATA_LOG_LEVEL ?? 'info' });

/**
 * Connections as BullMQ's production guide asks: blocking ones (Worker, QueueEvents) retry forever
 * (`maxRetriesPerRequest: null`); the producer's fail fast (no offline queue), so the API can answer 503 at once
 * when Redis is down instead of hanging.
 */
export function connect(url: string, role: 'blocking' | 'fail-fast', log: Logger): Redis {
  // A short disconnectTimeout: after a Redis outage a closing socket is destroyed in 0.5 s, not ioredis' 2 s.
  const common: RedisOptions = { connectTimeout: 2000, disconnectTimeout: 500, retryStrategy: (times) => Math.min(times * 200, 2000) };
  const opts: RedisOptions = role === 'blocking'
    ? { ...common, maxRetriesPerRequest: null }
    : { ...common, maxRetriesPerRequest: 1, enableOfflineQueue: false };
  const redis = new Redis(url, opts);
  redis.on('error', throttled(log, `redis ${redactUrl(url)}`));
  // BullMQ duplicates a connection it is given for its blocking reads, and its close() waits for Redis forever
  // when Redis is gone. Tracking the duplicates lets hangUp() drop every socket so the process can exit.
  const copies: Redis[] = [];
  const duplicate = redis.duplicate.bind(redis);
  redis.duplicate = ((...args: Parameters<Redis['duplicate']>) => {
    const copy = duplicate(...args);
    copies.push(copy);
    return copy;
  }) as Redis['duplicate'];
  duplicates.set(redis, copies);
  return redis;
}

const duplicates = new WeakMap<Redis, Redis[]>();

/** Disconnects a connection and every copy BullMQ made of it, whatever state they are in. */
export function hangUp(redis: Redis): void {
  // Not twice: ioredis arms a 2 s destroy timer per disconnect() that a closed socket never clears.
  for (const r of [redis, ...(duplicates.get(redis) ?? [])]) if (r.status !== 'end') r.disconnect();
}

/** One warning per 10 s per source: a Redis outage would otherwise log every reconnect attempt. */
export function throttled(log: Logger, what: string): (err: Error) => void {
  let last = 0;
  return (err) => {
    if (Date.now() - last < 10_000) return;
    last = Date.now();
    log.warn({ err: err.message }, `${what}: ${err.message}`);
  };
}

/** Waits for a connection in progress to become ready (false after `ms`, or at once when it is known down). */
export function whenReady(redis: Redis, ms: number): Promise<boolean> {
  if (redis.status === 'ready') return Promise.resolve(true);
  if (redis.status !== 'connecting' && redis.status !== 'connect' && redis.status !== 'wait') return Promise.resolve(false);
  return new Promise((resolve) => {
    const done = (ok: boolean) => { clearTimeout(timer); redis.off('ready', onReady); redis.off('close', onClose); resolve(ok); };
    const onReady = () => done(true);
    const onClose = () => done(false);
    const timer = setTimeout(() => done(false), ms);
    redis.once('ready', onReady);
    redis.once('close', onClose);
  });
}

const redactUrl = (url: string) => url.replace(/\/\/[^@/]*@/, '//***@');

/** Rejects with `onTimeout()` when `p` does not settle in `ms` (every Redis call on a request path has a deadline). */
export function withTimeout<T>(p: Promise<T>, ms: number, onTimeout: () => Error): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([p, new Promise<never>((_, reject) => { timer = setTimeout(() => reject(onTimeout()), ms); })]).finally(() => clearTimeout(timer));
}

/** True when `p` settles within `ms` (a close must not hang on a Redis that is gone). */
export const settlesWithin = (p: Promise<unknown>, ms: number): Promise<boolean> =>
  withTimeout(p.then(() => true, () => true), ms, () => new Error('timeout')).catch(() => false);

export const redisUnavailable = (url: string, detail = 'did not answer in time') =>
  new StrataError('queue_unavailable', `the request queue's Redis (${redactUrl(url)}) ${detail}; check that Redis is running and REDIS_URL is right, then retry`, 'unavailable');

/**
 * BullMQ needs `maxmemory-policy noeviction`: with an evicting policy Redis may drop job keys under memory
 * pressure and jobs vanish. Warns (does not fail): managed Redis services sometimes forbid CONFIG.
 */
export async function checkEvictionPolicy(redis: Redis, log: Logger): Promise<string | null> {
  try {
    const reply = (await withTimeout(redis.config('GET', 'maxmemory-policy'), 3000, () => new Error('timeout'))) as string[];
    const policy = reply[1] ?? null;
    if (policy !== 'noeviction') {
      log.warn({ policy }, `Redis maxmemory-policy is "${policy}"; BullMQ needs "noeviction" or queued jobs can be evicted (redis-cli CONFIG SET maxmemory-policy noeviction)`);
    }
    return policy;
  } catch (e) {
    log.info({ err: (e as Error).message }, 'could not read Redis maxmemory-policy (CONFIG GET refused?); make sure it is "noeviction"');
    return null;
  }
}
