import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { cpSync, existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { evenSplit } from '../model/range.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { prepareStage } from '../model/stage-cache.ts';
import { fillMask, forwardLogits, generate, type Stepper } from '../model/generation.ts';
import { isStrataError } from '../model/errors.ts';
import type { QuantizedDType } from '../model/dtype.ts';
import { RemotePipeline } from '../coordinator/remote-pipeline.ts';
import * as ort from 'onnxruntime-node';
import { onnx } from '../model/onnx-builder.ts';
import { webgpuProvider } from '../model/executor.ts';
import { startLocalCluster, type LocalCluster } from '../bin/local-cluster.ts';
import { ALL_FIXTURES, ensureXdgRuntimeDir, expected, fixtureDir, maxAbsDiff, testCacheDir, type Expected } from './helpers/fixtures.ts';
import { readSafetensors, writeSafetensors } from './helpers/safetensors.ts';

// Quantized stage graphs are not bit-exact: their logits are bounded against the fixtures' float32 (Hugging Face)
// logits, position by position, for every causal fixture and every split, in process and over gRPC.
//
// Bounds = the worst value measured on these fixtures (2026-11-29, every split gives the same numbers) with a margin:
//   int8: max KL(fp32 ‖ int8) per position 7.9e-3, mean 1.9e-3, top-1 agreement ≥ 94.3 %  (gpt2-tiny is the worst)
//   int4: max 0.741, mean 0.174, top-1 ≥ 59.8 %  (with zero points, 2026-12-02; d_model 64: two blocks per row, and
//         random weights with no outliers to spare; on GPT-2-small's shape int4 stays as close to fp32 as llama.cpp's
//         q4_0, see bench/quant-accuracy.ts)
// 2026-12-04, K=1, the three fixtures: the CPU's int8 max KL 3.7e-3 … 7.9e-3 as before, int4 0.26 … 0.93 (gpt2-tiny,
// since int4's search changed); WebGPU on lavapipe (float compute, no int8 activations) int8 2.7e-3 … 5.2e-3, int4
// 0.27 … 0.93. The same bounds hold for both devices.
// 2026-12-06, int8 with a zero point per block (was q8_0's symmetric rounding): the CPU's max KL 2.5e-3 … 1.2e-2
// (gpt2-tiny, one position; its mean 1.8e-3 as before), top-1 83/87 … 169/173; WebGPU 1.9e-3 … 7.4e-3; every split
// and gRPC the same. On GPT-2-small's shape it is closer to fp32 than q8_0 (bench/quant-accuracy.ts).
const BOUNDS: Record<QuantizedDType, { maxKl: number; meanKl: number; top1: number }> = {
  int8: { maxKl: 0.02, meanKl: 0.005, top1: 0.9 },
  int4: { maxKl: 1.5, meanKl: 0.4, top1: 0.55 },
};
const DTYPES: QuantizedDType[] = ['int8', 'int4'];

before(() => testCacheDir());

const logSoftmax = (r: number[]): number[] => {
  const m = Math.max(...r);
  const l = Math.log(r.reduce((s, x) => s + Math.exp(x - m), 0)) + m;
  return r.map((x) => x - l);
};
/** KL(p ‖ q) of the softmaxes of two logit rows. */
export function klDivergence(p: number[], q: number[]): number {
  const lp = logSoftmax(p), lq = logSoftmax(q);
  return lp.reduce((s, a, i) => s + Math.exp(a) * (a - lq[i]), 0);
}
const argmax = (r: number[]): number => r.indexOf(Math.max(...r));

/** Runs every forward case; checks the bounds against the fixture's float32 logits and returns the logits. */
async function checkBounded(p: Stepper, exp: Expected, dtype: QuantizedDType, label: string): Promise<number[][][]> {
  const out: number[][][] = [];
  let maxKl = 0, sumKl = 0, n = 0, agree = 0;
  for (const c of exp.forward) {
    const got = await forwardLogits(p, c.input_ids);
    out.push(got);
    got.forEach((row, t) => {
      const kl = klDivergence(c.logits[t], row);
      maxKl = Math.max(maxKl, kl);
      sumKl += kl;
      n++;
      if (argmax(row) === argmax(c.logits[t])) agree++;
    });
  }
  const b = BOUNDS[dtype];
  const figures = `${label}: max KL ${maxKl.toExponential(2)}, mean ${(sumKl / n).toExponential(2)}, top-1 ${agree}/${n}`;
  assert.ok(maxKl <= b.maxKl && sumKl / n <= b.meanKl && agree / n >= b.top1, `${figures} (bounds ${JSON.stringify(b)})`);
  return out;
}

const causal = ALL_FIXTURES.filter((n) => loadModelSpec(fixtureDir(n)).causal);

describe('quantized graphs in process: bounded against fp32 on every causal fixture and split', () => {
  for (const name of causal) {
    const dir = fixtureDir(name);
    const spec = loadModelSpec(dir);
    const exp = expected(name);
    for (const dtype of DTYPES) {
      test(`${name} ${dtype}: every split within the KL/top-1 bounds and equal to K=1`, async () => {
        let whole: number[][][] | undefined;
        for (let k = 1; k <= spec.blocks; k++) {
          const p = await LocalPipeline.load(dir, k, { dtype });
          try {
            const got = await checkBounded(p, exp, dtype, `${name} ${dtype} K=${k}`);
            // Hidden states cross stages in float32: the split does not change a quantized model's function.
            whole ??= got;
            got.forEach((rows, i) => assert.ok(maxAbsDiff(rows, whole![i]) <= 1e-4, `K=${k} differs from K=1 by ${maxAbsDiff(rows, whole![i])}`));
          } finally {
            await p.close();
          }
        }
      });
    }
  }

  test('distilbert-tiny int8: fill-mask top-1 unchanged on every split', async () => {
    const dir = fixtureDir('distilbert-tiny');
    const exp = expected('distilbert-tiny');
    for (let k = 1; k <= loadModelSpec(dir).blocks; k++) {
      const p = await LocalPipeline.load(dir, k, { dtype: 'int8' });
      try {
        for (const f of exp.fill_mask ?? []) assert.equal((await fillMask(p, f.input_ids, f.mask_index, 5))[0].id, f.top5_ids[0], `K=${k}`);
      } finally {
        await p.close();
      }
    }
  });
});

describe('quantized graphs on WebGPU (lavapipe): bounded against fp32, K = 1 and 2, with and without the KV cache', () => {
  before(() => ensureXdgRuntimeDir());
  for (const name of causal) {
    const dir = fixtureDir(name);
    const exp = expected(name);
    for (const dtype of DTYPES) {
      test(`${name} ${dtype}: within the CPU's KL/top-1 bounds; greedy decode through the device's KV slots is the argmax of a full forward`, async () => {
        let whole: number[][][] | undefined;
        for (const k of [1, 2]) {
          const p = await LocalPipeline.load(dir, k, { dtype, device: 'webgpu' });
          try {
            assert.deepEqual(p.stages.map((s) => s.session.executionProvider), Array(k).fill('webgpu'));
            const got = await checkBounded(p, exp, dtype, `${name} ${dtype} webgpu K=${k}`);
            whole ??= got;
            got.forEach((rows, i) => assert.ok(maxAbsDiff(rows, whole![i]) <= 1e-4, `K=${k} differs from K=1 by ${maxAbsDiff(rows, whole![i])}`));
            // The KV path (slots resident on the device, prompt in chunks) against recomputing every prefix whole.
            const prompt = exp.forward.at(-1)!.input_ids.slice(0, 8);
            const ids = (await generate(p, prompt, { maxNewTokens: 6, eosTokenId: null, prefillChunk: 3 })).outputIds;
            const full = await forwardLogits(p, [...prompt, ...ids].slice(0, -1));
            assert.deepEqual(ids, full.slice(prompt.length - 1).map(argmax), `K=${k}: cached decode against full forwards`);
          } finally {
            await p.close();
          }
        }
      });
    }
  }
  test('gpt2-tiny int8 and int4: the quantized ops run on the device (the optimized graph copies nothing back to the host)', async () => {
    // A node the WebGPU EP cannot run goes to the CPU EP without a word, behind a MemcpyToHost.
    for (const dtype of DTYPES) {
      const stage = prepareStage(fixtureDir('gpt2-tiny'), { first: 0, last: 2 }, { dtype, device: 'webgpu' });
      const out = join(mkdtempSync(join(tmpdir(), 'strata-opt-')), 'optimized.onnx');
      const session = await ort.InferenceSession.create(stage.path, { executionProviders: [webgpuProvider()], logSeverityLevel: 3, optimizedModelFilePath: out });
      await session.release();
      const ops = (onnx.ModelProto.decode(readFileSync(out)).graph?.node ?? []).map((n) => n.opType);
      assert.ok(ops.includes('MatMulNBits') && ops.includes('GatherBlockQuantized') && ops.includes('MemcpyFromHost'), `${dtype}: the optimized graph is the WebGPU one`);
      assert.equal(ops.filter((op) => op === 'MemcpyToHost').length, 0, dtype);
    }
  });
});

describe('quantized graphs over gRPC: every split between real worker processes', () => {
  for (const name of ALL_FIXTURES) {
    const dir = fixtureDir(name);
    const spec = loadModelSpec(dir);
    const exp = expected(name);
    const fingerprint = Checkpoint.open(dir).fingerprint();
    describe(`${name} over gRPC`, () => {
      let cluster: LocalCluster;
      before(async () => {
        cluster = await startLocalCluster(dir, spec.blocks);
      });
      after(async () => cluster?.stop());
      for (const dtype of spec.causal ? DTYPES : (['int8'] as const)) {
        test(`${dtype}: K=1..${spec.blocks} ${spec.causal ? 'bounded, and equal to the in-process graphs' : 'fill-mask top-1 unchanged'}`, async () => {
          const local = await LocalPipeline.load(dir, 1, { dtype });
          const reference = await Promise.all(exp.forward.map((c) => forwardLogits(local, c.input_ids)));
          await local.close();
          for (let k = 1; k <= spec.blocks; k++) {
            const p = await RemotePipeline.connect(cluster.workers.slice(0, k).map((w) => w.address), { spec, fingerprint, dtype, ranges: evenSplit(spec.blocks, k) });
            try {
              if (spec.causal) {
                const got = await checkBounded(p, exp, dtype, `${name} ${dtype} gRPC K=${k}`);
                got.forEach((rows, i) => assert.ok(maxAbsDiff(rows, reference[i]) <= 1e-4, `gRPC K=${k} vs in process: ${maxAbsDiff(rows, reference[i])}`));
              } else {
                for (const f of exp.fill_mask ?? []) assert.equal((await fillMask(p, f.input_ids, f.mask_index, 5))[0].id, f.top5_ids[0], `K=${k}`);
              }
            } finally {
              p.close();
            }
          }
        });
      }
    });
  }
});

const code = (c: string) => (e: unknown) => isStrataError(e) && e.code === c;

describe('quantized stage cache and bad checkpoints', () => {
  test('the cache key carries the scheme: same scheme reused, another block size or dtype rebuilds', () => {
    const cacheDir = mkdtempSync(join(tmpdir(), 'strata-quant-cache-'));
    const dir = fixtureDir('gpt2-tiny');
    const range = { first: 0, last: 4 };
    const a = prepareStage(dir, range, { dtype: 'int8', cacheDir });
    const again = prepareStage(dir, range, { dtype: 'int8', cacheDir });
    const b64 = prepareStage(dir, range, { dtype: 'int8', cacheDir, quantBlockSize: 64 });
    const f32 = prepareStage(dir, range, { dtype: 'float32', cacheDir });
    const i4 = prepareStage(dir, range, { dtype: 'int4', cacheDir });
    assert.deepEqual([a.built, again.built, b64.built, f32.built, i4.built], [true, false, true, true, true]);
    assert.equal(again.path, a.path);
    assert.equal(new Set([a.path, b64.path, f32.path, i4.path]).size, 4);
    assert.match(a.path, /int8-q8b32minmax/);
    assert.match(b64.path, /int8-q8b64minmax/);
    assert.deepEqual(JSON.parse(readFileSync(join(a.path, '..', 'meta.json'), 'utf8')).quant, { bits: 8, blockSize: 32, rounding: 'minmax' });
    // Bigger blocks: fewer scales and zero points; int4 halves the codes.
    assert.ok(b64.paramBytes < a.paramBytes && i4.paramBytes < a.paramBytes && a.paramBytes < f32.paramBytes / 2);
    // STRATA_INT8_BLOCK=64 where the graph is built: the same graph as the explicit block size.
    process.env.STRATA_INT8_BLOCK = '64';
    try {
      const byEnv = prepareStage(dir, range, { dtype: 'int8', cacheDir });
      assert.equal(byEnv.path, b64.path);
      assert.equal(byEnv.built, false);
    } finally {
      delete process.env.STRATA_INT8_BLOCK;
    }
    assert.throws(() => prepareStage(dir, range, { dtype: 'int8', cacheDir, quantBlockSize: 48 }), code('quant_block_invalid'));
  });

  test('a checkpoint stored in integers cannot be quantized: a typed error naming the fix', () => {
    const dir = mkdtempSync(join(tmpdir(), 'strata-quant-i8-'));
    cpSync(fixtureDir('gpt2-tiny'), dir, { recursive: true });
    const file = join(dir, 'model.safetensors');
    const tensors = readSafetensors(file);
    const key = [...tensors.keys()].find((k) => k.endsWith('h.0.mlp.c_fc.weight'))!;
    const t = tensors.get(key)!;
    tensors.set(key, { dtype: 'I8', shape: t.shape, data: new Uint8Array(t.shape.reduce((a, b) => a * b, 1)) });
    writeSafetensors(file, tensors);
    const cacheDir = mkdtempSync(join(tmpdir(), 'strata-quant-cache-'));
    assert.throws(() => prepareStage(dir, { first: 0, last: 4 }, { dtype: 'int8', cacheDir }),
      (e) => code('quant_source_dtype_unsupported')(e) && /is I8/.test((e as Error).message) && /original floating-point checkpoint/.test((e as Error).message));
    assert.ok(!existsSync(join(cacheDir, 'x')));
  });
});

describe('a model narrower than one quantization block', () => {
  // The built-in demo model (`npm start`) has d_model 16: each token-table row is half a block, and the quantized
  // table's rows come back padded to the whole block. int8 and int4 must still load and compute the same function.
  test('the demo model (d_model 16) at int8 and int4: loads, int8 keeps float32\'s greedy tokens, int4 stays bounded', async () => {
    const dir = join(import.meta.dirname, '..', 'models', 'demo');
    const ids = [464, 3290, 318, 257, 1332, 286];
    const f32 = await LocalPipeline.load(dir, 1, {});
    let want: number[][];
    try {
      want = await forwardLogits(f32, ids);
    } finally {
      await f32.close();
    }
    for (const dtype of DTYPES) {
      const p = await LocalPipeline.load(dir, 2, { dtype });
      try {
        const got = await forwardLogits(p, ids);
        assert.equal(got.length, want.length);
        const kl = Math.max(...got.map((row, t) => klDivergence(want[t], row)));
        if (dtype === 'int8') assert.deepEqual(got.map(argmax), want.map(argmax), `${dtype}: top-1 per position`);
        assert.ok(kl <= BOUNDS[dtype].maxKl, `${dtype}: max KL ${kl} (bound ${BOUNDS[dtype].maxKl})`);
      } finally {
        await p.close();
      }
    }
  });
});
