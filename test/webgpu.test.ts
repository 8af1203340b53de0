import { describe, test, before } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { fillMask, forwardLogits, generate } from '../model/generation.ts';
import type { KvCache, Stage, StepOutput } from '../model/stage.ts';
import type { TensorData } from '../model/tensor.ts';
import { StrataError } from '../model/errors.ts';
import { RemotePipeline } from '../coordinator/remote-pipeline.ts';
import { startLocalCluster, type LocalCluster } from '../bin/local-cluster.ts';
import type { WireTiming } from '../proto/messages.ts';
import { ALL_FIXTURES, ensureXdgRuntimeDir, expected, fixtureDir, maxAbsDiff, testCacheDir } from './helpers/fixtures.ts';
import { argmax, i64 } from './helpers/tensors.ts';
import * as ort from 'onnxruntime-node';
import { prepareStage } from '../model/stage-cache.ts';
import { onnx } from '../model/onnx-builder.ts';
import { webgpuOptions, webgpuProvider } from '../model/executor.ts';
import { devicePlanFeeds } from '../model/slot-run.ts';

// The device path on a machine without a GPU: ORT's WebGPU EP (Dawn) on Mesa's lavapipe (Vulkan on the CPU; CI
// installs it, .ci/lavapipe.sh). lavapipe is slow (shaders compile per shape, seconds per first run), so these use
// the tiny fixtures and few shapes. Bar: the same as the CPU's — logits within 1e-4 of Hugging Face's, greedy ids
// identical (measured on WebGPU: ≤ 1.6e-5).
before(() => {
  testCacheDir();
  ensureXdgRuntimeDir();
});
const TOL = 1e-4;

describe('WebGPU (lavapipe): parity of every family, K = 1 and 2, in process', () => {
  for (const name of ALL_FIXTURES) {
    test(`${name}: logits within ${TOL} of Hugging Face, greedy ids / fill-mask top 5 identical`, async () => {
      const ex = expected(name);
      for (const K of [1, 2]) {
        const p = await LocalPipeline.load(fixtureDir(name), K, { device: 'webgpu' });
        assert.equal(p.stages[0].session.executionProvider, 'webgpu');
        // The fixture's longest forward case (up to 127 tokens: several prompt chunks on WebGPU).
        const f = ex.forward.at(-1)!;
        const diff = maxAbsDiff(await forwardLogits(p, f.input_ids), f.logits);
        assert.ok(diff <= TOL, `K=${K} forward: max |Δlogit| ${diff}`);
        for (const g of ex.generate ?? []) {
          const got = await generate(p, g.input_ids, { maxNewTokens: g.max_new_tokens, eosTokenId: null, prefillChunk: 5 });
          assert.deepEqual(got.outputIds, g.output_ids, `K=${K} greedy ids`);
        }
        for (const m of ex.fill_mask ?? []) {
          const top = await fillMask(p, m.input_ids, m.mask_index, 5);
          assert.deepEqual(top.map((c) => c.id), m.top5_ids, `K=${K} fill-mask top 5`);
        }
        await p.close();
      }
    });
  }
});

describe('WebGPU: batched decode with sessions joining and leaving; no KV crosses the host', () => {
  test('gptj-tiny, 2 stages: every session matches its CPU solo run (ids identical, logits 1e-4); decode steps move 0 bytes of KV', async () => {
    const dir = fixtureDir('gptj-tiny');
    const gpu = await LocalPipeline.load(dir, 2, { device: 'webgpu', maxBatch: 4 });
    const cpu = await LocalPipeline.load(dir, 2);
    const prompts = [expected('gptj-tiny').generate![0].input_ids, [7, 8, 9], [100, 3, 44, 12, 9, 1, 2, 3, 4, 5, 6], [42, 17]];
    const caches = new Map<string, KvCache[]>();
    const ids = new Map<string, number[]>();
    const logits = new Map<string, number[][]>();
    const stages: Stage[] = gpu.stages;
    const kvBytes: number[] = [];
    const record = (sid: string, out: StepOutput) => {
      ids.get(sid)!.push(argmax(out.logits!));
      logits.get(sid)!.push(Array.from(out.logits!.data as Float32Array));
    };
    const prefill = async (sid: string, prompt: number[]) => {
      caches.set(sid, stages.map((s) => s.emptyCache(1)));
      ids.set(sid, [...prompt]);
      logits.set(sid, []);
      let hidden: TensorData | undefined;
      let out: StepOutput | undefined;
      for (const [i, s] of stages.entries()) {
        out = await s.step({ inputIds: i64([prompt]), hidden, positionIds: i64([prompt.map((_, j) => j)]), attentionMask: i64([prompt.map(() => 1)]), logitPositions: { dtype: 'int64', dims: [1], data: BigInt64Array.of(BigInt(prompt.length - 1)) } }, caches.get(sid)![i]);
        hidden = out.hidden;
      }
      record(sid, out!);
    };
    const decode = async (group: string[]) => {
      let hiddens: (TensorData | undefined)[] = group.map(() => undefined);
      let outs: StepOutput[] = [];
      for (const [i, s] of stages.entries()) {
        const inputs = group.map((sid, b) => {
          const seq = ids.get(sid)!;
          return { inputIds: i64([[seq.at(-1)!]]), hidden: hiddens[b], positionIds: i64([[seq.length - 1]]), attentionMask: i64([seq.map(() => 1)]) };
        });
        outs = group.length === 1 ? [await s.step(inputs[0], caches.get(group[0])![i])] : await s.stepBatch(inputs, group.map((sid) => caches.get(sid)![i]));
        kvBytes.push(s.lastTransfer.kvBytes);
        hiddens = outs.map((o) => o.hidden);
      }
      group.forEach((sid, b) => record(sid, outs[b]));
    };
    const live = ['s0', 's1'];
    await prefill('s0', prompts[0]);
    await prefill('s1', prompts[1]);
    for (let step = 0; step < 6; step++) {
      if (step === 1) (await prefill('s2', prompts[2]), live.push('s2')); // joins
      if (step === 3) {
        live.splice(live.indexOf('s0'), 1); // leaves: its slots free
        stages.forEach((s, i) => s.closeCache(caches.get('s0')![i]));
        await prefill('s3', prompts[3]); // joins in the freed slot
        live.push('s3');
      }
      await decode(step % 2 ? [...live].reverse() : live);
    }
    assert.deepEqual(kvBytes.filter((b) => b !== 0), [], 'decode steps moved no KV between host and device');
    for (const [i, sid] of ['s0', 's1', 's2', 's3'].entries()) {
      const got = ids.get(sid)!.slice(prompts[i].length);
      const ref = await generate(cpu, prompts[i], { maxNewTokens: got.length, eosTokenId: null });
      assert.deepEqual(got, ref.outputIds, `${sid} ids`);
      const want = [];
      for (let t = 0; t < got.length; t++) want.push((await forwardLogits(cpu, [...prompts[i], ...got.slice(0, t)])).at(-1)!);
      const diff = maxAbsDiff(logits.get(sid)!, want);
      assert.ok(diff <= TOL, `${sid} logits: ${diff}`);
    }
    await gpu.close();
    await cpu.close();
  });

  test('a device that cannot start is a typed error, not a fallback', async () => {
    await assert.rejects(LocalPipeline.load(fixtureDir('gpt2-tiny'), 1, { device: 'webgpu:3' }), (e: unknown) => e instanceof StrataError && e.code === 'device_unavailable');
    await assert.rejects(LocalPipeline.load(fixtureDir('gpt2-tiny'), 1, { device: 'tpu' }), (e: unknown) => e instanceof StrataError && e.code === 'device_invalid');
  });
});

describe('WebGPU: a run syncs with the host only for its outputs', () => {
  test('the optimized 8-row decoder graph copies nothing back mid-run (no MemcpyToHost): each row\'s plan is a CPU input', async () => {
    // Computed in the graph, the rows' plans ran on the GPU and were copied back for Slice and GQA, which read them on
    // the CPU: 22 GPU→host syncs per run, ~20 ms of every decode step on an H200 (2026-12-04).
    const stage = prepareStage(fixtureDir('gpt2-tiny'), { first: 0, last: 2 }, { device: 'webgpu', rows: 8 });
    const out = join(mkdtempSync(join(tmpdir(), 'strata-opt-')), 'optimized.onnx');
    const session = await ort.InferenceSession.create(stage.path, { executionProviders: [webgpuProvider()], logSeverityLevel: 3, optimizedModelFilePath: out });
    await session.release();
    const ops = onnx.ModelProto.decode(readFileSync(out)).graph!.node!.map((n) => n.opType);
    assert.ok(ops.includes('GroupQueryAttention') && ops.includes('MemcpyFromHost'), 'the optimized graph is the WebGPU one');
    assert.equal(ops.filter((op) => op === 'MemcpyToHost').length, 0);
  });

  test('row plans: active rows take their own tokens after their past; idle rows read row B−1\'s first token', () => {
    const feeds = devicePlanFeeds(4, [{ slot: 3, past: 10 }, { slot: 0, past: 4 }], 2);
    const at = (name: string) => Array.from(feeds[name].data as ArrayLike<number | bigint>, Number);
    assert.deepEqual([0, 1, 2, 3].map((r) => [at(`row_starts_r${r}`), at(`row_ends_r${r}`), at(`row_seqlens_r${r}`), at(`row_total_r${r}`)]), [
      [[0, 0], [1, 2], [11], [12]],
      [[1, 0], [2, 2], [5], [6]],
      [[1, 0], [2, 1], [0], [1]],
      [[1, 0], [2, 1], [0], [1]],
    ]);
    assert.deepEqual(feeds.row_total_r0.dims, []);
  });

  test('EP options: storage buffers cached by exact size by default; STRATA_WEBGPU_OPTIONS overrides; a bad one is a typed error', () => {
    assert.deepEqual(webgpuOptions(undefined), { storageBufferCacheMode: 'simple' });
    assert.deepEqual(webgpuOptions('{"storageBufferCacheMode":"bucket","validationMode":"disabled"}'), { storageBufferCacheMode: 'bucket', validationMode: 'disabled' });
    for (const bad of ['{"cacheMode":"simple"}', '{"validationMode":"none"}', 'simple']) {
      assert.throws(() => webgpuOptions(bad), (e: unknown) => e instanceof StrataError && e.code === 'device_invalid', bad);
    }
  });
});

describe('WebGPU over gRPC: 2 worker processes with --device webgpu', () => {
  for (const name of ALL_FIXTURES) {
    test(`${name}: logits within ${TOL}, greedy ids / fill-mask top 5 identical, concurrent sessions batched`, async () => {
      const dir = fixtureDir(name);
      const cluster: LocalCluster = await startLocalCluster(dir, 2, ['--device', 'webgpu']);
      try {
        const spec = loadModelSpec(dir);
        const timings: WireTiming[] = [];
        const p = await RemotePipeline.connect(cluster.workers.map((w) => w.address), { spec, fingerprint: Checkpoint.open(dir).fingerprint(), onTiming: (_s, t) => timings.push(t) });
        assert.deepEqual(p.describe().stages.map((s) => s.device), ['webgpu', 'webgpu']);
        const ex = expected(name);
        const f = ex.forward.at(-1)!;
        const diff = maxAbsDiff(await forwardLogits(p, f.input_ids), f.logits);
        assert.ok(diff <= TOL, `forward: ${diff}`);
        const got = await Promise.all((ex.generate ?? []).map((g) => generate(p, g.input_ids, { maxNewTokens: g.max_new_tokens, eosTokenId: null })));
        got.forEach((r, i) => assert.deepEqual(r.outputIds, ex.generate![i].output_ids, `session ${i}`));
        if (ex.generate) {
          // Again, in the same (now device-resident) slots: no run of any step moves KV between host and device.
          timings.length = 0;
          await Promise.all(ex.generate.map((g) => generate(p, g.input_ids, { maxNewTokens: 4, eosTokenId: null })));
          assert.ok(timings.length > 0 && timings.every((t) => t.kv_host_bytes === 0), `KV bytes per run: ${timings.map((t) => t.kv_host_bytes)}`);
          assert.ok(timings.every((t) => (t.host_to_device_bytes ?? 0) > 0), 'the stages count what they send to the device');
        }
        for (const m of ex.fill_mask ?? []) assert.deepEqual((await fillMask(p, m.input_ids, m.mask_index, 5)).map((c) => c.id), m.top5_ids, 'fill-mask top 5');
        p.close();
      } finally {
        await cluster.stop();
      }
    });
  }
});
