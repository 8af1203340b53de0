import { StrataError } from './errors.ts';
import { QUANT_SCHEMES, type QuantDType } from './quantize.ts';

/**
 * float16 / bfloat16 <-> float32 conversions. Node 20 has no Float16Array, so these are written by
 * hand (IEEE 754 binary16, round-to-nearest-even), as every JS ONNX/safetensors tool does.
 */
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

export function f32ToF16(value: number): number {
  f32[0] = value;
  const x = u32[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >> shift;
    const rest = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rest > mid || (rest === mid && half & 1)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && half & 1)) half++;
  return sign | half;
}

export function toFloat32(src: Uint8Array, dtype: 'F32' | 'F16' | 'BF16'): Float32Array {
  if (dtype === 'F32') {
    const copy = new Uint8Array(src.byteLength);
    copy.set(src);
    return new Float32Array(copy.buffer);
  }
  const n = src.byteLength / 2;
  // A view when the bytes are 2-aligned (a checkpoint read always is), else an aligned copy.
  const halves = src.byteOffset % 2 === 0 ? new Uint16Array(src.buffer, src.byteOffset, n) : new Uint16Array(n);
  if (halves.buffer !== src.buffer) new Uint8Array(halves.buffer).set(src);
  const out = new Float32Array(n);
  if (dtype === 'BF16') {
    const bits = new Uint32Array(out.buffer);
    for (let i = 0; i < n; i++) bits[i] = halves[i] << 16;
  } else {
    const table = f16Table();
    for (let i = 0; i < n; i++) out[i] = table[halves[i]];
  }
  return out;
}

/**
 * A checkpoint tensor's stored bytes as float32 values, for reading only: F32 bytes in an aligned buffer (as
 * Checkpoint.readRaw returns them) are viewed, not copied; F16 and BF16 are widened.
 */
export function storedAsFloat32(bytes: Uint8Array, dtype: 'F32' | 'F16' | 'BF16'): Float32Array {
  return dtype === 'F32' && bytes.byteOffset % 4 === 0 ? new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4) : toFloat32(bytes, dtype);
}

export function float32ToFloat16(src: Float32Array): Uint16Array {
  const out = new Uint16Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = f32ToF16(src[i]);
  return out;
}

export function float16ToFloat32(src: Uint16Array): Float32Array {
  const out = new Float32Array(src.length);
  const table = f16Table();
  for (let i = 0; i < src.length; i++) out[i] = table[src[i]];
  return out;
}

/**
 * Every binary16 value as float32 (256 KiB, made on first use): a lookup instead of f16ToF32's arithmetic per element.
 * Exact (float32 holds every float16), and what made an F16 checkpoint's conversion cheap next to reading it.
 */
let F16_TABLE: Float32Array | null = null;
export function f16Table(): Float32Array {
  if (!F16_TABLE) {
    F16_TABLE = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) F16_TABLE[h] = f16ToF32(h);
  }
  return F16_TABLE;
}

// ---- weight dtypes of stage graphs (--dtype) ----

/**
 * The dtype a stage graph stores its weights in. float16 also runs activations in float16; int8/int4 are
 * weight-only block quantization (model/quantize.ts) with float32 activations, norms and biases.
 */
export const WEIGHT_DTYPES = ['float32', 'float16', 'int8', 'int4'] as const;
export type StageDType = (typeof WEIGHT_DTYPES)[number];
export type QuantizedDType = Extract<StageDType, QuantDType>;

export const isQuantized = (d: string): d is QuantizedDType => d in QUANT_SCHEMES;

/** Validates a --dtype value (CLI flag, env var or the wire): a typed error naming the choices. */
export function parseStageDType(value: string | undefined, what = '--dtype'): StageDType {
  const v = value ?? 'float32';
  if ((WEIGHT_DTYPES as readonly string[]).includes(v)) return v as StageDType;
  throw new StrataError('dtype_invalid', `${what} "${v}" is not one of ${WEIGHT_DTYPES.join(', ')}; int8 and int4 are weight-only quantized graphs (float32 activations)`);
}

/** The activations' dtype (what crosses the wire between stages and fills the KV cache). */
export const activationDType = (d: StageDType): 'float32' | 'float16' => (d === 'float16' ? 'float16' : 'float32');

/**
 * Bytes one weight of a linear matrix takes in a stage of dtype `d`: the codes plus one float32 scale and one zero
 * point per block. int8: 1 + 4/32 + 1/32 = 1.15625 (STRATA_INT8_BLOCK=64 stores 1.078, counted here as 32's: the
 * safe side); int4: 0.5 + 4/32 + 0.5/32 = 0.640625. Norms, biases and position tables stay float32 (<1 % of a GPT).
 */
export function bytesPerWeight(d: StageDType): number {
  if (d === 'float32') return 4;
  if (d === 'float16') return 2;
  const s = QUANT_SCHEMES[d];
  return s.bits / 8 + (4 + s.bits / 8) / s.blockSize; // codes, scales, zero points
}
