import { describe, test, before } from 'node:test';
import assert from 'node:assert/strict';
import { loadModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { generate, nextDecodeStep, type GenerateOptions, type PipelineStep, type Stepper } from '../model/generation.ts';
import { RemotePipeline } from '../coordinator/remote-pipeline.ts';
import { startLocalCluster } from '../bin/local-cluster.ts';
import { stepFromWire, stepToWire } from '../proto/step-codec.ts';
import { sameStep } from '../worker/run-ahead.ts';
import type { WireTiming } from '../proto/messages.ts';
import { StageClient } from '../transport/grpc/client.ts';
import { CAUSAL_FIXTURES, expected, fixtureDir, testCacheDir } from './helpers/fixtures.ts';
import { i64 } from './helpers/tensors.ts';

// A one-stage pipeline's worker runs each session's next decode step before it is asked (worker/run-ahead.ts). It
// must predict exactly what generate() sends, and a wrong prediction must cost time only, never a different answer.
before(() => testCacheDir());

/** Every step a generate() sends, as the worker decodes it off the wire, with the tokens it chose. */
async function recordSteps(p: Stepper, prompt: number[], opts: GenerateOptions): Promise<{ input: PipelineStep; tokens?: number[] }[]> {
  const seen: { input: PipelineStep; tokens?: number[] }[] = [];
  const recorder: Stepper = {
    step: async (id, input) => {
      const r = await p.step(id, input);
      seen.push({ input: stepFromWire(stepToWire(id, { fingerprint: '', first: 0 }, input)).input, tokens: r.tokens });
      return r;
    },
    end: (id) => p.end(id),
  };
  await generate(recorder, prompt, opts);
  return seen;
}

/** Replaces the token fed at the given decode steps (teacher forcing): the stage's prediction is then wrong there. */
function forcing(inner: Stepper, forced: Map<number, number>): Stepper {
  return {
    step: (id, input) => {
      const f = input.select && input.positionIds.dims[1] === 1 ? forced.get(input.select.step) : undefined;
      return inner.step(id, f === undefined ? input : { ...input, inputIds: i64([[f]]) });
    },
    end: (id) => inner.end(id),
  };
}

describe('run-ahead: the predicted step is the one generate() sends next', () => {
  const cases: [string, GenerateOptions][] = [
    ['greedy', { maxNewTokens: 6, eosTokenId: null }],
    ['sampled, repetition penalty, seeded', { maxNewTokens: 6, eosTokenId: null, sampling: { temperature: 0.9, topK: 20, topP: 0.9, repetitionPenalty: 1.3, seed: 11 } }],
    ['logprobs and prompt logprobs, chunked prefill', { maxNewTokens: 6, eosTokenId: null, logprobs: 3, promptLogprobs: true, prefillChunk: 4 }],
  ];
  for (const [label, opts] of cases) {
    test(label, async () => {
      const p = await LocalPipeline.load(fixtureDir('gpt2-tiny'), 1);
      const steps = await recordSteps(p, [5, 9, 2, 7, 3, 1, 4, 8, 6, 10], opts);
      await p.close();
      const decodes = steps.filter((s) => s.input.select);
      assert.equal(decodes.length, 6);
      for (let i = 0; i + 1 < decodes.length; i++) {
        const next = nextDecodeStep(decodes[i].input, decodes[i].tokens![0], 1024);
        assert.ok(next && sameStep(next, decodes[i + 1].input), `step ${i + 1} predicted`);
        assert.ok(!sameStep(nextDecodeStep(decodes[i].input, decodes[i].tokens![0] + 1, 1024)!, decodes[i + 1].input), 'another token is another step');
      }
      // Past the model's context there is nothing to predict; a prefill without select chooses no token.
      assert.equal(nextDecodeStep(decodes[0].input, 1, decodes[0].input.attentionMask.dims[1]), null);
      assert.equal(nextDecodeStep({ ...decodes[0].input, select: undefined }, 1, 1024), null);
    });
  }
});

describe('run-ahead on a one-stage worker over gRPC', () => {
  for (const name of CAUSAL_FIXTURES) {
    test(`${name}: greedy ids identical with concurrent sessions; most decode steps answered from runs ahead`, async () => {
      const dir = fixtureDir(name);
      const cluster = await startLocalCluster(dir, 1);
      try {
        const timings: WireTiming[] = [];
        const p = await RemotePipeline.connect(cluster.workers.map((w) => w.address), { spec: loadModelSpec(dir), fingerprint: Checkpoint.open(dir).fingerprint(), onTiming: (_s, t) => timings.push(t), decodeSteps: 1 });
        const ex = expected(name).generate ?? [];
        assert.ok(ex.length > 0);
        // One at a time (run-ahead at batch 1), then all together (sessions of different lengths join and leave a batch).
        for (const g of ex) assert.deepEqual((await generate(p, g.input_ids, { maxNewTokens: g.max_new_tokens, eosTokenId: null })).outputIds, g.output_ids);
        const solo = timings.filter((t) => t.ahead).length;
        const decodeSteps = ex.reduce((n, g) => n + g.max_new_tokens - 1, 0);
        assert.ok(solo >= decodeSteps / 2, `${solo} of ${decodeSteps} decode steps answered from runs ahead`);
        const got = await Promise.all(ex.map((g) => generate(p, g.input_ids, { maxNewTokens: g.max_new_tokens, eosTokenId: null })));
        got.forEach((r, i) => assert.deepEqual(r.outputIds, ex[i].output_ids, `concurrent session ${i}`));
        p.close();
      } finally {
        await cluster.stop();
      }
    });
  }

  test('gpt2-tiny: no step is run ahead past a generation\'s end (its last request, a stop token); without the hints one is, per session', async () => {
    const dir = fixtureDir('gpt2-tiny');
    const cluster = await startLocalCluster(dir, 1);
    try {
      const p = await RemotePipeline.connect(cluster.workers.map((w) => w.address), { spec: loadModelSpec(dir), fingerprint: Checkpoint.open(dir).fingerprint(), decodeSteps: 1 });
      const client = new StageClient(cluster.workers[0].address);
      const counts = async () => (await client.info()).run_ahead!;
      const [g] = expected('gpt2-tiny').generate!;
      // By length, alone and with sessions together; then stopped by a stop token (the 3rd token chosen).
      assert.deepEqual((await generate(p, g.input_ids, { maxNewTokens: g.max_new_tokens, eosTokenId: null })).outputIds, g.output_ids);
      await Promise.all([1, 2, 3].map(() => generate(p, g.input_ids, { maxNewTokens: g.max_new_tokens, eosTokenId: null })));
      const stop = g.output_ids[2];
      assert.deepEqual((await generate(p, g.input_ids, { maxNewTokens: g.max_new_tokens, eosTokenId: stop })).outputIds, g.output_ids.slice(0, g.output_ids.indexOf(stop) + 1));
      const hinted = await counts();
      assert.ok(hinted.claimed > 0, `${JSON.stringify(hinted)}: steps were run ahead`);
      assert.equal(hinted.unclaimed, 0, `${JSON.stringify(hinted)}: none thrown away`);
      // A coordinator that sends no hints (one from before them): each session's last answer is run ahead for nothing.
      const unhinted: Stepper = { step: (id, input) => p.step(id, { ...input, finalRequest: undefined, stopTokens: undefined }), end: (id) => p.end(id) };
      assert.deepEqual((await generate(unhinted, g.input_ids, { maxNewTokens: g.max_new_tokens, eosTokenId: null })).outputIds, g.output_ids);
      const after = await counts();
      assert.equal(after.unclaimed, 1, `${JSON.stringify(after)}: the step after the last was run and thrown away`);
      client.close();
      p.close();
    } finally {
      await cluster.stop();
    }
  });

  test('gpt2-tiny: sampled runs and runs whose next token is not the chosen one (teacher forcing) match the in-process reference', async () => {
    const dir = fixtureDir('gpt2-tiny');
    const ref = await LocalPipeline.load(dir, 1);
    const cluster = await startLocalCluster(dir, 1);
    try {
      const timings: WireTiming[] = [];
      const p = await RemotePipeline.connect(cluster.workers.map((w) => w.address), { spec: loadModelSpec(dir), fingerprint: Checkpoint.open(dir).fingerprint(), onTiming: (_s, t) => timings.push(t), decodeSteps: 1 });
      const prompt = [3, 1, 4, 1, 5, 9, 2, 6];
      const sampled: GenerateOptions = { maxNewTokens: 12, eosTokenId: null, sampling: { temperature: 0.8, topK: 30, repetitionPenalty: 1.2, seed: 3 }, logprobs: 2 };
      const want = await generate(ref, prompt, sampled);
      const got = await generate(p, prompt, sampled);
      assert.deepEqual(got.outputIds, want.outputIds);
      assert.deepEqual(got.tokenLogprobs!.map((l) => l.top.map((t) => t.id)), want.tokenLogprobs!.map((l) => l.top.map((t) => t.id)));
      assert.ok(timings.some((t) => t.ahead), 'sampled steps are run ahead too');
      // Steps 3, 4 and 8 feed another token than the one chosen: the runs ahead for them are undone (the cache
      // rewound one position) and the steps run again; the steps after them are run ahead again.
      const forced = new Map([[3, 17], [4, 99], [8, 42]]);
      const greedy = { maxNewTokens: 12, eosTokenId: null };
      timings.length = 0;
      const forcedGot = await generate(forcing(p, forced), prompt, greedy);
      assert.deepEqual(forcedGot.outputIds, (await generate(forcing(ref, forced), prompt, greedy)).outputIds);
      const ahead = timings.filter((t) => t.ahead).length;
      assert.ok(ahead > 0 && ahead <= 11 - forced.size, `${ahead} steps answered from runs ahead`);
      p.close();
    } finally {
      await cluster.stop();
      await ref.close();
    }
  });
});
