import * as grpc from '@grpc/grpc-js';
import { statusOf } from '../../model/error-codes.ts';
import { fromErrorRecord, StrataError } from '../../model/errors.ts';

/** A StrataError as a gRPC status; the stable code rides in trailing metadata. */
export function toServiceError(e: unknown): Partial<grpc.ServiceError> {
  const err = e instanceof StrataError ? e : new StrataError('internal', (e as Error)?.message ?? String(e), 'internal');
  const metadata = new grpc.Metadata();
  metadata.set('strata-code', err.code);
  metadata.set('strata-kind', err.kind);
  return { code: grpc.status[statusOf(err).grpc], details: err.message, metadata };
}

/** Back from a gRPC status to a StrataError (the remote's own code when it sent one). */
export function fromServiceError(e: grpc.ServiceError, peer: string): StrataError {
  const code = e.metadata?.get('strata-code')[0];
  const kind = e.metadata?.get('strata-kind')[0];
  if (code && kind) return fromErrorRecord({ code: String(code), message: String(e.details), kind: String(kind) });
  const unreachable = e.code === grpc.status.UNAVAILABLE || e.code === grpc.status.DEADLINE_EXCEEDED || e.code === grpc.status.CANCELLED;
  return new StrataError(unreachable ? 'stage_unavailable' : 'stage_error', `stage ${peer}: ${e.details || e.message}`, unreachable ? 'unavailable' : 'internal');
}

/** Why a long-lived stream (StepStream, Results) ended: its gRPC status, or a plain close by the peer. */
export function streamEnded(e: grpc.ServiceError | undefined, peer: string, stream: string): StrataError {
  return e?.code !== undefined ? fromServiceError(e, peer) : new StrataError('stage_unavailable', `stage ${peer}: the ${stream} stream closed`, 'unavailable');
}
