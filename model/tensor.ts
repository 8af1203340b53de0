/** A dense tensor as it crosses module and process boundaries (and the wire: raw bytes, little-endian). */
export type DType = 'float32' | 'float16' | 'int64';

export type TensorArray = Float32Array | Uint16Array | BigInt64Array;

export interface TensorData {
  dtype: DType;
  dims: number[];
  data: TensorArray;
}

export const BYTES_PER_ELEMENT: Record<DType, number> = { float32: 4, float16: 2, int64: 8 };

export const elementCount = (dims: readonly number[]): number => dims.reduce((a, b) => a * b, 1);

/** Views `bytes` as a typed array of `dtype`, copying only when the offset is misaligned. */
export function typedView(dtype: DType, bytes: Uint8Array): TensorArray {
  const size = BYTES_PER_ELEMENT[dtype];
  const aligned = bytes.byteOffset % size === 0 ? bytes : new Uint8Array(bytes);
  const n = aligned.byteLength / size;
  if (dtype === 'float32') return new Float32Array(aligned.buffer, aligned.byteOffset, n);
  if (dtype === 'float16') return new Uint16Array(aligned.buffer, aligned.byteOffset, n);
  return new BigInt64Array(aligned.buffer, aligned.byteOffset, n);
}

export const tensorBytes = (t: TensorData): Uint8Array => new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
