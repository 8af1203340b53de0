/**
 * Weight-only, block-wise, symmetric quantization in the layout of ONNX Runtime's `MatMulNBits` and
 * `GatherBlockQuantized` (com.microsoft): a [N, K] matrix (N = output features, K = input features, torch Linear's
 * own layout) is cut into blocks of `blockSize` along K; each block keeps one float32 scale and `bits`-bit codes
 * stored unsigned with the implicit zero point 2^(bits-1), so value = (code − 2^(bits−1)) · scale.
 *
 * The rounding follows ggml's reference quantizers, so that strata's int8/int4 and llama.cpp's q8_0/q4_0 make the
 * same choices on the same weights (the accuracy anchor compares the two):
 * - 8 bits (q8_0): scale = amax / 127, code = round-half-away(x / scale), codes −127…127.
 * - 4 bits (q4_0's format): codes −8…7 around one scale per block; the scale is the least-squares one found near
 *   q4_0's max / −8 (see q4Scale), which keeps the int4 graphs at least as close to fp32 as llama.cpp's q4_0.
 * Scales stay float32 (ggml rounds them to fp16; the kernels here take the activation's type).
 *
 * Pure functions over typed arrays: the stage-graph builder calls them one tensor at a time.
 */
import { StrataError } from './errors.ts';
import { f16Table, float16ToFloat32 } from './dtype.ts';

export type QuantBits = 4 | 8;

export interface QuantScheme {
  bits: QuantBits;
  blockSize: number;
  /** How a block's scale is chosen: `absmax` (q8_0: amax / 127) or `lsq` (least-squares search, see q4Scale). */
  rounding: 'absmax' | 'lsq';
}

/** The schemes behind `--dtype int8 | int4`. Block 32 is ggml's q8_0/q4_0 block and a size MatMulNBits packs fast. */
export const QUANT_SCHEMES = {
  int8: { bits: 8, blockSize: 32, rounding: 'absmax' },
  int4: { bits: 4, blockSize: 32, rounding: 'lsq' },
} as const satisfies Record<string, QuantScheme>;

export type QuantDType = keyof typeof QUANT_SCHEMES;

/** The scheme of an int8/int4 stage; `blockSize` overrides the default 32 (a power of two ≥ 16). */
export function quantScheme(dtype: QuantDType, blockSize?: number): QuantScheme {
  const s: QuantScheme = { ...QUANT_SCHEMES[dtype], blockSize: blockSize ?? QUANT_SCHEMES[dtype].blockSize };
  checkScheme(s);
  return s;
}

/** Identifies the scheme in cache keys and graph metadata: a different layout or rounding must rebuild graphs. */
export const schemeKey = (s: QuantScheme): string => `q${s.bits}b${s.blockSize}${s.rounding}`;

export interface QuantizedMatrix {
  /** [N, kBlocks, blob] codes, blob = blockSize·bits/8 bytes. */
  data: Uint8Array;
  /** [N, kBlocks] float32 scales. */
  scales: Float32Array;
  n: number;
  k: number;
  kBlocks: number;
  blob: number;
}

export function checkScheme(s: QuantScheme): void {
  if ((s.bits === 8) !== (s.rounding === 'absmax')) throw new StrataError('quant_bits_invalid', `quantization: ${s.bits}-bit weights use ${s.bits === 8 ? 'absmax' : 'lsq'} rounding`);
  if (s.bits !== 4 && s.bits !== 8) throw new StrataError('quant_bits_invalid', `quantization bits must be 4 or 8 (got ${s.bits})`);
  if (!(s.blockSize >= 16 && (s.blockSize & (s.blockSize - 1)) === 0)) {
    throw new StrataError('quant_block_invalid', `quantization block size must be a power of two ≥ 16, as MatMulNBits requires (got ${s.blockSize})`);
  }
}

/** torch rounds half to even; ggml's reference quantizer uses roundf (half away from zero): match ggml. */
const roundAway = (x: number): number => (x < 0 ? -Math.round(-x) : Math.round(x));

/**
 * Quantizes a row-major [n, k] float32 matrix block-wise along k. A trailing partial block is padded with zeros
 * (MatMulNBits's k_blocks = ceil(K / block)).
 */
export function quantizeRows(w: Float32Array, n: number, k: number, scheme: QuantScheme): QuantizedMatrix {
  checkScheme(scheme);
  if (w.length !== n * k) throw new Error(`quantizeRows: ${w.length} values is not ${n} × ${k}`);
  const { bits, blockSize } = scheme;
  const kBlocks = Math.ceil(k / blockSize);
  const blob = (blockSize * bits) / 8;
  const data = new Uint8Array(n * kBlocks * blob);
  const scales = new Float32Array(n * kBlocks);
  if (bits === 8) {
    quantizeRowsInt8(w, n, k, blockSize, kBlocks, data, scales);
    return { data, scales, n, k, kBlocks, blob };
  }
  const codes = new Uint8Array(blockSize);
  for (let r = 0; r < n; r++) {
    const row = r * k;
    for (let b = 0; b < kBlocks; b++) {
      const start = b * blockSize;
      const end = Math.min(k, start + blockSize);
      let amax = 0, max = 0;
      for (let i = start; i < end; i++) {
        const a = Math.abs(w[row + i]);
        if (a > amax) { amax = a; max = w[row + i]; }
      }
      // 4-bit (8-bit blocks went to quantizeRowsInt8).
      codes.fill(1 << (bits - 1));
      const scale = Math.fround(q4Scale(w, row + start, row + end, max));
      const inv = scale ? Math.fround(1 / scale) : 0;
      for (let i = start; i < end; i++) codes[i - start] = Math.max(0, Math.min(15, roundAway(Math.fround(w[row + i] * inv)) + 8));
      scales[r * kBlocks + b] = scale;
      const out = (r * kBlocks + b) * blob;
      for (let j = 0; j < blob; j++) data[out + j] = codes[2 * j] | (codes[2 * j + 1] << 4); // low nibble first
    }
  }
  return { data, scales, n, k, kBlocks, blob };
}

/**
 * A checkpoint's F16 matrix (raw binary16 bits, row-major [n, k]) quantized without first widening it to float32:
 * the block's amax is found on the bits (|x| orders like its bits with the sign cleared) and each value is read
 * through the binary16 → float32 table. The same codes and scales as quantizeRows over the widened matrix, at about a
 * third of the time and without a float32 copy twice the tensor's size: an int8 build of GPT-J's F16 checkpoint is
 * this loop over 6 G weights.
 */
export function quantizeRowsF16(halves: Uint16Array, n: number, k: number, scheme: QuantScheme): QuantizedMatrix {
  if (scheme.bits !== 8) return quantizeRows(float16ToFloat32(halves), n, k, scheme);
  checkScheme(scheme);
  if (halves.length !== n * k) throw new Error(`quantizeRowsF16: ${halves.length} values is not ${n} × ${k}`);
  const { blockSize } = scheme;
  const kBlocks = Math.ceil(k / blockSize);
  const data = new Uint8Array(n * kBlocks * blockSize);
  const scales = new Float32Array(n * kBlocks);
  const table = f16Table();
  for (let r = 0; r < n; r++) {
    for (let b = 0; b < kBlocks; b++) {
      const start = r * k + b * blockSize;
      const end = Math.min(r * k + k, start + blockSize);
      let amaxBits = 0;
      for (let i = start; i < end; i++) {
        const a = halves[i] & 0x7fff;
        amaxBits = a > amaxBits && a <= 0x7c00 ? a : amaxBits; // NaNs (above infinity's bits) skipped, as the float compare does
      }
      const scale = Math.fround(table[amaxBits] / 127);
      const inv = scale ? Math.fround(1 / scale) : 0;
      scales[r * kBlocks + b] = scale;
      let o = (r * kBlocks + b) * blockSize;
      for (let i = start; i < end; i++, o++) data[o] = int8Code(Math.fround(table[halves[i]] * inv));
      for (let i = end - start; i < blockSize; i++, o++) data[o] = 128; // a partial block's padding: code 0
    }
  }
  return { data, scales, n, k, kBlocks, blob: blockSize };
}

/**
 * The stored 8-bit code of x = value / scale (|x| ≤ 127.5): roundAway(x) + 128, without a branch on x's sign, which
 * is a coin flip per weight and cost most of the loop. y = x + 128.5 is exact in a double (x is a float32 of
 * magnitude < 2^7) and positive, so truncating it rounds half up; half away from zero differs only on an exact
 * negative tie (y integral below 128.5), a branch that is almost never taken.
 */
const int8Code = (x: number): number => {
  const y = x + 128.5;
  if (y !== y) return 128; // NaN (a non-finite weight): code 0, as before
  const c = y | 0;
  return c === y && y < 128.5 ? c - 1 : c;
};

/** int8 blocks written straight into `data` (no per-block code buffer and copy). */
function quantizeRowsInt8(w: Float32Array, n: number, k: number, blockSize: number, kBlocks: number, data: Uint8Array, scales: Float32Array): void {
  for (let r = 0; r < n; r++) {
    const row = r * k;
    for (let b = 0; b < kBlocks; b++) {
      const start = row + b * blockSize;
      const end = Math.min(row + k, start + blockSize);
      let amax = 0;
      for (let i = start; i < end; i++) {
        const a = Math.abs(w[i]);
        amax = a > amax ? a : amax;
      }
      const scale = Math.fround(amax / 127);
      const inv = scale ? Math.fround(1 / scale) : 0;
      scales[r * kBlocks + b] = scale;
      let o = (r * kBlocks + b) * blockSize;
      for (let i = start; i < end; i++, o++) data[o] = int8Code(Math.fround(w[i] * inv));
      for (let i = end - start; i < blockSize; i++, o++) data[o] = 128; // a partial block's padding: code 0
    }
  }
}

/**
 * The 4-bit block scale: ggml's q4_0 reference takes max / −8 (the largest value lands exactly on code −8); here
 * the scale that minimises the block's squared error is searched around it, as ggml's own k-quant quantizers
 * (make_qx_quants) do: for 19 trial scales near max / −8 the codes are rounded, then the least-squares scale for
 * those codes (Σx·q / Σq²) is kept if it fits best. Same format and kernel as q4_0. The trial at max / −8 gives q4_0's
 * own codes (up to exact half-way ties), refitted: no block ends up with a larger squared error than q4_0's.
 */
function q4Scale(w: Float32Array, start: number, end: number, max: number): number {
  if (max === 0) return 0;
  let best = max / -8, bestFit = -1;
  for (let t = -9; t <= 9; t++) {
    const inv = -(8 + 0.1 * t) / max;
    let sumXq = 0, sumQq = 0;
    for (let i = start; i < end; i++) {
      const q = Math.max(-8, Math.min(7, roundAway(w[i] * inv)));
      sumXq += w[i] * q;
      sumQq += q * q;
    }
    // For fixed codes the squared error is Σx² − (Σxq)²/Σq² at scale Σxq/Σq²: the largest (Σxq)²/Σq² wins.
    if (sumQq > 0 && (sumXq * sumXq) / sumQq > bestFit) {
      bestFit = (sumXq * sumXq) / sumQq;
      best = sumXq / sumQq;
    }
  }
  return best;
}

/** The float32 matrix a quantized one stands for (tests and error measurement). */
export function dequantizeRows(q: QuantizedMatrix, bits: QuantBits): Float32Array {
  const out = new Float32Array(q.n * q.k);
  const blockSize = (q.blob * 8) / bits;
  const zero = 1 << (bits - 1);
  for (let r = 0; r < q.n; r++) {
    for (let i = 0; i < q.k; i++) {
      const b = Math.floor(i / blockSize), j = i % blockSize;
      const byte = q.data[(r * q.kBlocks + b) * q.blob + (bits === 8 ? j : j >> 1)];
      const code = bits === 8 ? byte : j & 1 ? byte >> 4 : byte & 15;
      out[r * q.k + i] = (code - zero) * q.scales[r * q.kBlocks + b];
    }
  }
  return out;
}

/** [rows, cols] → [cols, rows]: GPT-2's Conv1D stores [in, out]; the quantized kernels want [out, in]. */
export function transpose(w: Float32Array, rows: number, cols: number): Float32Array {
  if (w.length !== rows * cols) throw new Error(`transpose: ${w.length} values is not ${rows} × ${cols}`);
  const out = new Float32Array(w.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = w[r * cols + c];
  return out;
}

/** Bytes of a quantized [n, k] matrix: codes plus float32 scales. */
export function quantizedBytes(n: number, k: number, scheme: QuantScheme): number {
  const kBlocks = Math.ceil(k / scheme.blockSize);
  return n * kBlocks * ((scheme.blockSize * scheme.bits) / 8) + n * kBlocks * 4;
}

/**
 * Which execution providers have kernels for the quantized ops a stage uses (`MatMulNBits` for linear layers,
 * `GatherBlockQuantized` for the token embeddings), by bit width. ORT assigns a node that its EP cannot run to the
 * CPU EP without a word, so a quantized stage on a device missing a kernel would silently run its matrices on the
 * host: refuse it up front instead.
 * - cpu: MLAS's n-bit kernels (measured here; 8-bit needs accuracy_level 4, see model/graph/linear.ts).
 * - webgpu: both ops, 4 and 8 bits, placed on the WebGPU EP and exact against the CPU on lavapipe (2026-11-29).
 * - cuda: both ops registered for float/fp16 activations with 4- and 8-bit weights (ORT's CUDA contrib kernels;
 *   not run here: no CUDA provider on the development machine).
 */
export const QUANT_KERNELS: Record<string, readonly QuantBits[]> = { cpu: [4, 8], webgpu: [4, 8], cuda: [4, 8] };

/** Throws unless `deviceKind` (cpu, cuda, webgpu, …) has the kernels for `scheme`. */
export function checkQuantKernels(deviceKind: string, scheme: QuantScheme, dtypeName = `int${scheme.bits}`): void {
  const bits = QUANT_KERNELS[deviceKind];
  if (!bits?.includes(scheme.bits)) {
    const have = Object.entries(QUANT_KERNELS).filter(([, b]) => b.includes(scheme.bits)).map(([d]) => d);
    throw new StrataError('quant_kernel_unavailable',
      `device ${deviceKind} has no ONNX Runtime kernel for ${scheme.bits}-bit weights (MatMulNBits, GatherBlockQuantized): run --dtype ${dtypeName} on ${have.join(', ')}, or use --dtype float32 / float16 on ${deviceKind}`);
  }
}
