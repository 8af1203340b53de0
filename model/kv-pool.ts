import type { DType, TensorData } from './tensor.ts';
import { BYTES_PER_ELEMENT, elementCount } from './tensor.ts';

/**
 * Pooled buffers hold a power of two of positions, at least this many: one buffer serves many consecutive steps,
 * and a session changes buffer size only log2(length) times (each change allocates fresh, page-faulting memory;
 * measured at batch 8: 64-position steps cost ~10 ms a step more than 256 on this machine).
 */
const MIN_POSITIONS = 256;

/**
 * Spare KV buffers, by byte size. A decode step's present tensors replace its past, so the past's memory can hold a
 * later step's present instead of a fresh allocation: at batch 8 the fresh (zeroed, page-faulted) present tensors
 * cost ~5 ms a step (measured, GPT-2-small shape, 2 threads). Tensors are exact-length views over a larger buffer.
 * Only buffers this pool made come back to it, and only from callers that know no other cache still reads them.
 */
export class KvBufferPool {
  private readonly free = new Map<number, ArrayBuffer[]>();
  private readonly idle = new WeakSet<ArrayBuffer>();
  private readonly owned = new WeakSet<ArrayBuffer>();
  private pooledBytes = 0;

  constructor(private readonly maxPooledBytes = 256 * 1024 ** 2) {}

  /** A tensor [B, H, P, hd] whose contents are undefined (ORT overwrites every element). */
  alloc(dtype: DType, dims: number[]): TensorData {
    const [b, h, p, hd] = dims;
    const capacity = b * h * Math.max(MIN_POSITIONS, 2 ** Math.ceil(Math.log2(Math.max(p, 1)))) * hd * BYTES_PER_ELEMENT[dtype];
    let buffer = this.free.get(capacity)?.pop();
    if (buffer) {
      this.idle.delete(buffer);
      this.pooledBytes -= capacity;
    } else {
      buffer = new ArrayBuffer(capacity);
      this.owned.add(buffer);
    }
    const n = elementCount(dims);
    return { dtype, dims, data: dtype === 'float16' ? new Uint16Array(buffer, 0, n) : new Float32Array(buffer, 0, n) };
  }

  /** Takes back the buffers of tensors nothing reads any more (others, and repeats, are ignored). */
  release(layers: Iterable<{ key: TensorData; value: TensorData }>): void {
    for (const { key, value } of layers) {
      for (const t of [key, value]) {
        const buffer = t.data.buffer as ArrayBuffer;
        if (!this.owned.has(buffer) || this.idle.has(buffer) || this.pooledBytes + buffer.byteLength > this.maxPooledBytes) continue;
        this.idle.add(buffer);
        this.pooledBytes += buffer.byteLength;
        const list = this.free.get(buffer.byteLength) ?? [];
        list.push(buffer);
        this.free.set(buffer.byteLength, list);
      }
    }
  }
}
