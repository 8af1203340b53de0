import { ERROR_CATALOGUE, errorEntry, type ErrorCode, type ErrorKind } from './error-codes.ts';

export type { ErrorCode, ErrorKind } from './error-codes.ts';

/**
 * Typed errors shared by every layer. `code` is stable (clients and tests match on it) and listed in
 * error-codes.ts, which also says the kind it defaults to and the HTTP and gRPC status it answers with; the message
 * says what is wrong and what to do.
 */
export class StrataError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
    readonly kind: ErrorKind = ERROR_CATALOGUE[code].kind,
  ) {
    super(message);
    this.name = 'StrataError';
  }
}

export const isStrataError = (e: unknown): e is StrataError => e instanceof StrataError;

/** Whether the coordinator may cure this failure by re-planning and replaying: its code's entry, or any unavailable. */
export const isRecoverable = (e: unknown): boolean => isStrataError(e) && (e.kind === 'unavailable' || (errorEntry(e.code)?.recoverable ?? false));

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

/**
 * Back from a record (a peer's reply, a job's stored failure). The code is kept as sent even when this version's
 * catalogue lacks it (a newer peer): clients see the code the failing process chose.
 */
export const fromErrorRecord = (r: ErrorRecord): StrataError => new StrataError(r.code as ErrorCode, r.message, r.kind as ErrorKind);
