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
