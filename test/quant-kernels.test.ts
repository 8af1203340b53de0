// The quantizer's WebAssembly kernels (model/quant-kernels.wat) against the JavaScript loops they replace:
// identical codes, scales and zero points on random weights, on every kind of binary16 and float32 value a checkpoint can hold
// (subnormals, ±0, ±∞, NaN, values exactly halfway between two codes), and the embedded module is the source's.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { QUANT_KERNELS_WASM } from '../model/quant-kernels.wasm.ts';
import { assembleQuantKernels } from '../model/quant-kernels-build.ts';
import { QuantPool, Transposer, drain, int4Stream, quantizeInt4Blocks, quantizeInt8Blocks } from '../model/quant-kernels.ts';
import { transposeInBands } from '../model/graph/linear.ts';
import { int4BlocksF32, int8BlocksF16, int8BlocksF32, transpose } from '../model/quantize.ts';
import { float16ToFloat32 } from '../model/dtype.ts';
import { prepareStage, quantThreads } from '../model/stage-cache.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { onnx } from '../model/onnx-builder.ts';
import { writeShardedCheckpoint } from '../bench/load-checkpoint.ts';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';

let seed = 20261203;
const rnd = () => ((seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0) / 2 ** 32);

function both<T extends Uint16Array | Float32Array>(w: T, n: number, k: number, blockSize: number, reference: (w: T, n: number, k: number, b: number, d: Uint8Array, s: Float32Array, z: Uint8Array) => void) {
  const [d1, d2] = [new Uint8Array(n * k), new Uint8Array(n * k)];
  const [s1, s2] = [new Float32Array((n * k) / blockSize), new Float32Array((n * k) / blockSize)];
  const [z1, z2] = [new Uint8Array((n * k) / blockSize), new Uint8Array((n * k) / blockSize)];
  assert.equal(quantizeInt8Blocks(w, n, k, blockSize, d1, s1, z1), true, 'the kernels took whole blocks');
  reference(w, n, k, blockSize, d2, s2, z2);
  return { kernel: { d: d1, s: s1, z: z1 }, reference: { d: d2, s: s2, z: z2 } };
}

function assertSame(r: ReturnType<typeof both>) {
  const diff = r.kernel.d.findIndex((c, i) => c !== r.reference.d[i]);
  assert.equal(diff, -1, `first differing code at ${diff}: kernel ${r.kernel.d[diff]}, reference ${r.reference.d[diff]}`);
  assert.deepEqual(new Uint32Array(r.kernel.s.buffer), new Uint32Array(r.reference.s.buffer), 'scales bit for bit');
  assert.deepEqual(r.kernel.z, r.reference.z, 'zero points');
}

test('the embedded kernels are model/quant-kernels.wat as assembled now (else: npm run build:wasm)', async () => {
  assert.equal(Buffer.from(await assembleQuantKernels()).toString('base64'), QUANT_KERNELS_WASM);
});

test('int8 from binary16 weights: every bit pattern, random rows, ties, non-finite values — codes, scales and zero points as the JS loop', () => {
  // All 65536 patterns, in blocks of 32 (so NaNs and infinities land among finite values and rule whole blocks).
  assertSame(both(Uint16Array.from({ length: 65536 }, (_, i) => i), 64, 1024, 32, int8BlocksF16));
  // Gaussian-ish weights of several magnitudes, block sizes 16…128, more rows than one kernel call takes; and blocks
  // of one sign (0 is the range's end: zero point 0 or 255).
  for (const blockSize of [16, 32, 64, 128]) {
    const [n, k] = [300, 4096];
    const w = new Uint16Array(n * k);
    for (let i = 0; i < w.length; i++) w[i] = Math.floor(rnd() * 0x7800) | (rnd() < 0.5 ? 0x8000 : 0) & 0xffff;
    for (let i = 0; i < k; i++) w[i] &= 0x7fff;
    for (let i = k; i < 2 * k; i++) w[i] |= 0x8000;
    assertSame(both(w, n, k, blockSize, int8BlocksF16));
  }
  // Exact ties: a block spanning [−127.5, 127.5] (scale 1, zero point 128) holding j + 0.5 and −(j + 0.5), which
  // round half to even.
  const f16 = (x: number) => { const f = new Float32Array([x]); const u = new Uint32Array(f.buffer)[0]; return ((u >>> 16) & 0x8000) | ((((u >>> 23) & 0xff) - 112) << 10) | ((u >>> 13) & 0x3ff); };
  const ties = Uint16Array.from({ length: 32 }, (_, i) => f16(i === 0 ? 127.5 : i === 31 ? -127.5 : ((i % 2 ? 1 : -1) * (i + 0.5))));
  const t = both(ties, 1, 32, 32, int8BlocksF16);
  assertSame(t);
  assert.equal(t.kernel.s[0], 1);
  assert.equal(t.kernel.z[0], 128);
  assert.equal(t.kernel.d[1], 128 + 2, '1.5 → 2');
  assert.equal(t.kernel.d[2], 128 - 2, '−2.5 → −2');
  assert.equal(t.kernel.d[3], 128 + 4, '3.5 → 4');
  assert.deepEqual(Array.from(float16ToFloat32(ties.subarray(0, 3))), [127.5, 1.5, -2.5]);
});

test('int8 from float32 weights: random, subnormal, ±0, ±∞, NaN, ties, one-signed blocks — codes, scales and zero points as the JS loop', () => {
  for (const blockSize of [16, 32, 64]) {
    const [n, k] = [200, 2560];
    const w = new Float32Array(n * k);
    for (let i = 0; i < w.length; i++) w[i] = (rnd() - 0.5) * 10 ** Math.floor(rnd() * 8 - 6);
    const special = [0, -0, Infinity, -Infinity, NaN, 1e-45, -1e-40, 3.4e38, 0.5, -0.5, 126.5, -126.5];
    for (let i = 0; i < 4000; i++) w[Math.floor(rnd() * w.length)] = special[i % special.length];
    for (let i = 0; i < k; i++) w[i] = Math.abs(w[i]);
    for (let i = k; i < 2 * k; i++) w[i] = -Math.abs(w[i]);
    w.fill(0, 2 * k, 3 * k);
    assertSame(both(w, n, k, blockSize, int8BlocksF32));
  }
  const ties = Float32Array.from({ length: 16 }, (_, i) => (i === 0 ? -127.5 : i === 15 ? 127.5 : (i % 2 ? 1 : -1) * (i + 0.5)));
  assertSame(both(ties, 1, 16, 16, int8BlocksF32));
});

test('int4: the kernels search each block as q4Block does: scales, zero points and codes as the JS loop, bit for bit', () => {
  for (const [blockSize, n, k] of [[32, 150, 768], [16, 37, 48], [64, 20, 4096], [32, 3, 96]] as const) {
    const w = new Float32Array(n * k);
    for (let i = 0; i < w.length; i++) w[i] = (rnd() - 0.5) * 10 ** Math.floor(rnd() * 6 - 4) + (i % 97 === 0 ? 0.3 : 0);
    // Blocks of every kind: all zero, constant, one-signed, one outlier, ±0, subnormals, halves, the smallest subnormal.
    w.fill(0, 0, blockSize);
    w.fill(0.25, blockSize, 2 * blockSize);
    for (let i = 2 * blockSize; i < 3 * blockSize; i++) w[i] = -Math.abs(w[i]);
    w[3 * blockSize + 5] = 40;
    w[4 * blockSize] = -0;
    w[4 * blockSize + 1] = 1e-42;
    for (let i = 5 * blockSize; i < 6 * blockSize; i++) w[i] = (i % 16) - 7.5;
    for (let i = 6 * blockSize; i < 7 * blockSize; i++) w[i] = i % 3 ? 1.4e-45 : 0; // its fitted scale rounds to float32 0
    const kBlocks = k / blockSize;
    const got = { d: new Uint8Array((n * k) / 2), s: new Float32Array(n * kBlocks), z: new Uint8Array(n * Math.ceil(kBlocks / 2)) };
    const want = { d: new Uint8Array((n * k) / 2), s: new Float32Array(n * kBlocks), z: new Uint8Array(n * Math.ceil(kBlocks / 2)) };
    assert.equal(quantizeInt4Blocks(w, n, k, blockSize, got.d, got.s, got.z), true);
    int4BlocksF32(w, n, k, blockSize, want.d, want.s, want.z);
    const diff = got.d.findIndex((c, i) => c !== want.d[i]);
    assert.equal(diff, -1, `block ${blockSize}: first differing code byte at ${diff}: ${got.d[diff]} vs ${want.d[diff]}`);
    assert.deepEqual(new Uint32Array(got.s.buffer), new Uint32Array(want.s.buffer), `block ${blockSize}: scales bit for bit`);
    assert.deepEqual(got.z, want.z, `block ${blockSize}: zero points`);
  }
});

test('int4 from binary16 bits: every bit pattern, widened in the kernel, searched and coded as the JS loop over the table\'s float32', () => {
  // All 65536 patterns (subnormals, ±0, ±∞, NaNs) in shuffled blocks, then blocks of one magnitude class each.
  const halves = Uint16Array.from({ length: 65536 * 2 }, (_, i) => (i < 65536 ? i : Math.floor(rnd() * 65536)));
  for (let i = 65536; i > 1; i--) {
    const j = Math.floor(rnd() * i);
    [halves[i - 1], halves[j]] = [halves[j], halves[i - 1]];
  }
  for (let i = 65536; i < halves.length; i++) halves[i] = (halves[i] & 0x83ff) | (i % 3 === 0 ? 0 : i % 3 === 1 ? 0x3c00 : 0x7800);
  for (const [n, k] of [[256, 512], [4096, 32]] as const) {
    const bytes = new Uint8Array(halves.buffer);
    const stream = int4Stream((from, into) => into.set(bytes.subarray(from, from + into.byteLength)), 2, n, k, 32)!;
    const got = new Uint8Array((n * k) / 2);
    drain(stream.codes(), got);
    const want = { d: new Uint8Array((n * k) / 2), s: new Float32Array((n * k) / 32), z: new Uint8Array(n * Math.ceil(k / 64)) };
    int4BlocksF32(float16ToFloat32(halves), n, k, 32, want.d, want.s, want.z);
    const diff = got.findIndex((c, i) => c !== want.d[i]);
    assert.equal(diff, -1, `${n}×${k}: first differing code byte at ${diff}: ${got[diff]} vs ${want.d[diff]}`);
    assert.deepEqual(new Uint32Array(stream.scales().buffer), new Uint32Array(want.s.buffer), `${n}×${k}: scales bit for bit`);
    assert.deepEqual(stream.zeroPoints(), want.z, `${n}×${k}: zero points`);
  }
});

test('a partial last block is left to the JavaScript loop', () => {
  assert.equal(quantizeInt8Blocks(new Float32Array(40), 1, 40, 32, new Uint8Array(64), new Float32Array(2), new Uint8Array(2)), false);
  assert.equal(quantizeInt4Blocks(new Float32Array(40), 1, 40, 32, new Uint8Array(32), new Float32Array(2), new Uint8Array(1)), false);
});

/** A built stage's external initializers by name: their bytes in weights.bin. */
function initializers(stagePath: string): (name: string) => Buffer {
  const model = onnx.ModelProto.decode(readFileSync(stagePath));
  const weights = readFileSync(join(dirname(stagePath), 'weights.bin'));
  return (name) => {
    const t = model.graph!.initializer!.find((i) => i.name === name);
    assert.ok(t, `initializer ${name}`);
    const kv = Object.fromEntries(t.externalData!.map((e) => [e.key, e.value]));
    return weights.subarray(Number(kv.offset), Number(kv.offset) + Number(kv.length));
  };
}

/** A built int4 stage stores `key` as the JS loop quantizes `w` [n, k] (block 32): codes, scales, zero points. */
function assertInt4Stored(init4: (name: string) => Buffer, key: string, w: Float32Array, n: number, k: number, label: string): void {
  const [d4, s4, z4] = [new Uint8Array((n * k) / 2), new Float32Array((n * k) / 32), new Uint8Array(n * Math.ceil(k / 64))];
  int4BlocksF32(w, n, k, 32, d4, s4, z4);
  assert.deepEqual(init4(`${key}.q4`), Buffer.from(d4), `${label} ${key}: int4 codes`);
  assert.deepEqual(init4(`${key}.q4.scales`), Buffer.from(s4.buffer), `${label} ${key}: int4 scales`);
  assert.deepEqual(init4(`${key}.q4.zp`), Buffer.from(z4), `${label} ${key}: int4 zero points`);
}

test('int8 and int4 stages built from F16 and F32 checkpoints stream every [out, in] matrix through the kernels: the codes, scales and zero points of the JS loops', () => {
  const root = mkdtempSync(join(tmpdir(), 'strata-qk-'));
  try {
    for (const dtype of ['F16', 'F32'] as const) {
      const dir = join(root, dtype);
      writeShardedCheckpoint(dir, { family: 'gptj', blocks: 2, dModel: 64, heads: 4, vocab: 96, maxPositions: 32, rotaryDim: 8 }, dtype, 64 << 10);
      const stage = prepareStage(dir, { first: 0, last: 2 }, { dtype: 'int8', cacheDir: join(root, `cache-${dtype}`), threads: 1 });
      const stage4 = prepareStage(dir, { first: 0, last: 2 }, { dtype: 'int4', cacheDir: join(root, `cache-${dtype}`), threads: 1 });
      // The same stages quantized on 3 threads (QuantPool): the same bytes.
      for (const [dt, one] of [['int8', stage], ['int4', stage4]] as const) {
        const three = prepareStage(dir, { first: 0, last: 2 }, { dtype: dt, cacheDir: join(root, `cache-${dtype}-3`), threads: 3 });
        assert.ok(three.built);
        assert.deepEqual(readFileSync(join(dirname(three.path), 'weights.bin')), readFileSync(join(dirname(one.path), 'weights.bin')), `${dtype} → ${dt}: 3 threads, the same weights`);
      }
      const [init, init4] = [initializers(stage.path), initializers(stage4.path)];
      const ck = Checkpoint.open(dir);
      try {
        // The token table (GatherBlockQuantized), a 64 → 256 and a 256 → 64 matrix, in several shards.
        for (const [key, n, k] of [['transformer.wte.weight', 96, 64], ['transformer.h.0.mlp.fc_in.weight', 256, 64], ['transformer.h.1.mlp.fc_out.weight', 64, 256]] as const) {
          const raw = ck.readRaw(key, [n, k]);
          const [data, scales, zeros] = [new Uint8Array(n * k), new Float32Array((n * k) / 32), new Uint8Array((n * k) / 32)];
          if (dtype === 'F16') int8BlocksF16(new Uint16Array(raw.bytes.buffer), n, k, 32, data, scales, zeros);
          else int8BlocksF32(new Float32Array(raw.bytes.buffer), n, k, 32, data, scales, zeros);
          assert.deepEqual(init(`${key}.q8`), Buffer.from(data), `${dtype} ${key}: codes`);
          assert.deepEqual(init(`${key}.q8.scales`), Buffer.from(scales.buffer), `${dtype} ${key}: scales`);
          assert.deepEqual(init(`${key}.q8.zp`), Buffer.from(zeros), `${dtype} ${key}: zero points`);
          const wide = dtype === 'F16' ? float16ToFloat32(new Uint16Array(raw.bytes.buffer)) : new Float32Array(raw.bytes.buffer);
          assertInt4Stored(init4, key, wide, n, k, dtype);
        }
      } finally {
        ck.close();
      }
    }
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

test('a Conv1D checkpoint (GPT-2: [in, out] matrices) streams its transpose through the kernels: the codes of the JS loops over the transposed matrix', () => {
  const root = mkdtempSync(join(tmpdir(), 'strata-qk-conv-'));
  try {
    for (const dtype of ['F16', 'F32'] as const) {
      const dir = join(root, dtype);
      writeShardedCheckpoint(dir, { family: 'gpt2', blocks: 2, dModel: 64, heads: 4, vocab: 96, maxPositions: 32 }, dtype, 64 << 10);
      const cacheDir = join(root, `cache-${dtype}`);
      const [init8, init4] = (['int8', 'int4'] as const).map((dt) => initializers(prepareStage(dir, { first: 0, last: 2 }, { dtype: dt, cacheDir, threads: 2 }).path));
      const ck = Checkpoint.open(dir);
      try {
        // c_attn [64, 192], mlp.c_proj [256, 64]: stored [in, out], quantized as [out, in].
        for (const [key, rows, cols] of [['transformer.h.0.attn.c_attn.weight', 64, 192], ['transformer.h.1.mlp.c_proj.weight', 256, 64]] as const) {
          const raw = ck.readRaw(key, [rows, cols]);
          const f = dtype === 'F16' ? float16ToFloat32(new Uint16Array(raw.bytes.buffer)) : new Float32Array(raw.bytes.buffer);
          const t = transpose(f, rows, cols);
          const [n, k] = [cols, rows];
          const [d8, s8, z8] = [new Uint8Array(n * k), new Float32Array((n * k) / 32), new Uint8Array((n * k) / 32)];
          int8BlocksF32(t, n, k, 32, d8, s8, z8);
          assert.deepEqual(init8(`${key}.q8`), Buffer.from(d8), `${dtype} ${key}: int8 codes`);
          assert.deepEqual(init8(`${key}.q8.scales`), Buffer.from(s8.buffer), `${dtype} ${key}: int8 scales`);
          assert.deepEqual(init8(`${key}.q8.zp`), Buffer.from(z8), `${dtype} ${key}: int8 zero points`);
          assertInt4Stored(init4, key, t, n, k, dtype);
        }
      } finally {
        ck.close();
      }
    }
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

test('the kernels\' 4 × 4 transpose (Transposer) moves the bits transposeInBands moves, band by band; shapes its tiles do not fit are left to JavaScript', () => {
  const t = Transposer.create()!;
  for (const [n, k, rows] of [[4, 4, 4], [12, 20, 8], [16, 8, 4], [40, 36, 12], [8, 28, 12]] as const) {
    // NaN payloads and negative zeros too: bits, not values
    const stored = Uint32Array.from({ length: k * n }, () => Math.floor(rnd() * 2 ** 32));
    const bytes = new Uint8Array(stored.buffer);
    const read = (from: number, into: Uint8Array) => into.set(bytes.subarray(from, from + into.byteLength));
    const want = transposeInBands(read, 4, n, k, new Uint8Array(n * k * 4));
    const reads: number[] = [];
    const got = t.transpose((from, into) => (reads.push(from), read(from, into)), n, k, rows);
    assert.ok(got, `${n} × ${k}`);
    assert.deepEqual(Buffer.from(got), Buffer.from(want), `n ${n}, k ${k}, bands of ${rows}`);
    assert.deepEqual(reads, Array.from({ length: Math.ceil(k / rows) }, (_, b) => b * rows * n * 4), 'each band read once, in order');
  }
  const none = () => assert.fail('nothing is read');
  assert.equal(t.transpose(none, 13, 8, 4), null, 'n not a multiple of 4');
  assert.equal(t.transpose(none, 8, 10, 4), null, 'k not a multiple of 4');
  assert.equal(t.transpose(none, 8, 8, 6), null, 'a band not a multiple of 4 rows');
});

test('QuantPool: the kernels split across 2–4 threads give the codes, scales and zero points of one thread', async () => {
  for (const threads of [2, 3, 4]) {
    const pool = QuantPool.create(threads)!;
    assert.equal(pool.threads, threads);
    try {
      // Block counts per chunk: odd, fewer than the threads, and many.
      for (const [n, k] of [[1, 32], [3, 96], [37, 160], [600, 768]] as const) {
        const w = Float32Array.from({ length: n * k }, () => (rnd() - 0.5) * 10 ** Math.floor(rnd() * 4 - 3));
        const h = Uint16Array.from({ length: n * k }, () => Math.floor(rnd() * 0x7c00) | (rnd() < 0.5 ? 0x8000 : 0));
        const int8 = (x: Float32Array | Uint16Array, p: QuantPool | null) => {
          const [d, sc, z] = [new Uint8Array(n * k), new Float32Array((n * k) / 32), new Uint8Array((n * k) / 32)];
          assert.ok(quantizeInt8Blocks(x, n, k, 32, d, sc, z, p));
          return [d, new Uint8Array(sc.buffer), z];
        };
        const int4 = (p: QuantPool | null) => {
          const [d, sc, z] = [new Uint8Array((n * k) / 2), new Float32Array((n * k) / 32), new Uint8Array(n * Math.ceil(k / 64))];
          assert.ok(quantizeInt4Blocks(w, n, k, 32, d, sc, z, p));
          return [d, new Uint8Array(sc.buffer), z];
        };
        assert.deepEqual(int8(w, pool), int8(w, null), `${threads} threads, int8 f32 ${n}×${k}`);
        assert.deepEqual(int8(h, pool), int8(h, null), `${threads} threads, int8 f16 ${n}×${k}`);
        assert.deepEqual(int4(pool), int4(null), `${threads} threads, int4 ${n}×${k}`);
      }
    } finally {
      await pool.close();
    }
  }
  assert.equal(QuantPool.create(1), null, 'one thread: no helpers');
});

test('quantThreads: STRATA_QUANT_THREADS, else the caller\'s threads, else the cores; at most 16 unless set', () => {
  assert.equal(quantThreads(3, undefined), 3);
  assert.equal(quantThreads(64, undefined), 16);
  assert.equal(quantThreads(64, '32'), 32);
  assert.equal(quantThreads(2, 'many'), 1);
  assert.equal(quantThreads(undefined, undefined), Math.min(availableParallelism(), 16));
});
