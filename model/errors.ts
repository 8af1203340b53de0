/**
 * Typed errors shared by every layer. `code` is stable (clients and tests match on it);
 * the message says what is wrong and what to do. HTTP and gRPC map `kind` to status codes.
 */
export type ErrorKind = 'invalid_argument' | 'not_found' | 'failed_precondition' | 'unavailable' | 'resource_exhausted' | 'internal';

export class StrataError extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly kind: ErrorKind = 'invalid_argument',
  ) {
    super(message);
    this.name = 'StrataError';
  }
}

export const isStrataError = (e: unknown): e is StrataError => e instanceof StrataError;

/** An error as plain data, the form it crosses a thread or the wire in (StepError in stage.proto). */
export interface ErrorRecord {
  code: string;
  message: string;
  kind: string;
}

/** Any thrown value as a record: a StrataError keeps its code and kind, anything else is `stage_internal`. */
export function toErrorRecord(e: unknown): ErrorRecord {
  const err = isStrataError(e) ? e : new StrataError('stage_internal', (e as Error)?.message ?? String(e), 'internal');
  return { code: err.code, message: err.message, kind: err.kind };
}

export const fromErrorRecord = (r: ErrorRecord): StrataError => new StrataError(r.code, r.message, r.kind as ErrorKind);
