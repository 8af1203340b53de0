import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { loadModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { generate, type PipelineStep, type Stepper } from '../model/generation.ts';
import { rowLogprobs, type RowLogprobs } from '../model/logprobs.ts';
import { resultFromWire, resultToWire, stepFromWire, stepToWire } from '../proto/step-codec.ts';
import type { TensorData } from '../model/tensor.ts';
import { RemotePipeline } from '../coordinator/remote-pipeline.ts';
import { startWorkerProcess, type LocalWorker } from '../bin/local-cluster.ts';
import { CAUSAL_FIXTURES, expected, fixtureDir, testCacheDir } from './helpers/fixtures.ts';

// Logprobs computed on the last stage (log-softmax, top-N + target only) against the fixtures' full HF logits.

before(() => testCacheDir());
const TOP = 5;
const TOL = 1e-4;

/** The reference: log-softmax of an HF logit row (float64), its target's value and its top N. */
function reference(row: number[], target: number, top: number) {
  const max = Math.max(...row);
  const lse = max + Math.log(row.reduce((s, v) => s + Math.exp(v - max), 0));
  const lp = row.map((v) => v - lse);
  const order = lp.map((v, id) => ({ id, v })).sort((a, b) => b.v - a.v || a.id - b.id);
  return { logprob: lp[target], top: order.slice(0, top), lp };
}

function assertRow(got: RowLogprobs, row: number[], target: number, where: string) {
  const ref = reference(row, target, TOP);
  assert.equal(got.token, target, `${where}: target`);
  assert.ok(Math.abs(got.logprob - ref.logprob) < TOL, `${where}: logprob ${got.logprob} vs ${ref.logprob}`);
  assert.equal(got.top.length, TOP, `${where}: top N`);
  got.top.forEach((t, i) => {
    // Near-ties may swap within the tolerance: the value at each rank and the value of the reported id both match.
    assert.ok(Math.abs(t.logprob - ref.top[i].v) < TOL, `${where}: top[${i}] ${t.logprob} vs ${ref.top[i].v}`);
    assert.ok(Math.abs(t.logprob - ref.lp[t.id]) < TOL, `${where}: top[${i}] id ${t.id}`);
  });
  for (let i = 1; i < got.top.length; i++) assert.ok(got.top[i - 1].logprob >= got.top[i].logprob, `${where}: most likely first`);
}

/** Prompt logprobs (echo) of every forward case, and the first generated token's, against expected.json. */
async function checkFixture(stepper: Stepper, name: string, prefillChunk?: number) {
  for (const c of expected(name).forward) {
    const ids = c.input_ids;
    const scored = await generate(stepper, ids, { maxNewTokens: 0, logprobs: TOP, promptLogprobs: true, prefillChunk });
    assert.equal(scored.outputIds.length, 0);
    assert.equal(scored.promptLogprobs!.length, ids.length);
    assert.equal(scored.promptLogprobs![0], null, 'the first prompt token has no logprob');
    for (let p = 1; p < ids.length; p++) assertRow(scored.promptLogprobs![p]!, c.logits[p - 1], ids[p], `${name} T=${ids.length} prompt[${p}]`);
    // Greedy: the first generated token is the argmax of the last row, scored from that row.
    const gen = await generate(stepper, ids.slice(0, Math.min(ids.length, 8)), { maxNewTokens: 1, logprobs: TOP, promptLogprobs: true, eosTokenId: null, prefillChunk });
    const last = Math.min(ids.length, 8) - 1;
    assertRow(gen.tokenLogprobs![0], c.logits[last], gen.outputIds[0], `${name} generated[0]`);
    assert.equal(gen.tokenLogprobs![0].top[0].id, gen.outputIds[0], 'greedy picks the top-1 token');
  }
}

describe('logprobs in process', () => {
  for (const name of CAUSAL_FIXTURES) {
    test(`${name}: prompt and generated logprobs match log-softmax of the HF logits (K=2, chunked prefill too)`, async () => {
      const p = await LocalPipeline.load(fixtureDir(name), 2);
      try {
        await checkFixture(p, name);
        await checkFixture(p, name, 3);
      } finally {
        await p.close();
      }
    });
  }

  test('decode-step logprobs equal the logprobs of the same positions scored as a prompt', async () => {
    const p = await LocalPipeline.load(fixtureDir('gpt2-tiny'), 3);
    try {
      const prompt = expected('gpt2-tiny').generate![0].input_ids;
      const gen = await generate(p, prompt, { maxNewTokens: 6, logprobs: 3, eosTokenId: null });
      assert.equal(gen.tokenLogprobs!.length, 6);
      assert.equal(gen.promptLogprobs, undefined, 'no prompt logprobs unless asked');
      const scored = await generate(p, [...prompt, ...gen.outputIds], { maxNewTokens: 0, logprobs: 3, promptLogprobs: true });
      gen.tokenLogprobs!.forEach((lp, i) => {
        const again = scored.promptLogprobs![prompt.length + i]!;
        assert.equal(lp.token, gen.outputIds[i]);
        assert.ok(Math.abs(lp.logprob - again.logprob) < TOL, `token ${i}: ${lp.logprob} vs ${again.logprob}`);
        assert.deepEqual(lp.top.map((t) => t.id), again.top.map((t) => t.id));
      });
    } finally {
      await p.close();
    }
  });
});

describe('logprobs on the wire', () => {
  const i64 = (rows: number[][]): TensorData => ({ dtype: 'int64', dims: [rows.length, rows[0].length], data: BigInt64Array.from(rows.flat(), BigInt) });
  const step = (logprobs: PipelineStep['logprobs'], positions?: number[]): PipelineStep => ({
    inputIds: i64([[1, 2, 3]]), positionIds: i64([[0, 1, 2]]), attentionMask: i64([[1, 1, 1]]), logprobs,
    logitPositions: positions && { dtype: 'int64', dims: [positions.length], data: BigInt64Array.from(positions, BigInt) },
  });
  const target = { fingerprint: 'f', first: 0 };

  test('the request and the reply round-trip (optional fields; float32 values)', () => {
    const back = stepFromWire(stepToWire('s', target, step({ top: 2, targets: [[2, 3, -1]] }))).input;
    assert.deepEqual(back.logprobs, { top: 2, targets: [[2, 3, -1]] });
    assert.equal(stepFromWire(stepToWire('s', target, step(undefined))).input.logprobs, undefined, 'absent stays absent');
    const row = Float32Array.from([0.5, -1, 3, 2.25]);
    const rows = [[rowLogprobs(row, 1, 2), rowLogprobs(row, -1, 2)]];
    const wire = resultToWire({ logprobs: rows }, []);
    assert.equal(wire.logits, null, 'no logits travel with logprobs');
    assert.deepEqual(resultFromWire(wire).logprobs, rows);
  });

  test('a malformed request is refused with logprobs_invalid', () => {
    for (const lp of [{ top: 21, targets: [[1, 2, 3]] }, { top: 1, targets: [[1, 2]] }, { top: 1.5, targets: [[1, 2, 3]] }]) {
      assert.throws(() => stepFromWire(stepToWire('s', target, step(lp))), { code: 'logprobs_invalid' });
    }
    assert.throws(() => stepFromWire(stepToWire('s', target, step({ top: 1, targets: [[1, 2, 3]] }, [2]))), { code: 'logprobs_invalid' }, 'one target per logit row');
  });

  test('a last stage that ignores the request (an older worker) fails the request with logprobs_unsupported', async () => {
    const p = await LocalPipeline.load(fixtureDir('gpt2-tiny'), 1);
    try {
      const old: Stepper = { step: async (id, input) => ({ ...(await p.step(id, { ...input, logprobs: undefined })) }), end: (id) => p.end(id) };
      await assert.rejects(generate(old, [1, 2, 3], { maxNewTokens: 2, logprobs: 1 }), { code: 'logprobs_unsupported' });
    } finally {
      await p.close();
    }
  });
});

describe('logprobs over gRPC', () => {
  const dir = fixtureDir('gptj-tiny');
  const spec = loadModelSpec(dir);
  const fingerprint = Checkpoint.open(dir).fingerprint();
  const workers: LocalWorker[] = [];
  after(() => workers.forEach((w) => w.process.kill('SIGKILL')));

  test('K=3 worker processes: the same values as the fixture; bit-identical after a worker is killed and replaced mid-generation', async () => {
    const started = await Promise.all([0, 1, 2, 3].map(() => startWorkerProcess(dir, ['--threads', '1'])));
    workers.push(...started);
    const [a, b, c, spare] = started;
    const recoveries: number[] = [];
    const p = await RemotePipeline.connect([a.address, b.address, c.address], { spec, fingerprint, spares: [spare.address], recoveryTimeoutMs: 20_000, onRecovery: (ms) => recoveries.push(ms) });
    try {
      await checkFixture(p, 'gptj-tiny');
      const prompts = [[3, 9, 27, 81], [5, 25, 125, 100, 7], [11, 22, 33]];
      const run = (onToken?: () => void) => Promise.all(prompts.map((pr) => generate(p, pr, { maxNewTokens: 12, logprobs: 4, promptLogprobs: true, eosTokenId: null, onToken })));
      const clean = await run();
      let produced = 0;
      let fired: Promise<void> | null = null;
      const faulted = await run(() => {
        if (++produced === 10) fired = new Promise<void>((resolve) => (b.process.once('exit', () => resolve()), b.process.kill('SIGKILL')));
      });
      await fired;
      assert.ok(fired, 'the fault fired mid-generation');
      assert.equal(recoveries.length, 1, 'the pipeline re-planned and replayed the sessions');
      assert.deepEqual(faulted.map((r) => r.outputIds), clean.map((r) => r.outputIds));
      faulted.forEach((r, i) => {
        assert.deepEqual(r.promptLogprobs, clean[i].promptLogprobs, `prompt ${i}: prompt logprobs identical`);
        // A session with logprobs is replayed step by step as it ran: bit-identical values, not just close ones.
        assert.deepEqual(r.tokenLogprobs, clean[i].tokenLogprobs, `prompt ${i}: token logprobs identical`);
      });
    } finally {
      p.close();
    }
  });
});
