import { fileURLToPath } from 'node:url';
import { StrataError } from '../model/errors.ts';
import { BYTES_PER_ELEMENT, elementCount, tensorBytes, typedView, type DType, type TensorData } from '../model/tensor.ts';

/**
 * 2: decode steps as StepBatch on StepStream, results on Results. 3: a stage holding the coordinator's Results
 * subscription acks a StepBatch item as soon as it has passed it on; timings travel forward with the step.
 */
export const PROTOCOL_VERSION = 3;
export const PROTO_PATH = fileURLToPath(new URL('./stage.proto', import.meta.url));

/** Sized for a 1024 × 4096 float32 prefill (16 MiB) with room to spare; STRATA_MAX_MESSAGE_MB overrides. */
export const MAX_MESSAGE_BYTES = Number(process.env.STRATA_MAX_MESSAGE_MB ?? 256) * 1024 * 1024;

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

export function sameModel(a: WireIdentity, b: WireIdentity): string | null {
  if (a.protocol !== b.protocol) return `protocol ${a.protocol} vs ${b.protocol}`;
  if (a.fingerprint !== b.fingerprint) return `checkpoint ${a.fingerprint} vs ${b.fingerprint}`;
  if (a.dtype !== b.dtype) return `dtype ${a.dtype} vs ${b.dtype}`;
  return null;
}
