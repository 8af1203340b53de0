import { test } from 'node:test';
import assert from 'node:assert/strict';
import { checkQuantKernels, dequantizeRows, quantizedBytes, quantizeRows, quantizeRowsF16, QUANT_SCHEMES, quantScheme, schemeKey, transpose } from '../model/quantize.ts';
import { bytesPerWeight, f32ToF16, float16ToFloat32, parseStageDType } from '../model/dtype.ts';
import { isStrataError } from '../model/errors.ts';
import { transposeInBands } from '../model/graph/linear.ts';

// The quantizer itself: int8's and int4's zero points, MatMulNBits's packing, error bounds.

const rng = (seed: number) => () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32 - 0.5);

test('int8: each block of 32 spans its own [min, max] (0 included) over 255 steps, its zero point a code', () => {
  const row = Float32Array.from({ length: 64 }, (_, i) => (i - 16) / 16); // block 0: [−1, 1) ; block 1: [1, 3)
  const q = quantizeRows(row, 1, 64, QUANT_SCHEMES.int8);
  assert.equal(q.kBlocks, 2);
  assert.equal(q.scales[0], Math.fround(Math.fround(15 / 16 + 1) / 255));
  assert.equal(q.zeroPoints[0], Math.round(1 / q.scales[0]), 'block 0: the zero point puts −1 on code 0');
  assert.equal(q.data[0], 0);
  assert.equal(q.data[31], 255);
  assert.equal(q.data[16], q.zeroPoints[0], '0 is stored exactly: its code is the zero point');
  // A block of one sign still holds 0: its zero point is the range's end.
  assert.equal(q.zeroPoints[1], 0);
  assert.equal(q.scales[1], Math.fround(Math.fround(47 / 16) / 255));
  const back = dequantizeRows(q, 8);
  for (let i = 0; i < row.length; i++) assert.ok(Math.abs(back[i] - row[i]) <= q.scales[i >> 5] / 2 + 1e-7, `weight ${i}: within half a step`);
});

test('int8: exact half-step ties round half to even', () => {
  // A block spanning [−127.5/16, 127.5/16] has scale 1/16 and zero point 128 (127.5 rounds to even), so these values
  // sit exactly on ±0.5, ±1.5 and ±2.5 steps.
  const row = new Float32Array(64);
  row.set([127.5 / 16, -127.5 / 16, -2.5 / 16, 2.5 / 16, -0.5 / 16, 0.5 / 16, 1.5 / 16, -1.5 / 16]);
  const q = quantizeRows(row, 1, 64, QUANT_SCHEMES.int8);
  assert.equal(q.scales[0], 1 / 16);
  assert.equal(q.zeroPoints[0], 128);
  assert.deepEqual([...q.data.subarray(0, 9)], [255, 0, 126, 130, 128, 128, 130, 126, 128]);
});

test('int8 from F16 bits: the same codes and scales as quantizing the widened matrix, partial and zero blocks included', () => {
  const r = rng(5);
  for (const [n, k] of [[3, 96], [4, 80], [2, 17]]) {
    const halves = Uint16Array.from({ length: n * k }, (_, i) => f32ToF16(i % 7 === 0 ? 0 : r() * (i % 5 ? 0.05 : 3)));
    halves.fill(0, 32, 64); // an all-zero block
    halves[1] = f32ToF16(127 / 16); halves[2] = f32ToF16(-2.5 / 16); // a tie
    halves[k + 3] = 0x7e00; // a NaN (in row 1's first block): skipped by min and max, the value 0, both ways
    for (const s of Object.values(QUANT_SCHEMES)) {
      const want = quantizeRows(float16ToFloat32(halves), n, k, s);
      const got = quantizeRowsF16(halves, n, k, s);
      assert.deepEqual(got.scales, want.scales, `${n}×${k} q${s.bits}: scales`);
      assert.deepEqual(got.data, want.data, `${n}×${k} q${s.bits}: codes`);
      assert.deepEqual(got.zeroPoints, want.zeroPoints, `${n}×${k} q${s.bits}: zero points`);
    }
  }
});

/** ggml's quantize_row_q4_0_ref on one block: scale = max / −8, code = min(15, trunc(x / scale + 8.5)). */
function q4Reference(x: Float32Array): Float32Array {
  let max = 0;
  for (const v of x) if (Math.abs(v) > Math.abs(max)) max = v;
  const d = Math.fround(max / -8), id = d ? Math.fround(1 / d) : 0;
  return x.map((v) => (Math.min(15, Math.trunc(Math.fround(Math.fround(v * id) + 8.5))) - 8) * d);
}
const sqErr = (a: Float32Array, b: Float32Array) => a.reduce((s, v, i) => s + (v - b[i]) ** 2, 0);

test('int4: codes pack low nibble first around each block\'s own zero point; each block fits at least as well as ggml\'s q4_0', () => {
  const row = new Float32Array(64);
  row[0] = 0.8; row[1] = -0.1; row[2] = -0.3; row[3] = 0.35;
  row.fill(0.25, 32); row[40] = -0.05; // block 1: all but one positive, so its zero point sits near code 0
  const q = quantizeRows(row, 1, 64, QUANT_SCHEMES.int4);
  const [z0, z1] = [q.zeroPoints![0] & 15, q.zeroPoints![0] >> 4];
  assert.equal(q.zeroPoints!.length, 1);
  assert.ok(z1 <= 2 && z0 > z1, `zero points ${z0}, ${z1}`);
  const s = q.scales[0];
  const code = (x: number) => Math.max(0, Math.min(15, Math.round(x / s) + z0));
  assert.equal(q.data[0], code(0.8) | (code(-0.1) << 4));
  assert.equal(q.data[1], code(-0.3) | (code(0.35) << 4));
  assert.equal(q.data[2], z0 | (z0 << 4)); // zeros are exactly the zero point
  assert.equal(q.blob, 16);
  const back = dequantizeRows(q, 4);
  assert.ok(Math.abs(back[32] - 0.25) < 0.01 && back[33] === back[32], 'a nearly one-sided block keeps its resolution');
  const r = rng(11);
  let ours = 0, ggml = 0;
  for (let b = 0; b < 200; b++) {
    const block = Float32Array.from({ length: 32 }, () => r() * (b % 7 === 0 ? 3 : 0.05) * (1 + r()));
    const e = sqErr(dequantizeRows(quantizeRows(block, 1, 32, QUANT_SCHEMES.int4), 4), block);
    const e0 = sqErr(q4Reference(block), block);
    assert.ok(e <= e0 * (1 + 1e-6), `block ${b}: squared error ${e} > q4_0's ${e0}`);
    ours += e; ggml += e0;
  }
  assert.ok(ours < 0.9 * ggml, `zero points and least-squares scales should beat q4_0 overall: ${ours} vs ${ggml}`);
});

test('dequantized matrices stay within half a step of the original (int4: unless clipped to code 0 or 15); all-zero blocks stay zero', () => {
  const r = rng(3);
  const [n, k] = [5, 96];
  const w = Float32Array.from({ length: n * k }, () => r() * 0.1);
  w.fill(0, 32, 64); // one zero block in row 0
  for (const [name, s] of Object.entries(QUANT_SCHEMES)) {
    const q = quantizeRows(w, n, k, s);
    const back = dequantizeRows(q, s.bits);
    for (let i = 0; i < w.length; i++) {
      const scale = Math.abs(q.scales[Math.floor(i / k) * q.kBlocks + Math.floor((i % k) / s.blockSize)]);
      const j = i % k % s.blockSize;
      const byte = q.data[(Math.floor(i / k) * q.kBlocks + Math.floor((i % k) / s.blockSize)) * q.blob + (s.bits === 8 ? j : j >> 1)];
      const clipped = s.bits === 4 && [0, 15].includes(j & 1 ? byte >> 4 : byte & 15);
      assert.ok(clipped || Math.abs(back[i] - w[i]) <= scale / 2 + 1e-9, `${name}: element ${i} off by ${Math.abs(back[i] - w[i])}, step ${scale}`);
    }
    for (let i = 32; i < 64; i++) assert.ok(back[i] === 0, `${name}: zero block element ${i} = ${back[i]}`);
    assert.equal(q.data.byteLength + q.scales.byteLength + (q.zeroPoints?.byteLength ?? 0), quantizedBytes(n, k, s));
  }
});

test('a Conv1D matrix transposed in bands as it is read (bands of 1, 3 and 7 stored rows, tiles cut at the edges) is transpose()\'s', () => {
  for (const width of [2, 4] as const) {
    const [k, n] = [23, 13];
    const stored = Float32Array.from({ length: k * n }, (_, i) => i * 1.5 - 7);
    const bytes = width === 4 ? new Uint8Array(stored.buffer) : new Uint8Array(Uint16Array.from({ length: k * n }, (_, i) => i).buffer);
    const want = width === 4 ? new Uint8Array(transpose(stored, k, n).buffer) : new Uint8Array(Uint16Array.from(transpose(Float32Array.from({ length: k * n }, (_, i) => i), k, n)).buffer);
    for (const rows of [1, 3, 7]) {
      const reads: number[] = [];
      const out = transposeInBands((from, into) => (reads.push(from), into.set(bytes.subarray(from, from + into.byteLength))), width, n, k, new Uint8Array(k * n * width), rows * n * width);
      assert.deepEqual(out, want, `width ${width}, bands of ${rows}`);
      assert.deepEqual(reads, Array.from({ length: Math.ceil(k / rows) }, (_, b) => b * rows * n * width), 'each band read once, in order');
    }
  }
});

test('a trailing partial block is padded, transpose turns Conv1D [in, out] into [out, in]', () => {
  const w = Float32Array.from({ length: 2 * 40 }, (_, i) => i / 80);
  const q = quantizeRows(w, 2, 40, QUANT_SCHEMES.int8);
  assert.equal(q.kBlocks, 2);
  assert.ok([...q.data.subarray(32 + 8, 64)].every((c) => c === q.zeroPoints[1]), 'the padding is the value 0');
  const back = dequantizeRows(q, 8);
  for (let i = 0; i < w.length; i++) assert.ok(Math.abs(back[i] - w[i]) < 0.01);
  assert.deepEqual([...transpose(Float32Array.of(1, 2, 3, 4, 5, 6), 2, 3)], [1, 4, 2, 5, 3, 6]);
});

test('scheme keys and bytes per weight', () => {
  assert.equal(schemeKey(QUANT_SCHEMES.int8), 'q8b32minmax');
  assert.equal(schemeKey(quantScheme('int8', undefined, '64')), 'q8b64minmax', 'STRATA_INT8_BLOCK=64');
  assert.equal(quantScheme('int8', 32, '64').blockSize, 32, 'an explicit block size wins');
  assert.equal(quantScheme('int4', undefined, '64').blockSize, 32, 'int8 only');
  assert.throws(() => quantScheme('int8', undefined, '48'), (e) => strataCode('quant_block_invalid')(e) && /STRATA_INT8_BLOCK/.test((e as Error).message));
  assert.equal(schemeKey(QUANT_SCHEMES.int4), 'q4b32asymf32e5');
  assert.equal(bytesPerWeight('int8'), 1.15625); // codes, a float32 scale and a zero-point byte per 32
  assert.equal(bytesPerWeight('int4'), 0.640625); // codes, a float32 scale and a 4-bit zero point per 32
  assert.equal(bytesPerWeight('float16'), 2);
});

const strataCode = (code: string) => (e: unknown) => isStrataError(e) && e.code === code;

test('bad input: an unknown dtype, a device without the kernels, a bad scheme', () => {
  assert.equal(parseStageDType('int4'), 'int4');
  assert.equal(parseStageDType(undefined), 'float32');
  assert.throws(() => parseStageDType('int3'), (e) => strataCode('dtype_invalid')(e) && /float32, float16, int8, int4/.test((e as Error).message));
  assert.doesNotThrow(() => checkQuantKernels('webgpu', QUANT_SCHEMES.int4));
  assert.throws(() => checkQuantKernels('coreml', QUANT_SCHEMES.int8), (e) => strataCode('quant_kernel_unavailable')(e) && /--dtype float32/.test((e as Error).message));
  assert.throws(() => quantizeRows(new Float32Array(24), 1, 24, { bits: 8, blockSize: 24, rounding: 'minmax' }), strataCode('quant_block_invalid'));
});

test('BioMedLM-shaped on 2 workers at int8: weights ≤ 30 % of float32, computed from the stage graphs and the planner', async () => {
  const { readFileSync } = await import('node:fs');
  const { normalizeConfig } = await import('../model/config.ts');
  const { buildStageGraph } = await import('../model/stage-graph.ts');
  const { CountingSink } = await import('../model/onnx-builder.ts');
  const { planPartition } = await import('../coordinator/planner.ts');
  const spec = normalizeConfig(JSON.parse(readFileSync(new URL('./configs/biomedlm.config.json', import.meta.url), 'utf8')));
  const workers = [{ id: 'a', memoryBytes: Infinity }, { id: 'b', memoryBytes: Infinity }];
  const unread = { prefix: 'transformer.', readFloat32: (): Float32Array => { throw new Error('a counting build reads no weights'); } };
  const graphBytes = (dtype: 'float32' | 'int8' | 'int4') =>
    planPartition(spec, workers, { dtype: 'int8' }).stages.map((s) => buildStageGraph(spec, s.range, unread, new CountingSink(), { dtype }).paramBytes);
  const [f32, i8, i4] = [graphBytes('float32'), graphBytes('int8'), graphBytes('int4')];
  i8.forEach((b, i) => assert.ok(b / f32[i] <= 0.3, `stage ${i}: int8 ${b} bytes is ${(b / f32[i]).toFixed(3)} of float32`));
  i4.forEach((b, i) => assert.ok(b / f32[i] <= 0.17, `stage ${i}: int4 ${(b / f32[i]).toFixed(3)} of float32`));
  // The planner's memory model (1.156 bytes per int8 weight) stays within 1 % of the graphs.
  const planned = planPartition(spec, workers, { dtype: 'int8' }).stages.map((s) => s.paramBytes);
  planned.forEach((b, i) => assert.ok(Math.abs(b - i8[i]) / i8[i] < 0.01, `stage ${i}: planner ${b} vs graph ${i8[i]}`));
});
