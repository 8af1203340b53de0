import { fromErrorRecord, isStrataError, StrataError, type ErrorKind } from '../../model/errors.ts';

// A job's failure reason as BullMQ stores it: "[kind/code] message", so a plain BullMQ reader gets the message and
// the API its status.

export function formatFailure(e: unknown): string {
  if (isStrataError(e)) return `[${e.kind}/${e.code}] ${e.message}`;
  return `[internal/internal_error] ${(e as Error)?.message ?? String(e)}`;
}

export function parseFailure(reason: string | undefined): StrataError {
  const m = /^\[(\w+)\/([\w.-]+)\] ([\s\S]*)$/.exec(reason ?? '');
  if (!m) return new StrataError('job_failed', reason || 'the job failed without a reason', 'internal');
  return fromErrorRecord({ code: m[2], message: m[3], kind: m[1] });
}

/** Failures a retry cannot fix: the job itself is wrong, or the model cannot do it. */
export const NON_RETRYABLE: ReadonlySet<ErrorKind> = new Set(['invalid_argument', 'not_found', 'failed_precondition']);
