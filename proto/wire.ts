import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { fileURLToPath } from 'node:url';
import { fromErrorRecord, StrataError } from '../model/errors.ts';
import { statusOf } from '../model/error-codes.ts';
import { BYTES_PER_ELEMENT, elementCount, tensorBytes, typedView, type DType, type TensorData } from '../model/tensor.ts';

/**
 * 2: decode steps as StepBatch on StepStream, results on Results. 3: a stage holding the coordinator's Results
 * subscription acks a StepBatch item as soon as it has passed it on; timings travel forward with the step.
 */
export const PROTOCOL_VERSION = 3;
export const PROTO_PATH = fileURLToPath(new URL('./stage.proto', import.meta.url));

/** Sized for a 1024 × 4096 float32 prefill (16 MiB) with room to spare; STRATA_MAX_MESSAGE_MB overrides. */
export const MAX_MESSAGE_BYTES = Number(process.env.STRATA_MAX_MESSAGE_MB ?? 256) * 1024 * 1024;

export const channelOptions: grpc.ChannelOptions = {
  'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  'grpc.keepalive_time_ms': 10_000,
  'grpc.keepalive_timeout_ms': 5_000,
  'grpc.keepalive_permit_without_calls': 1,
  'grpc.http2.min_ping_interval_without_data_ms': 5_000,
};

const definition = protoLoader.loadSync(PROTO_PATH, { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: false });
const pkg = grpc.loadPackageDefinition(definition) as any;
/** A request the protobuf decoder rejected: handlers answer INVALID_ARGUMENT instead of grpc-js' INTERNAL. */
export const MALFORMED = Symbol('malformed request');

export const StageService: grpc.ServiceDefinition = Object.fromEntries(
  Object.entries(pkg.strata.v1.Stage.service as grpc.ServiceDefinition).map(([name, m]) => [
    name,
    {
      ...m,
      requestDeserialize: (bytes: Buffer) => {
        try {
          return m.requestDeserialize(bytes);
        } catch (e) {
          return { [MALFORMED]: (e as Error).message };
        }
      },
    },
  ]),
);
export const StageClientCtor: grpc.ServiceClientConstructor = pkg.strata.v1.Stage;

export interface WireTensor {
  dtype: string;
  dims: number[];
  data: Uint8Array;
}

export interface WireIdentity {
  fingerprint: string;
  first: number;
  last: number;
  dtype: string;
  protocol: number;
  blocks: number;
  model_type: string;
}

export const toWire = (t: TensorData): WireTensor => ({ dtype: t.dtype, dims: t.dims, data: tensorBytes(t) });

/** Validates a tensor from the wire BEFORE using it: known dtype, sane dims, byte count matching the shape. */
export function fromWire(t: WireTensor | null | undefined, name: string, maxElements = MAX_MESSAGE_BYTES): TensorData | undefined {
  if (!t || (!t.dtype && (!t.dims || t.dims.length === 0))) return undefined;
  const dtype = t.dtype as DType;
  if (!(dtype in BYTES_PER_ELEMENT)) throw new StrataError('tensor_dtype_invalid', `${name}: dtype "${t.dtype}" is not one of float32, float16, int64`);
  const dims = t.dims.map(Number);
  if (dims.length > 8 || dims.some((d) => !Number.isSafeInteger(d) || d < 0)) throw new StrataError('tensor_shape_invalid', `${name}: shape [${dims.join(', ')}] is not a valid tensor shape`);
  const n = elementCount(dims);
  if (n > maxElements) throw new StrataError('tensor_too_large', `${name}: ${n} elements exceed the limit of ${maxElements}`);
  const bytes = t.data ?? new Uint8Array(0);
  if (bytes.byteLength !== n * BYTES_PER_ELEMENT[dtype]) {
    throw new StrataError('tensor_size_mismatch', `${name}: ${bytes.byteLength} bytes do not match ${dtype} shape [${dims.join(', ')}] (${n * BYTES_PER_ELEMENT[dtype]} bytes)`);
  }
  return { dtype, dims, data: typedView(dtype, bytes) };
}

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

export function sameModel(a: WireIdentity, b: WireIdentity): string | null {
  if (a.protocol !== b.protocol) return `protocol ${a.protocol} vs ${b.protocol}`;
  if (a.fingerprint !== b.fingerprint) return `checkpoint ${a.fingerprint} vs ${b.fingerprint}`;
  if (a.dtype !== b.dtype) return `dtype ${a.dtype} vs ${b.dtype}`;
  return null;
}
