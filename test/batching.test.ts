import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { loadModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { forwardLogits, generate } from '../model/generation.ts';
import type { KvCache, Stage } from '../model/stage.ts';
import type { TensorData } from '../model/tensor.ts';
import { RemotePipeline } from '../coordinator/remote-pipeline.ts';
import { startLocalCluster, type LocalCluster } from '../bin/local-cluster.ts';
import { CAUSAL_FIXTURES, expected, fixtureDir, maxAbsDiff, testCacheDir } from './helpers/fixtures.ts';
import { argmax, i64 } from './helpers/tensors.ts';

before(() => testCacheDir());

/** Sessions driven step by step through a chain of stages, decode steps batched in whatever groups the test picks. */
class Driver {
  caches = new Map<string, KvCache[]>();
  ids = new Map<string, number[]>();
  logits = new Map<string, number[][]>();
  constructor(private stages: Stage[]) {}

  async prefill(sid: string, prompt: number[]) {
    const caches = this.stages.map((s) => s.emptyCache(1));
    this.caches.set(sid, caches);
    let hidden: TensorData | undefined;
    let out;
    for (const [i, s] of this.stages.entries()) {
      out = await s.step({ inputIds: i64([prompt]), hidden, positionIds: i64([prompt.map((_, j) => j)]), attentionMask: i64([prompt.map(() => 1)]), logitPositions: i64([[prompt.length - 1]]).dims && { dtype: 'int64', dims: [1], data: BigInt64Array.of(BigInt(prompt.length - 1)) } }, caches[i]);
      hidden = out.hidden;
    }
    this.ids.set(sid, [...prompt, argmax(out!.logits!)]);
    this.logits.set(sid, [Array.from(out!.logits!.data as Float32Array)]);
  }

  /** One decode step for every session in `group`, as one batched run per stage. */
  async decode(group: string[]) {
    let hiddens: (TensorData | undefined)[] = group.map(() => undefined);
    let outs;
    for (const [i, s] of this.stages.entries()) {
      const inputs = group.map((sid, b) => {
        const ids = this.ids.get(sid)!;
        return { inputIds: i64([[ids.at(-1)!]]), hidden: hiddens[b], positionIds: i64([[ids.length - 1]]), attentionMask: i64([ids.map(() => 1)]) };
      });
      // A lone session takes the single-step path, as the stage thread does.
      outs = group.length === 1 ? [await s.step(inputs[0], this.caches.get(group[0])![i])] : await s.stepBatch(inputs, group.map((sid) => this.caches.get(sid)![i]));
      hiddens = outs.map((o) => o.hidden);
    }
    group.forEach((sid, b) => {
      this.ids.get(sid)!.push(argmax(outs![b].logits!));
      this.logits.get(sid)!.push(Array.from(outs![b].logits!.data as Float32Array));
    });
  }
}

describe('continuous batching at a stage (decode steps of many sessions in one ORT run)', () => {
  for (const name of CAUSAL_FIXTURES) for (const fused of [false, true]) {
    test(`${name}${fused ? ' (fused kernels)' : ''}: sessions joining and leaving mid-stream match their solo runs (ids identical, logits 1e-4)`, async () => {
      const dir = fixtureDir(name);
      const p = await LocalPipeline.load(dir, 2, { fused });
      const prompts = [...expected(name).generate!.map((g) => g.input_ids), [7, 8, 9], [100, 3, 44, 12, 9, 1, 2, 3, 4, 5, 6]];
      const steps = 10;
      // Solo references, and their per-step logits.
      const solo = await Promise.all(prompts.map((pr) => generate(p, pr, { maxNewTokens: steps + 2, eosTokenId: null })));
      const d = new Driver(p.stages);
      const live = ['s0', 's1'];
      await d.prefill('s0', prompts[0]);
      await d.prefill('s1', prompts[1]);
      for (let step = 0; step < steps; step++) {
        if (step === 2) (await d.prefill('s2', prompts[2]), live.push('s2')); // joins
        if (step === 4) (await d.prefill('s3', prompts[3]), live.push('s3'));
        const group = step % 3 === 0 ? [...live].reverse() : live; // order changes force re-packing
        await d.decode(group);
        if (step === 5) await d.decode(['s0']); // one session alone between batches: its cache leaves the shared tensors
        if (step === 6) live.splice(live.indexOf('s1'), 1); // leaves early
      }
      for (const [i, sid] of ['s0', 's1', 's2', 's3'].entries()) {
        const got = d.ids.get(sid)!.slice(prompts[i].length);
        assert.deepEqual(got, solo[i].outputIds.slice(0, got.length), `${sid} ids`);
        const want = [];
        for (let t = 0; t < got.length; t++) {
          const seq = [...prompts[i], ...got.slice(0, t)];
          want.push((await forwardLogits(p, seq)).at(-1)!);
        }
        assert.ok(maxAbsDiff(d.logits.get(sid)!, want) <= 1e-4, `${sid} logits`);
      }
      expected(name).generate!.forEach((g, i) => {
        assert.deepEqual(d.ids.get(`s${i}`)!.slice(g.input_ids.length, g.input_ids.length + 8), g.output_ids.slice(0, 8));
      });
      await p.close();
    });
  }
});

describe('a session\'s logits do not depend on its batch (graph version 15: the batch\'s new tokens attended once)', () => {
  // float16: the host-slot graph CUDA runs (its casts around the scores and probabilities), stepped on the CPU here;
  // int8/int4: MLAS's quantized kernels at 1 row and at 8 (GPT-2-small was bit-identical too, a scratch run).
  for (const name of CAUSAL_FIXTURES) for (const dtype of ['float32', 'float16', 'int8', 'int4'] as const) {
    test(`${name} ${dtype}: alone and in a batch of 3 (5 idle graph rows, slots of different capacities), bit for bit`, async () => {
      const dir = fixtureDir(name);
      const spec = loadModelSpec(dir);
      const p = await LocalPipeline.load(dir, 1, { dtype });
      // Lengths on both sides of a 64-position slot capacity where the context allows it, and a short one.
      const half = spec.maxPositions / 2;
      const prompts = [half - 5, half + 2, 7].map((n, i) => Array.from({ length: n }, (_, j) => (j * 31 + i * 7 + 3) % spec.vocab));
      const alone = new Driver(p.stages), together = new Driver(p.stages);
      for (const [i, pr] of prompts.entries()) (await alone.prefill(`s${i}`, pr), await together.prefill(`s${i}`, pr));
      for (let step = 0; step < 5; step++) {
        for (const sid of ['s0', 's1', 's2']) await alone.decode([sid]);
        await together.decode(['s0', 's1', 's2']);
      }
      for (const sid of ['s0', 's1', 's2']) assert.deepEqual(together.logits.get(sid), alone.logits.get(sid), `${sid}: every step's logits`);
      await p.close();
    });
  }
});

describe('greedy steps fetch only the graph\'s argmax (Stage.step / stepBatch with fetch \'greedy\')', () => {
  for (const name of CAUSAL_FIXTURES) {
    test(`${name}: the tokens are the argmax of the logits a full fetch returns, alone and batched; no logits leave the run`, async () => {
      const p = await LocalPipeline.load(fixtureDir(name), 1);
      const stage = p.stages[0];
      const prompts = [[5, 6, 7, 8], [100, 3, 44], [9, 1, 2, 3, 4, 5]];
      const [full, greedy] = [prompts.map(() => stage.emptyCache(1)), prompts.map(() => stage.emptyCache(1))];
      const seqs = prompts.map((pr) => [...pr]);
      const prefill = (pr: number[]) => ({ inputIds: i64([pr]), positionIds: i64([pr.map((_, j) => j)]), attentionMask: i64([pr.map(() => 1)]), logitPositions: { dtype: 'int64' as const, dims: [1], data: BigInt64Array.of(BigInt(pr.length - 1)) } });
      for (const [b, pr] of prompts.entries()) {
        const a = await stage.step(prefill(pr), full[b]);
        const g = await stage.step(prefill(pr), greedy[b], 'greedy');
        assert.equal(g.logits, undefined, 'no logits fetched');
        assert.equal(g.lastHidden, undefined, 'no final hidden states fetched');
        assert.deepEqual(g.nextTokens!.dims, [1, 1]);
        assert.equal(Number((g.nextTokens!.data as BigInt64Array)[0]), argmax(a.logits!), `${name} prefill ${b}`);
        seqs[b].push(argmax(a.logits!));
      }
      for (let step = 0; step < 4; step++) {
        const inputs = seqs.map((seq) => ({ inputIds: i64([[seq.at(-1)!]]), positionIds: i64([[seq.length - 1]]), attentionMask: i64([seq.map(() => 1)]) }));
        const a = await stage.stepBatch(inputs, full);
        const g = await stage.stepBatch(inputs, greedy, 'greedy');
        a.forEach((row, b) => {
          assert.equal(g[b].logits, undefined);
          assert.equal(Number((g[b].nextTokens!.data as BigInt64Array)[0]), argmax(row.logits!), `${name} step ${step} row ${b}`);
          seqs[b].push(argmax(row.logits!));
        });
      }
      await p.close();
    });
  }
});

describe('a one-row stage graph (--max-batch 1), which attends its one row as it is', () => {
  for (const name of CAUSAL_FIXTURES) {
    test(`${name}, 2 stages: HF's greedy ids, and every step's logits match the 8-row graph's full recompute (1e-4)`, async () => {
      const dir = fixtureDir(name);
      const one = await LocalPipeline.load(dir, 2, { maxBatch: 1 });
      const rows8 = await LocalPipeline.load(dir, 2);
      for (const g of expected(name).generate!) {
        const d = new Driver(one.stages);
        await d.prefill('s', g.input_ids);
        for (let t = 1; t < g.output_ids.length; t++) await d.decode(['s']);
        const got = d.ids.get('s')!.slice(g.input_ids.length);
        assert.deepEqual(got, g.output_ids);
        const want = [];
        for (let t = 0; t < got.length; t++) want.push((await forwardLogits(rows8, [...g.input_ids, ...got.slice(0, t)])).at(-1)!);
        assert.ok(maxAbsDiff(d.logits.get('s')!, want) <= 1e-4, 'logits');
      }
      await one.close();
      await rows8.close();
    });
  }
});

describe('8 concurrent sessions through one 3-stage gRPC pipeline', () => {
  let cluster: LocalCluster;
  const dir = fixtureDir('gptj-tiny');
  before(async () => {
    cluster = await startLocalCluster(dir, 3);
  });
  after(async () => cluster?.stop());

  test('each equals its solo run (no KV crosstalk), with decode steps batched across sessions', async () => {
    const spec = loadModelSpec(dir);
    const batches: number[] = [];
    const p = await RemotePipeline.connect(cluster.workers.map((w) => w.address), {
      spec, fingerprint: Checkpoint.open(dir).fingerprint(), onTiming: (_stage, t) => batches.push(t.batch),
    });
    const prompts = Array.from({ length: 8 }, (_, i) => Array.from({ length: 3 + i * 2 }, (_, j) => (i * 37 + j * 11 + 5) % spec.vocab));
    const local = await LocalPipeline.load(dir, 1);
    const solo: number[][] = [];
    for (const pr of prompts) solo.push((await generate(local, pr, { maxNewTokens: 12, eosTokenId: null })).outputIds);
    const together = await Promise.all(prompts.map((pr) => generate(p, pr, { maxNewTokens: 12, eosTokenId: null })));
    together.forEach((r, i) => assert.deepEqual(r.outputIds, solo[i], `session ${i}`));
    assert.ok(Math.max(...batches) > 1, `decode steps were batched (largest batch ${Math.max(...batches)})`);
    // The coordinator splits the 8 sessions into one group per stage, so the 3 stages work on different groups.
    assert.ok(Math.max(...batches) <= Math.ceil(8 / 3), `groups of at most ceil(8 / 3) sessions (largest batch ${Math.max(...batches)})`);
    assert.ok(p.directReplies > 0, 'decode results came straight from the last stage');
    p.close();
    await local.close();
  });
});
