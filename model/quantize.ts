/**
 * Weight-only, block-wise quantization in the layout of ONNX Runtime's `MatMulNBits` and `GatherBlockQuantized`
 * (com.microsoft): a [N, K] matrix (N = output features, K = input features, torch Linear's own layout) is cut into
 * blocks of `blockSize` along K; each block keeps one float32 scale and `bits`-bit unsigned codes, and value =
 * (code − zero point) · scale.
 * - 8 bits: asymmetric, each block with its own zero point 0…255 ([N, kBlocks], a byte each): the 256 codes span
 *   the block's own [min, max] (with 0 in it), scale = (max − min) / 255, code = roundEven(x / scale) + zero. On
 *   Gaussian weights that is 21 % less squared error than ggml's q8_0 (symmetric, ±amax / 127) at the same block of
 *   32, for one byte per block more. STRATA_INT8_BLOCK=64 halves the blocks: q8_0's squared error at 32, 10 % fewer
 *   bytes for MLAS to read a decode step (README, "int8 in blocks of 64").
 * - 4 bits: asymmetric, each block with its own zero point 0…15 (packed two per byte, [N, ceil(kBlocks / 2)]), so
 *   the 16 codes span the block's own [min, max] instead of ±amax, searched for the least squared error (see
 *   q4Block). On GPT-2-small's weights that is 10 % less squared error than the best symmetric scale (q4_0's format)
 *   and 0.5 bit per 32 weights more.
 * Scales stay float32 (ggml rounds them to fp16; the kernels here take the activation's type).
 *
 * Pure functions over typed arrays: the stage-graph builder calls them one tensor at a time.
 */
import { StrataError } from './errors.ts';
import { f16Table, float16ToFloat32 } from './dtype.ts';
import { quantizeInt4Blocks, quantizeInt8Blocks, type QuantPool } from './quant-kernels.ts';

export type QuantBits = 4 | 8;

export interface QuantScheme {
  bits: QuantBits;
  blockSize: number;
  /**
   * How a block is coded: `minmax` (8 bits: its own zero point, the block's [min, max] over 255 steps) or
   * `asymf32e5` (4 bits: its own zero point, searched in float32 arithmetic over 5 trial scales with codes rounded
   * half to even, see q4Block). Graphs keyed `absmax` (int8 as q8_0, until 2026-12-06), `asym` (the
   * search in doubles), `asymf32` (codes rounded half away from zero) and `asymf32e` (6 trials, two fits each) rebuild.
   */
  rounding: 'minmax' | 'asymf32e5';
}

/** The schemes behind `--dtype int8 | int4`. Block 32 is ggml's q8_0/q4_0 block and a size MatMulNBits packs fast. */
export const QUANT_SCHEMES = {
  int8: { bits: 8, blockSize: 32, rounding: 'minmax' },
  int4: { bits: 4, blockSize: 32, rounding: 'asymf32e5' },
} as const satisfies Record<string, QuantScheme>;

export type QuantDType = keyof typeof QUANT_SCHEMES;

/**
 * The scheme of an int8/int4 stage; `blockSize` overrides the default 32 (a power of two ≥ 16). STRATA_INT8_BLOCK sets
 * int8's default where the graphs are built (64: faster decode, accuracy level with q8_0 rather than ahead of it;
 * README, "int8 in blocks of 64"). The planner counts int8 at 32's bytes, a few percent above 64's: the safe side.
 */
export function quantScheme(dtype: QuantDType, blockSize?: number, int8Block = process.env.STRATA_INT8_BLOCK): QuantScheme {
  let byDefault: number = QUANT_SCHEMES[dtype].blockSize;
  if (dtype === 'int8' && int8Block) {
    byDefault = Number(int8Block);
    if (!isBlockSize(byDefault)) throw new StrataError('quant_block_invalid', `STRATA_INT8_BLOCK must be a power of two ≥ 16, e.g. 64, or unset for 32 (got ${JSON.stringify(int8Block)})`);
  }
  const s: QuantScheme = { ...QUANT_SCHEMES[dtype], blockSize: blockSize ?? byDefault };
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
  /** Zero points: 8 bits [N, kBlocks], a byte each; 4 bits [N, ceil(kBlocks / 2)], two per byte, low nibble first. */
  zeroPoints: Uint8Array;
  n: number;
  k: number;
  kBlocks: number;
  blob: number;
}

/** A block size MatMulNBits takes: a power of two ≥ 16. */
const isBlockSize = (n: number): boolean => n >= 16 && (n & (n - 1)) === 0;

export function checkScheme(s: QuantScheme): void {
  if ((s.bits === 8) !== (s.rounding === 'minmax')) throw new StrataError('quant_bits_invalid', `quantization: ${s.bits}-bit weights use ${s.bits === 8 ? 'minmax' : 'asymf32e5'} rounding`);
  if (s.bits !== 4 && s.bits !== 8) throw new StrataError('quant_bits_invalid', `quantization bits must be 4 or 8 (got ${s.bits})`);
  if (!isBlockSize(s.blockSize)) {
    throw new StrataError('quant_block_invalid', `quantization block size must be a power of two ≥ 16, as MatMulNBits requires (got ${s.blockSize})`);
  }
}

/** torch rounds half to even; ggml's reference quantizer uses roundf (half away from zero): match ggml. */
const roundAway = (x: number): number => (x < 0 ? -Math.round(-x) : Math.round(x));

/** A double result rounded to float32: for + − × ÷ of float32 operands, exactly the float32 operation's result. */
const fl32 = Math.fround;

/**
 * Quantizes a row-major [n, k] float32 matrix block-wise along k. A trailing partial block is padded with zeros
 * (MatMulNBits's k_blocks = ceil(K / block)).
 */
export function quantizeRows(w: Float32Array, n: number, k: number, scheme: QuantScheme, pool?: QuantPool | null): QuantizedMatrix {
  checkScheme(scheme);
  if (w.length !== n * k) throw new Error(`quantizeRows: ${w.length} values is not ${n} × ${k}`);
  const { bits, blockSize } = scheme;
  const kBlocks = Math.ceil(k / blockSize);
  const blob = (blockSize * bits) / 8;
  const data = new Uint8Array(n * kBlocks * blob);
  const scales = new Float32Array(n * kBlocks);
  if (bits === 8) {
    const zeroPoints = new Uint8Array(n * kBlocks);
    if (!quantizeInt8Blocks(w, n, k, blockSize, data, scales, zeroPoints, pool)) int8BlocksF32(w, n, k, blockSize, data, scales, zeroPoints);
    return { data, scales, zeroPoints, n, k, kBlocks, blob };
  }
  const zeroPoints = new Uint8Array(n * Math.ceil(kBlocks / 2));
  if (!quantizeInt4Blocks(w, n, k, blockSize, data, scales, zeroPoints, pool)) int4BlocksF32(w, n, k, blockSize, data, scales, zeroPoints);
  return { data, scales, zeroPoints, n, k, kBlocks, blob };
}

/**
 * quantizeRows's 4-bit blocks in JavaScript (q4Block's search, then the codes, low nibble first): any k; the
 * kernels' reference.
 */
export function int4BlocksF32(w: Float32Array, n: number, k: number, blockSize: number, data: Uint8Array, scales: Float32Array, zeroPoints: Uint8Array): void {
  const kBlocks = Math.ceil(k / blockSize);
  const blob = blockSize / 2;
  const zpBytes = Math.ceil(kBlocks / 2);
  const codes = new Uint8Array(blockSize);
  const fit = { scale: 0, zero: 8 };
  for (let r = 0; r < n; r++) {
    const row = r * k;
    for (let b = 0; b < kBlocks; b++) {
      const start = row + b * blockSize;
      const end = Math.min(row + k, start + blockSize);
      q4Block(w, start, end, fit);
      const inv = fit.scale ? fl32(1 / fit.scale) : 0;
      codes.fill(fit.zero); // a partial block's padding: value 0
      for (let i = start; i < end; i++) codes[i - start] = q4Code(fl32(w[i] * inv), fit.zero);
      scales[r * kBlocks + b] = fit.scale;
      zeroPoints[r * zpBytes + (b >> 1)] |= fit.zero << ((b & 1) * 4);
      const out = (r * kBlocks + b) * blob;
      for (let j = 0; j < blob; j++) data[out + j] = codes[2 * j] | (codes[2 * j + 1] << 4); // low nibble first
    }
  }
}

/**
 * A checkpoint's F16 matrix (raw binary16 bits, row-major [n, k]) quantized without first widening it to float32:
 * the block's amax is found on the bits (|x| orders like its bits with the sign cleared) and each value is read
 * through the binary16 → float32 table. The same codes and scales as quantizeRows over the widened matrix, without a
 * float32 copy twice the tensor's size: an int8 build of GPT-J's F16 checkpoint is this over 6 G weights, which the
 * WebAssembly kernels (quant-kernels.ts) run where the blocks are whole and the JavaScript loop below otherwise.
 */
export function quantizeRowsF16(halves: Uint16Array, n: number, k: number, scheme: QuantScheme, pool?: QuantPool | null): QuantizedMatrix {
  if (scheme.bits !== 8) return quantizeRows(float16ToFloat32(halves), n, k, scheme, pool);
  checkScheme(scheme);
  if (halves.length !== n * k) throw new Error(`quantizeRowsF16: ${halves.length} values is not ${n} × ${k}`);
  const { blockSize } = scheme;
  const kBlocks = Math.ceil(k / blockSize);
  const data = new Uint8Array(n * kBlocks * blockSize);
  const scales = new Float32Array(n * kBlocks);
  const zeroPoints = new Uint8Array(n * kBlocks);
  if (!quantizeInt8Blocks(halves, n, k, blockSize, data, scales, zeroPoints, pool)) int8BlocksF16(halves, n, k, blockSize, data, scales, zeroPoints);
  return { data, scales, zeroPoints, n, k, kBlocks, blob: blockSize };
}

/** quantizeRowsF16's loop in JavaScript, each weight read through the binary16 table: any k; the kernels' reference. */
export function int8BlocksF16(halves: Uint16Array, n: number, k: number, blockSize: number, data: Uint8Array, scales: Float32Array, zeroPoints: Uint8Array): void {
  const table = f16Table();
  int8Blocks((i) => table[halves[i]], n, k, blockSize, data, scales, zeroPoints);
}

/**
 * int8 blocks of float32 weights written straight into `data` (no per-block code buffer and copy), in JavaScript: any
 * k; the kernels' reference (quantizeRows runs the kernels where the blocks are whole).
 */
export function int8BlocksF32(w: Float32Array, n: number, k: number, blockSize: number, data: Uint8Array, scales: Float32Array, zeroPoints: Uint8Array): void {
  int8Blocks((i) => w[i], n, k, blockSize, data, scales, zeroPoints);
}

/**
 * One block's own zero point: the range [min(lo, 0), max(hi, 0)] (0 stays a code) over 255 steps, codes rounded half
 * to even. Searching the scale, as int4 does, gained nothing at 8 bits (clipping costs more than the finer steps
 * save: 0.0 % on Gaussian blocks of 64, a scratch run). NaN weights are skipped by min and max and, like any NaN
 * product (∞ · 0 where a weight is infinite), take the code `zero`: the value 0. A partial block is padded with it.
 */
function int8Blocks(at: (i: number) => number, n: number, k: number, blockSize: number, data: Uint8Array, scales: Float32Array, zeroPoints: Uint8Array): void {
  const kBlocks = Math.ceil(k / blockSize);
  for (let r = 0; r < n; r++) {
    const row = r * k;
    for (let b = 0; b < kBlocks; b++) {
      const start = row + b * blockSize;
      const end = Math.min(row + k, start + blockSize);
      let lo = 0, hi = 0;
      for (let i = start; i < end; i++) {
        const x = at(i);
        lo = x < lo ? x : lo;
        hi = x > hi ? x : hi;
      }
      const scale = fl32(fl32(hi - lo) / 255);
      const inv = scale ? fl32(1 / scale) : 0;
      const z = roundEven(fl32(-lo * inv));
      const zero = z !== z ? 0 : Math.min(255, Math.max(0, z));
      scales[r * kBlocks + b] = scale;
      zeroPoints[r * kBlocks + b] = zero;
      let o = (r * kBlocks + b) * blockSize;
      for (let i = start; i < end; i++, o++) {
        const y = roundEven(fl32(at(i) * inv));
        data[o] = y !== y ? zero : Math.min(255, Math.max(0, y + zero));
      }
      for (let i = end - start; i < blockSize; i++, o++) data[o] = zero;
    }
  }
}

/**
 * Half to even, as WebAssembly's f32x4.nearest (one SSE4.1 roundps): the q4 kernel's search rounds every trial code
 * with it, where half away from zero took seven instructions. Ties differ only on exact halves.
 */
const roundEven = (x: number): number => {
  const r = Math.round(x); // half up
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
};

const q4Code = (x: number, zero: number): number => Math.max(0, Math.min(15, roundEven(x) + zero));

/** q4Block's trial factors, ×1.1 down to ×0.96 of the starting scale in steps of 0.035, as float32. */
const Q4_TRIALS = Array.from({ length: 5 }, (_, t) => fl32(1.1 - 0.035 * t));
/** Scale fits per trial: a second one (rounding again at the fitted scale) fit 0.2 % better at ×1.5 the time. */
const Q4_FITS = 1;

/**
 * One 4-bit block's scale and zero point, for the least squared error: value ≈ scale · (code − zero), codes 0…15.
 * The range [min(lo, 0), max(hi, 0)] (zero stays representable, so the zero point is a code) over 15 steps is the
 * starting scale; 5 trial scales from ×1.1 down to ×0.96 of it each round the block with the zero point that puts
 * the range's low end on code 0, then fit the scale for those codes (Σx·d / Σd², d = code − zero). Shrinking the
 * range clips a few outliers to make every other step finer, the trade ggml's k-quant search (make_qkx2_quants)
 * makes too. The trials are what pays (scratch measurements, 12 k blocks each of Gaussian, Laplace, Student-t and
 * outlier-laden weights): the former 6 trials down to ×0.85, each fitted twice (rounding again at the fitted
 * scale), fit 0.1–0.2 % better in squared error at ×1.6 the time; trials below ×0.95 almost never won.
 * One more trial is q4_0's own (zero point 8, scale max / −8), so no block fits worse than q4_0's; the best fit of
 * all is kept.
 * Every operation is float32 (Math.fround of each double result is the float32 result): the WebAssembly kernel
 * (q4 in model/quant-kernels.wat) searches four blocks at once, one per float32 lane, with the same numbers. Codes
 * round half to even (roundEven) and the zero point half away from zero, as the kernel does.
 */
function q4Block(w: Float32Array, start: number, end: number, out: { scale: number; zero: number }): void {
  let lo = 0, hi = 0, sxx = 0;
  for (let i = start; i < end; i++) {
    const x = w[i];
    lo = x < lo ? x : lo;
    hi = x > hi ? x : hi;
    sxx = fl32(sxx + fl32(x * x));
  }
  out.scale = 0;
  out.zero = 8;
  if (!(hi > lo)) return; // an all-zero block (or NaNs): code 8 everywhere, value 0
  let best = sxx;
  for (let t = 0; t <= Q4_TRIALS.length; t++) {
    const q4_0 = t === Q4_TRIALS.length;
    let scale = q4_0 ? fl32((hi >= -lo ? hi : lo) / -8) : fl32(fl32(fl32(hi - lo) / 15) * Q4_TRIALS[t]);
    const zero = q4_0 ? 8 : Math.max(0, Math.min(15, roundAway(fl32(-lo / scale))));
    for (let refit = 0; refit < Q4_FITS; refit++) {
      const inv = fl32(1 / scale);
      let sxd = 0, sdd = 0;
      for (let i = start; i < end; i++) {
        const d = q4Code(fl32(w[i] * inv), zero) - zero;
        sxd = fl32(sxd + fl32(w[i] * d));
        sdd += d * d; // integers, exact in float32
      }
      if (!(sdd > 0)) break;
      // For fixed codes the squared error is Σx² − (Σxd)²/Σd², at scale Σxd/Σd².
      const err = fl32(sxx - fl32(fl32(sxd * sxd) / sdd));
      const fitted = fl32(sxd / sdd);
      if (err < best) {
        best = err;
        out.scale = fitted;
        out.zero = zero;
      }
      if (fitted === 0) break;
      scale = fitted;
    }
  }
}

/** The float32 matrix a quantized one stands for (tests and error measurement). */
export function dequantizeRows(q: QuantizedMatrix, bits: QuantBits): Float32Array {
  const out = new Float32Array(q.n * q.k);
  const blockSize = (q.blob * 8) / bits;
  const zpBytes = Math.ceil(q.kBlocks / 2);
  for (let r = 0; r < q.n; r++) {
    for (let i = 0; i < q.k; i++) {
      const b = Math.floor(i / blockSize), j = i % blockSize;
      const byte = q.data[(r * q.kBlocks + b) * q.blob + (bits === 8 ? j : j >> 1)];
      const code = bits === 8 ? byte : j & 1 ? byte >> 4 : byte & 15;
      const zero = bits === 8 ? q.zeroPoints[r * q.kBlocks + b] : (q.zeroPoints[r * zpBytes + (b >> 1)] >> ((b & 1) * 4)) & 15;
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

/** Bytes of a quantized [n, k] matrix: codes, float32 scales and zero points (8 bits: a byte each; 4 bits: two a byte). */
export function quantizedBytes(n: number, k: number, scheme: QuantScheme): number {
  const kBlocks = Math.ceil(k / scheme.blockSize);
  return n * kBlocks * ((scheme.blockSize * scheme.bits) / 8) + n * kBlocks * 4 + n * (scheme.bits === 8 ? kBlocks : Math.ceil(kBlocks / 2));
}

/**
 * Which execution providers have kernels for the quantized ops a stage uses (`MatMulNBits` for linear layers,
 * `GatherBlockQuantized` for the token embeddings), by bit width. ORT assigns a node that its EP cannot run to the
 * CPU EP without a word, so a quantized stage on a device missing a kernel would silently run its matrices on the
 * host: refuse it up front instead.
 * - cpu: MLAS's n-bit kernels (measured here; 8-bit needs accuracy_level 4, see model/graph/linear.ts).
 * - webgpu: both ops, 4 and 8 bits, on the WebGPU EP (no copy back to the host in the optimized graph). They compute
 *   in float, without the CPU's int8 activations, so their logits differ from the CPU's by about the CPU's own
 *   rounding; both stay within the same bounds against float32 (test/quant-parity.test.ts, on lavapipe in CI).
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
