import { readFileSync, writeFileSync } from 'node:fs';
import { safetensorsHeader } from '../../model/safetensors.ts';

export interface RawTensor {
  dtype: string;
  shape: number[];
  data: Uint8Array;
}

/** Reads every tensor of a safetensors file (tests only: the product reads lazily via model/safetensors.ts). */
export function readSafetensors(path: string): Map<string, RawTensor> {
  const buf = readFileSync(path);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8'));
  const out = new Map<string, RawTensor>();
  for (const [k, v] of Object.entries<any>(header)) {
    if (k === '__metadata__') continue;
    out.set(k, { dtype: v.dtype, shape: v.shape, data: new Uint8Array(buf.subarray(8 + n + v.data_offsets[0], 8 + n + v.data_offsets[1])) });
  }
  return out;
}

/** Writes tensors in the safetensors layout (header JSON padded to 8 bytes, then the data). */
export function writeSafetensors(path: string, tensors: Map<string, RawTensor>): void {
  const header = safetensorsHeader([...tensors].map(([key, t]) => ({ key, dtype: t.dtype, shape: t.shape, bytes: t.data.byteLength })), { format: 'pt' });
  writeFileSync(path, Buffer.concat([header, ...[...tensors.values()].map((t) => Buffer.from(t.data))]));
}
