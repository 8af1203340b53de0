import { describe, test, before } from 'node:test';
import assert from 'node:assert/strict';
import { normalizeConfig } from '../model/config.ts';
import { syntheticConfig } from '../model/synthetic.ts';
import { resolveShape } from '../bench/model.ts';
import { hostKvBytesPerStep, parseGpuStageArgs, runGpuStage, weightFloor } from '../bench/gpu-stage.ts';
import { testCacheDir } from './helpers/fixtures.ts';

// bench/gpu-stage.ts (the GPU figures script): its arguments, its floor and CUDA-KV arithmetic against formulas
// written out here, and one real run on the CPU EP at a tiny shape (the WebGPU run on lavapipe takes ~50 s of
// shader compilation: tried by hand, see the README).
before(() => testCacheDir());

const biomedlm = (blocks: number) => normalizeConfig(syntheticConfig(resolveShape({ preset: 'biomedlm', blocks })));

describe('bench/gpu-stage.ts', () => {
  test('defaults: 16 BioMedLM blocks, float16 on webgpu, prompt 128, batches 1 and 8, H200 HBM 4800 GB/s', () => {
    const o = parseGpuStageArgs([]);
    assert.deepEqual({ blocks: o.blocks, device: o.device, dtype: o.dtype, prompt: o.prompt, batches: o.batches, hbmGbps: o.hbmGbps }, { blocks: 16, device: 'webgpu', dtype: 'float16', prompt: 128, batches: [1, 8], hbmGbps: 4800 });
    const t = parseGpuStageArgs(['--blocks', '1', '--device', 'webgpu:0', '--dtype', 'float32', '--batches', '2,4', '--hbm-gbps', '3350', '--warmup', '0']);
    assert.deepEqual({ blocks: t.blocks, device: t.device, dtype: t.dtype, batches: t.batches, hbmGbps: t.hbmGbps, warmup: t.warmup }, { blocks: 1, device: 'webgpu:0', dtype: 'float32', batches: [2, 4], hbmGbps: 3350, warmup: 0 });
  });

  test('bad arguments are typed errors', () => {
    assert.throws(() => parseGpuStageArgs(['--dtype', 'int3']), { code: 'dtype_invalid' });
    assert.throws(() => parseGpuStageArgs(['--dtype', 'float64']), { code: 'dtype_invalid' });
    assert.throws(() => parseGpuStageArgs(['--device', 'gpu']), { code: 'device_invalid' });
    assert.throws(() => parseGpuStageArgs(['--hbm-gbps', '0']), { code: 'bench_shape_invalid' });
    assert.throws(() => parseGpuStageArgs(['--blocks', '0']), { code: 'bench_shape_invalid' });
    assert.throws(() => parseGpuStageArgs(['--batches', '1,x']), { code: 'bench_shape_invalid' });
  });

  test('floor: a 16-block BioMedLM stage with its tied head reads 2.67 GB of float16 per step, 0.555 ms at 4800 GB/s', () => {
    const d = 2560;
    const block = 12 * d * d + 13 * d; // c_attn, attn c_proj, c_fc, mlp c_proj (+ biases), ln_1, ln_2
    const params = 16 * block + (28896 * d + 2 * d) + 2 * d; // blocks, tied head + ln_f, one row of wte and wpe
    const f = weightFloor(biomedlm(16), 'float16', 4800);
    assert.equal(f.bytes, params * 2);
    assert.ok(Math.abs(f.ms - (params * 2) / 4.8e9) < 1e-9);
    assert.ok(Math.abs(f.ms - 0.5553) < 1e-3, `${f.ms}`);
    assert.equal(weightFloor(biomedlm(16), 'float32', 4800).bytes, params * 4);
    // int8/int4: codes plus a float32 scale per 32 weights (and a 4-bit zero point at int4).
    assert.equal(parseGpuStageArgs(['--dtype', 'int4']).dtype, 'int4');
    assert.equal(weightFloor(biomedlm(16), 'int8', 4800).bytes, params * 1.15625);
    assert.equal(weightFloor(biomedlm(16), 'int4', 4800).bytes, params * 0.640625);
  });

  test('host-resident KV (cuda): whole slots up and back, 168 MB per session per step for 16 BioMedLM layers in float16', () => {
    const spec = biomedlm(16);
    assert.equal(hostKvBytesPerStep(spec, 16, 'float16', 1, 1).up, 2 * 16 * 20 * 128 * 1024 * 2);
    assert.equal(hostKvBytesPerStep(spec, 16, 'float16', 1, 1).up, 167_772_160);
    assert.equal(hostKvBytesPerStep(spec, 16, 'float16', 1, 1).back, 2 * 16 * 20 * 128 * 2);
    // Idle rows of an 8-row graph bind one position each.
    assert.equal(hostKvBytesPerStep(spec, 16, 'float16', 3, 8).up, 2 * 16 * 20 * 128 * 2 * (3 * 1024 + 5));
    // Quantized stages keep float32 activations, so their KV is float32.
    assert.equal(hostKvBytesPerStep(spec, 16, 'int4', 1, 1).up, 2 * 16 * 20 * 128 * 1024 * 4);
  });

  test('a real run on the CPU EP at a tiny shape: both batches timed, ratio = step ÷ floor, finite logits, no device bytes', async () => {
    const o = parseGpuStageArgs(['--device', 'cpu', '--dtype', 'float32', '--blocks', '1', '--d-model', '64', '--heads', '2', '--vocab', '100', '--prompt', '8', '--steps', '3', '--warmup', '1']);
    const r = await runGpuStage(o, () => {});
    assert.equal(r.executionProvider, 'cpu');
    assert.deepEqual(r.batches.map((b) => b.batch), [1, 8]);
    for (const b of r.batches) {
      assert.ok(b.msPerStep > 0 && b.msMin <= b.msPerStep);
      assert.ok(Math.abs(b.ratioToFloor - b.msPerStep / r.floor.ms) < 1e-9);
      assert.equal(b.nonFiniteSteps, 0);
      // The CPU EP has no separate device memory: nothing is counted as crossing.
      assert.deepEqual([b.hostToDevice, b.deviceToHost, b.kvBytes], [0, 0, 0]);
    }
    assert.deepEqual(r.batches[1].hostKv, { up: 2 * 1 * 2 * 32 * 4 * 8 * 1024, back: 2 * 1 * 2 * 32 * 4 * 8 });
  });
});
