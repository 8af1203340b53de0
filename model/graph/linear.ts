import type { WeightRef } from '../families/family.ts';
import { isQuantized, storedAsFloat32, type QuantizedDType } from '../dtype.ts';
import { ElemType } from '../onnx-builder.ts';
import { quantizeRows, quantizeRowsF16, quantScheme, transpose, type QuantizedMatrix, type QuantScheme } from '../quantize.ts';
import type { StageContext } from './context.ts';
import { int4Stream, int8Stream, Transposer, type Int4Stream, type Int8Stream } from '../quant-kernels.ts';

/**
 * One linear layer: x [N, in] → [N, out].
 * float32/float16: one Gemm against the checkpoint's own weight layout (torch Linear stores [out, in], transB;
 * GPT-2's Conv1D stores [in, out], `conv1d`).
 * int8/int4: ONNX Runtime's `MatMulNBits` (com.microsoft) over the weight quantized block-wise when the graph is
 * built (model/quantize.ts), bias fused; it has kernels on the CPU, CUDA and WebGPU EPs.
 *
 * Why MatMulNBits for int8 too, and accuracy_level 4 (measured 2026-11-29, GPT-2-small's 49 linear shapes, 2 threads,
 * AVX2 host, /tmp scratch runs): accuracy_level 4 lets MLAS quantize the activations per block to int8 and run an
 * int8 dot product: 17.1 ms best at batch 1 against 109 ms for fp32 MatMul, while accuracy_level 0 (fp32 compute)
 * took 1.1 s for 8-bit weights (no fast kernel). `DynamicQuantizeMatMul` / `MatMulIntegerToFloat` with per-channel
 * int8 weights (MLAS QGEMM) were no faster (18.6 / 32 ms at batch 1; batch 8 62 / 55 ms vs 114 ms) and 30× less
 * accurate (relative output error 1.4e-1 vs 4.6e-3: one uint8 scale for the whole activation row, and u8×s8 pairs
 * saturate int16 on AVX2 without VNNI). On CUDA and WebGPU MatMulNBits is the only weight-only int8/int4 kernel.
 */
export function linear(ctx: StageContext, x: string, w: WeightRef, b: WeightRef | null | undefined, conv1d: boolean): string {
  const dtype = ctx.opts.dtype;
  if (!isQuantized(dtype)) return ctx.g.o('Gemm', b ? [x, ctx.W(w), ctx.W(b)] : [x, ctx.W(w)], conv1d ? {} : { transB: 1 });
  const q = quantizedWeight(ctx, w, conv1d, dtype);
  const { bits, blockSize } = quantScheme(dtype, ctx.opts.quantBlockSize);
  // Inputs: A, B, scales, zero_points (each block's own), g_idx (deprecated), bias (stays float32).
  const inputs = b ? [x, q.data, q.scales, q.zeroPoints, '', ctx.W(b)] : [x, q.data, q.scales, q.zeroPoints];
  return ctx.g.o('MatMulNBits', inputs, { K: q.k, N: q.n, bits, block_size: blockSize, accuracy_level: 4 }, 'com.microsoft');
}

/**
 * Rows of a [V, D] table (token embeddings) for int64 `ids`. In int8/int4 stages the table is stored quantized like
 * the linear layers and read by `GatherBlockQuantized` (same codes and scales: a tied LM head shares them); llama.cpp
 * quantizes its token_embd the same way, so both engines see the same table.
 */
export function gatherRows(ctx: StageContext, table: WeightRef, ids: string): string {
  const dtype = ctx.opts.dtype;
  if (!isQuantized(dtype)) return ctx.g.o('Gather', [ctx.W(table), ids], { axis: 0 });
  const q = quantizedWeight(ctx, table, false, dtype);
  const { bits, blockSize } = quantScheme(dtype, ctx.opts.quantBlockSize);
  // GatherBlockQuantized wants the codes 2-D: the same bytes as MatMulNBits's [N, blocks, blob], viewed [N, blocks·blob].
  const rows = ctx.g.weightView(`${q.data}.rows`, q.data, [q.n, q.kBlocks * q.blob]);
  const out = ctx.g.o('GatherBlockQuantized', [rows, ids, q.scales, q.zeroPoints], { bits, block_size: blockSize, gather_axis: 0, quantize_axis: 1 }, 'com.microsoft');
  // A row narrower than whole blocks (the demo model's 16 against 32) comes back padded to whole blocks: cut it to D.
  return q.k % blockSize ? ctx.g.o('Slice', [out, ctx.g.constInt64([0]), ctx.g.constInt64([q.k]), ctx.g.constInt64([-1])]) : out;
}

interface QuantizedWeight {
  data: string;
  scales: string;
  /** The zero points (8 bits: [N, kBlocks]; 4 bits: two a byte). MatMulNBits and GatherBlockQuantized read the same layout. */
  zeroPoints: string;
  n: number;
  k: number;
  kBlocks: number;
  blob: number;
}

/**
 * A checkpoint matrix as [N = out, K = in] codes + scales initializers. The tensor is read and quantized only when the
 * weight sink asks for its bytes (never, when only counting), once for both initializers, and dropped right after:
 * one tensor at a time is in memory, whatever the checkpoint's size.
 */
function quantizedWeight(ctx: StageContext, w: WeightRef, conv1d: boolean, dtype: QuantizedDType): QuantizedWeight {
  const scheme = quantScheme(dtype, ctx.opts.quantBlockSize);
  const [rows, cols] = w.shape;
  const [n, k] = conv1d ? [cols, rows] : [rows, cols];
  const kBlocks = Math.ceil(k / scheme.blockSize);
  const blob = (scheme.blockSize * scheme.bits) / 8;
  let q: QuantizedMatrix | null = null;
  const get = (): QuantizedMatrix => (q ??= quantizeWeight(ctx, w, conv1d, scheme));
  // A checkpoint's F16/F32 [out, in] matrix streams from the file through the WebAssembly kernels, a few MiB at a
  // time, into the sink: no tensor-sized buffers (GPT-J's token table alone is 412 MB of F16). A Conv1D [in, out]
  // matrix is read whole and streams its transpose (transposedRows).
  const stream = streamQuantized(ctx, w, n, k, scheme, conv1d);
  const data = ctx.g.weight(`${w.key}.q${scheme.bits}`, ElemType.UINT8, [n, kBlocks, blob], () => stream?.codes() ?? get().data);
  // The sink reads each initializer's bytes as it is added, in this order: the matrix is dropped after the last one.
  const scales = ctx.g.weight(`${w.key}.q${scheme.bits}.scales`, ElemType.FLOAT, [n, kBlocks], () => {
    const s = stream?.scales() ?? get().scales;
    return new Uint8Array(s.buffer, s.byteOffset, s.byteLength);
  });
  const zeroPoints = ctx.g.weight(`${w.key}.q${scheme.bits}.zp`, ElemType.UINT8, [n, scheme.bits === 8 ? kBlocks : Math.ceil(kBlocks / 2)], () => {
    const z = stream?.zeroPoints() ?? get().zeroPoints;
    q = null;
    return z;
  });
  return { data, scales, zeroPoints, n, k, kBlocks, blob };
}

/** The quantized stream of a stored F16 or F32 matrix, when the source reads files in pieces and the kernels take its blocks. */
function streamQuantized(ctx: StageContext, w: WeightRef, n: number, k: number, scheme: QuantScheme, conv1d: boolean): Int8Stream | Int4Stream | null {
  const stored = ctx.stored(w);
  const width = stored?.dtype === 'F16' ? 2 : stored?.dtype === 'F32' ? 4 : 0;
  if (!stored || !width) return null;
  const pool = ctx.opts.quantPool;
  const read = conv1d ? transposedRows(ctx, stored.readInto, width, n, k) : stored.readInto;
  return scheme.bits === 8 ? int8Stream(read, width, n, k, scheme.blockSize, undefined, pool) : int4Stream(read, width, n, k, scheme.blockSize, undefined, pool);
}

/**
 * The rows of a Conv1D weight's transpose, as a stream reads them: the checkpoint stores [in = k, out = n], the
 * kernels take [n, k] rows. A run of rows of the transpose is a column range of the stored matrix, no contiguous part
 * of the file, so the first call builds the whole transpose, band by band as the file is read, and every call copies
 * its rows out of it (bits, not values: a NaN keeps its payload); after the last row its memory is the next matrix's.
 * float32 goes through the kernels' 4 × 4 SIMD tiles (the build's Transposer; 2026-12-04, a BioMedLM int8 stage
 * build, cold: the transpose 2.6 → 0.6 s, the build 5.5 → 5.0–5.4 s, now waiting on its reads); binary16, or shapes
 * the tiles do not fit, through transposeInBands into the build's Conv1D buffer.
 */
function transposedRows(ctx: StageContext, readInto: (from: number, into: Uint8Array) => void, width: 2 | 4, n: number, k: number): (from: number, into: Uint8Array) => void {
  let t: Uint8Array | null = null;
  return (from, into) => {
    if (!t && width === 4) t = transposer(ctx)?.transpose(readInto, n, k, Math.floor(BAND_BYTES / (n * 16)) * 4) ?? null;
    t ??= transposeInBands(readInto, width, n, k, conv1dScratch(ctx, n * k * width));
    into.set(t.subarray(from, from + into.byteLength));
    if (from + into.byteLength === t.byteLength) t = null;
  };
}

/** Bytes of the stored matrix read per band (the checkpoint's read-ahead slots hold 16 MiB). */
const BAND_BYTES = 8 << 20;
let band: Uint8Array | null = null;

/**
 * Writes the transpose of the stored [k, n] matrix into `out` [n, k], reading it a band of stored rows at a time:
 * each band is transposed while the checkpoint's read-ahead (model/direct-read.ts) reads the next, so the reading
 * and the transposing overlap. In 8 × 8 tiles: element by element, each write went to another cache line (k apart),
 * 0.9 GB/s; tiled, 3.1 GB/s (2026-12-04). Before, the matrix was read whole, then transposed: a BioMedLM int8 stage
 * build spent 3.3 s reading and 4.0 s transposing on its one thread, one after the other.
 */
export function transposeInBands(readInto: (from: number, into: Uint8Array) => void, width: 2 | 4, n: number, k: number, out: Uint8Array, bandBytes = BAND_BYTES): Uint8Array {
  const bits = (b: Uint8Array, length: number) => (width === 4 ? new Uint32Array(b.buffer, b.byteOffset, length) : new Uint16Array(b.buffer, b.byteOffset, length));
  const rowsPerBand = Math.max(1, Math.floor(bandBytes / (n * width)));
  if (!band || band.byteLength < rowsPerBand * n * width) band = new Uint8Array(new ArrayBuffer(rowsPerBand * n * width));
  const dst = bits(out, n * k);
  for (let k0 = 0; k0 < k; k0 += rowsPerBand) {
    const rows = Math.min(rowsPerBand, k - k0);
    const view = band.subarray(0, rows * n * width);
    readInto(k0 * n * width, view);
    const src = bits(view, rows * n);
    for (let r0 = 0; r0 < n; r0 += 8) {
      const r1 = Math.min(n, r0 + 8);
      for (let c0 = 0; c0 < rows; c0 += 8) {
        const c1 = Math.min(rows, c0 + 8);
        for (let r = r0; r < r1; r++) {
          const o = r * k + k0;
          for (let c = c0; c < c1; c++) dst[o + c] = src[c * n + r];
        }
      }
    }
  }
  return out;
}

/** Per build (GraphBuilder): one Transposer (null: no kernels), its memory grown to the largest Conv1D matrix. */
const transposers = new WeakMap<object, Transposer | null>();
function transposer(ctx: StageContext): Transposer | null {
  if (!transposers.has(ctx.g)) transposers.set(ctx.g, Transposer.create());
  return transposers.get(ctx.g)!;
}

/** Per build (GraphBuilder): one buffer for the Conv1D transposes transposeInBands writes, grown to the largest. */
const conv1dScratches = new WeakMap<object, Uint8Array>();

/**
 * `bytes` of the build's Conv1D buffer. Reused, not allocated per matrix: reading into fresh pages ran at ~1.7 GB/s
 * from the page cache on this VM, into pages already mapped at 4–5 GB/s.
 */
function conv1dScratch(ctx: StageContext, bytes: number): Uint8Array {
  let buf = conv1dScratches.get(ctx.g);
  if (!buf || buf.byteLength < bytes) conv1dScratches.set(ctx.g, (buf = new Uint8Array(new ArrayBuffer(bytes))));
  return buf.subarray(0, bytes);
}

/** Reads and quantizes one matrix: an F16 checkpoint's [out, in] weight straight from its bits, anything else through float32. */
function quantizeWeight(ctx: StageContext, w: WeightRef, conv1d: boolean, scheme: QuantScheme): QuantizedMatrix {
  const [rows, cols] = w.shape;
  const raw = ctx.readRaw(w);
  const pool = ctx.opts.quantPool;
  if (raw?.dtype === 'F16' && !conv1d) return quantizeRowsF16(new Uint16Array(raw.bytes.buffer, raw.bytes.byteOffset, raw.bytes.byteLength / 2), rows, cols, scheme, pool);
  const f = raw ? storedAsFloat32(raw.bytes, raw.dtype as 'F32' | 'F16' | 'BF16') : ctx.read(w);
  return conv1d ? quantizeRows(transpose(f, rows, cols), cols, rows, scheme, pool) : quantizeRows(f, rows, cols, scheme, pool);
}
