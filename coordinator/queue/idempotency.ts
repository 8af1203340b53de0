import { StrataError } from '../../model/errors.ts';

/** JSON with sorted keys and undefined fields dropped: two payloads compare equal when Redis would store the same. */
export function canonical(v: unknown): string {
  return JSON.stringify(v, (_k, x) => (x && typeof x === 'object' && !Array.isArray(x) ? Object.fromEntries(Object.keys(x).sort().map((k) => [k, x[k]])) : x));
}

/**
 * Job ids clients choose (idempotency keys): 1..128 of [A-Za-z0-9._~-], not all digits (BullMQ reserves integer
 * ids for its own counter and ':' for its keys). Throws invalid_argument naming `field`.
 */
export function checkJobId(id: unknown, field = 'job_id'): string {
  if (typeof id !== 'string' || !/^[A-Za-z0-9._~-]{1,128}$/.test(id) || /^\d+$/.test(id)) {
    const shown = typeof id === 'string' ? JSON.stringify(id.length > 40 ? `${id.slice(0, 40)}…` : id) : typeof id;
    throw new StrataError('invalid_job_id', `${field} must be 1 to 128 characters of A-Z a-z 0-9 . _ ~ - and not only digits (a UUID works), got ${shown}`, 'invalid_argument');
  }
  return id;
}
