import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { loadModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { chainedSteps, generate, type GenerateOptions, type Stepper } from '../model/generation.ts';
import { decodeStepsOption, DEFAULT_DECODE_STEPS, RemotePipeline } from '../coordinator/remote-pipeline.ts';
import { PendingPipeline } from '../coordinator/load-board.ts';
import { startLocalCluster, startWorkerProcess, type LocalWorker } from '../bin/local-cluster.ts';
import { chainMsOption } from '../bin/worker.ts';
import { stepFromWire, stepToWire } from '../proto/step-codec.ts';
import type { WireTiming } from '../proto/messages.ts';
import { CAUSAL_FIXTURES, expected, fixtureDir, testCacheDir } from './helpers/fixtures.ts';
import { StrataError } from '../model/errors.ts';
import { observeStageForward, stageForward, stageSteps } from '../coordinator/metrics.ts';

// A one-stage pipeline's worker chains several decode steps per request (PipelineStep.steps): each next step feeds the
// token the last one chose. The answers must be exactly those of one step per request, in process or not.
before(() => testCacheDir());
const code = (c: string) => (e: unknown) => e instanceof StrataError && e.code === c;

const connect = (dir: string, addresses: string[], decodeSteps: number, timings: WireTiming[] = []) =>
  RemotePipeline.connect(addresses, { spec: loadModelSpec(dir), fingerprint: Checkpoint.open(dir).fingerprint(), decodeSteps, onTiming: (_s, t) => timings.push(t) });

/** Runs `fn` against k fresh worker processes of a fixture, stopping them afterwards. */
async function withWorkers(name: string, k: number, fn: (dir: string, addresses: string[]) => Promise<void>): Promise<void> {
  const dir = fixtureDir(name);
  const cluster = await startLocalCluster(dir, k);
  try {
    await fn(dir, cluster.workers.map((w) => w.address));
  } finally {
    await cluster.stop();
  }
}

/** gpt2-tiny's first fixture generation through `stepper`: the greedy ids HF's code produced. */
async function assertFixtureGreedy(stepper: Stepper): Promise<void> {
  const g = expected('gpt2-tiny').generate![0];
  assert.deepEqual((await generate(stepper, g.input_ids, { maxNewTokens: g.max_new_tokens, eosTokenId: null })).outputIds, g.output_ids);
}

describe('chained decode steps on a one-stage worker over gRPC', () => {
  for (const name of CAUSAL_FIXTURES) {
    test(`${name}: greedy ids identical at 3 and 4 steps per request, alone and concurrent`, () =>
      withWorkers(name, 1, async (dir, addresses) => {
        const ex = expected(name).generate ?? [];
        assert.ok(ex.length > 0);
        for (const n of [3, 4]) {
          const timings: WireTiming[] = [];
          const p = await connect(dir, addresses, n, timings);
          assert.equal(p.decodeSteps, n);
          for (const g of ex) assert.deepEqual((await generate(p, g.input_ids, { maxNewTokens: g.max_new_tokens, eosTokenId: null })).outputIds, g.output_ids, `${n} steps`);
          const got = await Promise.all(ex.map((g) => generate(p, g.input_ids, { maxNewTokens: g.max_new_tokens, eosTokenId: null })));
          got.forEach((r, i) => assert.deepEqual(r.outputIds, ex[i].output_ids, `${n} steps, concurrent session ${i}`));
          // Every decode step ran, in requests of up to n steps each.
          const decodeSteps = 2 * ex.reduce((s, g) => s + g.max_new_tokens - 1, 0);
          const chained = timings.filter((t) => (t.steps || 1) > 1);
          assert.ok(chained.length > 0 && timings.every((t) => (t.steps || 1) <= n), `requests of ${timings.map((t) => t.steps).join(' ')} steps`);
          assert.ok(timings.reduce((s, t) => s + (t.steps || 1), 0) >= decodeSteps);
          p.close();
        }
      }),
    );
  }

  test('gpt2-tiny: sampled with a repetition penalty, logprobs, a stop token inside a chain: as in process', async () => {
    const ref = await LocalPipeline.load(fixtureDir('gpt2-tiny'), 1);
    await withWorkers('gpt2-tiny', 1, async (dir, addresses) => {
      const p = await connect(dir, addresses, 5);
      const prompt = [3, 1, 4, 1, 5, 9, 2, 6];
      const sampled: GenerateOptions = { maxNewTokens: 13, eosTokenId: null, sampling: { temperature: 0.8, topK: 30, repetitionPenalty: 1.2, seed: 3 }, logprobs: 2, promptLogprobs: true };
      const want = await generate(ref, prompt, sampled);
      const got = await generate(p, prompt, sampled);
      assert.deepEqual(got.outputIds, want.outputIds);
      assert.equal(got.tokenLogprobs!.length, 13);
      got.tokenLogprobs!.forEach((lp, i) => {
        assert.deepEqual(lp.top.map((t) => t.id), want.tokenLogprobs![i].top.map((t) => t.id), `token ${i}`);
        assert.ok(Math.abs(lp.logprob - want.tokenLogprobs![i].logprob) < 1e-5, `token ${i} logprob`);
      });
      // The token greedy decoding picks 7th becomes the stop token: the chain that reaches it ends there.
      const greedy = (await generate(ref, prompt, { maxNewTokens: 12, eosTokenId: null })).outputIds;
      const eos = greedy[6];
      const stopAt = greedy.indexOf(eos);
      const stopped = await generate(p, prompt, { maxNewTokens: 12, eosTokenId: eos });
      assert.deepEqual(stopped.outputIds, greedy.slice(0, stopAt + 1));
      assert.equal(stopped.finishReason, 'stop');
      // A client that stops reading mid-chain (a stop string) gets no token past it.
      const seen: number[] = [];
      const cut = await generate(p, prompt, { maxNewTokens: 12, eosTokenId: null, onToken: (id, i) => (seen.push(id), i < 2) });
      assert.deepEqual(cut.outputIds, greedy.slice(0, 3));
      assert.deepEqual(seen, greedy.slice(0, 3));
      p.close();
    }).finally(() => ref.close());
  });

  test('a worker that runs one step per request (one from before chains) still gives every token', () =>
    withWorkers('gpt2-tiny', 1, async (dir, addresses) => {
      const p = await connect(dir, addresses, 4);
      // What an older worker does: it ignores `steps` and answers one token.
      await assertFixtureGreedy({ decodeSteps: 4, step: (id, input) => p.step(id, { ...input, steps: undefined, stopTokens: undefined }), end: (id) => p.end(id) });
      p.close();
    }));

  test('the coordinator service\'s pipeline (PendingPipeline) passes the chain on to generate()', () =>
    withWorkers('gpt2-tiny', 1, async (dir, addresses) => {
      const timings: WireTiming[] = [];
      const pending = new PendingPipeline<RemotePipeline>();
      pending.set(await connect(dir, addresses, 4, timings));
      assert.equal(pending.decodeSteps, 4);
      await assertFixtureGreedy(pending);
      assert.ok(timings.some((t) => (t.steps || 1) > 1));
      pending.pipeline!.close();
    }));

  test('a two-stage pipeline takes one step per request', () =>
    withWorkers('gpt2-tiny', 2, async (dir, addresses) => {
      const timings: WireTiming[] = [];
      const p = await connect(dir, addresses, 4, timings);
      assert.equal(p.decodeSteps, 1);
      await assertFixtureGreedy(p);
      assert.ok(timings.every((t) => (t.steps || 1) === 1));
      p.close();
    }));
});

describe('a chained session survives the loss of its worker', () => {
  const workers: LocalWorker[] = [];
  after(() => workers.forEach((w) => w.process.kill('SIGKILL')));

  test('gptj-tiny: the one worker killed mid-generation, a spare takes over, every output as without the fault', async () => {
    const dir = fixtureDir('gptj-tiny');
    const spec = loadModelSpec(dir);
    const prompts = Array.from({ length: 4 }, (_, i) => Array.from({ length: 4 + i }, (_, j) => (i * 53 + j * 7 + 3) % spec.vocab));
    const ref = await LocalPipeline.load(dir, 1);
    const want: number[][] = [];
    for (const pr of prompts) want.push((await generate(ref, pr, { maxNewTokens: 20, eosTokenId: null })).outputIds);
    await ref.close();
    const [a, spare] = await Promise.all([0, 1].map(() => startWorkerProcess(dir, ['--threads', '1'])));
    workers.push(a, spare);
    const p = await RemotePipeline.connect([a.address], { spec, fingerprint: Checkpoint.open(dir).fingerprint(), spares: [spare.address], decodeSteps: 4, recoveryTimeoutMs: 20_000 });
    let produced = 0;
    let killed: Promise<void> | null = null;
    const outputs = await Promise.all(
      prompts.map((pr) =>
        generate(p, pr, {
          maxNewTokens: 20, eosTokenId: null,
          onToken: () => {
            if (++produced === 30) killed = new Promise<void>((resolve) => (a.process.once('exit', () => resolve()), a.process.kill('SIGKILL')));
          },
        }).then((r) => r.outputIds),
      ),
    );
    await killed;
    assert.ok(killed, 'the worker was killed mid-generation');
    assert.deepEqual(outputs, want);
    assert.equal(p.recoveries, 1);
    p.close();
  });
});

describe('a chain\'s time budget (--chain-ms)', () => {
  test('a worker whose chains may run 0 ms answers every request with one token, and the ids stay HF\'s', async () => {
    const dir = fixtureDir('gpt2-tiny');
    const cluster = await startLocalCluster(dir, 1, ['--chain-ms', '0']);
    try {
      const timings: WireTiming[] = [];
      const p = await connect(dir, cluster.workers.map((w) => w.address), 8, timings);
      await assertFixtureGreedy(p);
      assert.ok(timings.length > 2 && timings.every((t) => (t.steps || 1) === 1), `requests of ${timings.map((t) => t.steps || 1).join(' ')} steps`);
      p.close();
    } finally {
      await cluster.stop();
    }
  });

  test('a bad --chain-ms is a typed error', () => {
    assert.equal(chainMsOption('50'), 50);
    assert.equal(chainMsOption('0'), 0);
    for (const bad of ['-1', 'soon', '']) assert.throws(() => chainMsOption(bad), code('flag_invalid'));
  });
});

describe('chained steps: the pieces', () => {
  test('chainedSteps: the steps a chain ran after its first, as generate() would have sent them', () => {
    const first = stepFromWire(stepToWire('s', { fingerprint: '', first: 0 }, {
      inputIds: { dtype: 'int64', dims: [1, 1], data: BigInt64Array.of(7n) }, positionIds: { dtype: 'int64', dims: [1, 1], data: BigInt64Array.of(4n) },
      attentionMask: { dtype: 'int64', dims: [1, 5], data: new BigInt64Array(5).fill(1n) },
      select: { sampling: { seed: 1 }, history: [], step: 1 }, steps: 4, stopTokens: [0], finalRequest: true,
    })).input;
    assert.equal(first.steps, 4);
    assert.deepEqual(first.stopTokens, [0]);
    assert.equal(first.finalRequest, true);
    const rest = chainedSteps(first, [11, 12, 13]);
    assert.deepEqual(rest.map((s) => [Number(s.inputIds!.data[0]), Number(s.positionIds.data[0]), s.attentionMask.dims[1], s.select!.step]), [[11, 5, 6, 2], [12, 6, 7, 3]]);
    assert.deepEqual(chainedSteps(first, [11]), []);
  });

  test('metrics count a chain\'s steps, each once, and the one answered from a run ahead', async () => {
    const count = async (stage: string) => (await stageForward.get()).values.find((v) => v.metricName === 'strata_stage_forward_seconds_count' && v.labels.stage === stage)?.value ?? 0;
    const steps = async (stage: string, ahead: string) => (await stageSteps.get()).values.find((v) => v.labels.stage === stage && v.labels.ahead === ahead)?.value ?? 0;
    observeStageForward('chain-test', 0.04, 4, true);
    observeStageForward('chain-test', 0.01);
    assert.equal(await count('chain-test'), 5);
    assert.equal(await steps('chain-test', 'true'), 1);
    assert.equal(await steps('chain-test', 'false'), 4);
  });

  test('bad values get typed errors', () => {
    const step = stepToWire('s', { fingerprint: '', first: 0 }, {
      inputIds: { dtype: 'int64', dims: [1, 1], data: BigInt64Array.of(7n) }, positionIds: { dtype: 'int64', dims: [1, 1], data: BigInt64Array.of(4n) },
      attentionMask: { dtype: 'int64', dims: [1, 5], data: new BigInt64Array(5).fill(1n) },
    });
    assert.throws(() => stepFromWire({ ...step, steps: 65 }), code('steps_invalid'));
    assert.throws(() => stepFromWire({ ...step, steps: 2, stop_tokens: Array.from({ length: 17 }, (_, i) => i) }), code('steps_invalid'));
    assert.equal(decodeStepsOption(undefined), DEFAULT_DECODE_STEPS);
    assert.equal(DEFAULT_DECODE_STEPS, 16);
    assert.equal(decodeStepsOption('8'), 8);
    for (const bad of ['0', '65', '2.5', 'four']) assert.throws(() => decodeStepsOption(bad), code('flag_invalid'));
  });
});
