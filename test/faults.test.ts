import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { loadModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { StrataError } from '../model/errors.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { generate } from '../model/generation.ts';
import { RemotePipeline } from '../coordinator/remote-pipeline.ts';
import { startWorkerProcess, type LocalWorker } from '../bin/local-cluster.ts';
import { fixtureDir, testCacheDir } from './helpers/fixtures.ts';

// Worker loss mid-generation: real processes, SIGKILL, re-plan, KV caches rebuilt by replay, identical greedy output.
before(() => testCacheDir());
const dir = fixtureDir('gptj-tiny');
const spec = loadModelSpec(dir);
const fingerprint = Checkpoint.open(dir).fingerprint();
const prompts = Array.from({ length: 6 }, (_, i) => Array.from({ length: 4 + i }, (_, j) => (i * 53 + j * 7 + 3) % spec.vocab));
const NEW = 24;

let solo: number[][];
before(async () => {
  const local = await LocalPipeline.load(dir, 1);
  solo = [];
  for (const p of prompts) solo.push((await generate(local, p, { maxNewTokens: NEW, eosTokenId: null })).outputIds);
  await local.close();
});

const kill = (w: LocalWorker) => new Promise<void>((resolve) => (w.process.once('exit', () => resolve()), w.process.kill('SIGKILL')));

/** Runs every prompt concurrently and kills `victim` once `afterTokens` tokens have been generated in total. */
async function runWithFault(p: RemotePipeline, fault: () => Promise<void>, afterTokens = 20) {
  let produced = 0;
  let fired: Promise<void> | null = null;
  const results = await Promise.all(
    prompts.map((pr) =>
      generate(p, pr, {
        maxNewTokens: NEW, eosTokenId: null,
        onToken: () => {
          if (++produced === afterTokens) fired = fault();
        },
      }),
    ),
  );
  await fired;
  return results.map((r) => r.outputIds);
}

describe('worker loss mid-generation', () => {
  const workers: LocalWorker[] = [];
  after(() => workers.forEach((w) => w.process.kill('SIGKILL')));

  test('a killed stage is replaced by a spare; every session completes with its fault-free output', async () => {
    const [a, b, spare] = await Promise.all([0, 1, 2].map(() => startWorkerProcess(dir, ['--threads', '1'])));
    workers.push(a, b, spare);
    const recoveries: number[] = [];
    const p = await RemotePipeline.connect([a.address, b.address], { spec, fingerprint, spares: [spare.address], recoveryTimeoutMs: 20_000, onRecovery: (ms) => recoveries.push(ms) });
    const outputs = await runWithFault(p, () => kill(b));
    assert.deepEqual(outputs, solo);
    assert.equal(recoveries.length, 1);
    assert.deepEqual(p.describe().stages.map((s) => s.address), [a.address, spare.address]);
    p.close();
  });

  test('a worker restarted at its address re-registers; without a replacement the pipeline shrinks, then regrows', async () => {
    const [a, b] = await Promise.all([0, 1].map(() => startWorkerProcess(dir, ['--threads', '1'])));
    workers.push(a, b);
    const p = await RemotePipeline.connect([a.address, b.address], { spec, fingerprint, recoveryTimeoutMs: 30_000, replaceGraceMs: 15_000 });
    // Restart: the same address comes back within the grace period and takes its range again.
    const outputs = await runWithFault(p, async () => {
      await kill(b);
      workers.push(await startWorkerProcess(dir, ['--threads', '1', '--listen', b.address]));
    });
    assert.deepEqual(outputs, solo);
    assert.deepEqual(p.describe().stages.map((s) => s.address), [a.address, b.address]);
    // Shrink: nobody replaces the killed stage in time; the remaining worker takes every block.
    const shrinking = await RemotePipeline.connect([a.address, b.address], { spec, fingerprint, recoveryTimeoutMs: 30_000, replaceGraceMs: 500 });
    const outputs2 = await runWithFault(shrinking, () => kill(workers.at(-1)!));
    assert.deepEqual(outputs2, solo);
    assert.deepEqual(shrinking.describe().stages.map((s) => s.blocks), [[0, spec.blocks]]);
    // Regrow: the worker returns and the pipeline goes back to two stages.
    workers.push(await startWorkerProcess(dir, ['--threads', '1', '--listen', b.address]));
    assert.equal(await shrinking.regrow(), true);
    assert.equal(shrinking.describe().stages.length, 2);
    assert.deepEqual(await Promise.all(prompts.map((pr) => generate(shrinking, pr, { maxNewTokens: NEW, eosTokenId: null }).then((r) => r.outputIds))), solo);
    p.close();
    shrinking.close();
  });

  test('a re-plan onto fewer workers that leaves fewer KV slots than live sessions: the sessions without one wait, and every one completes', async () => {
    // One-block stages of 6 slots each (6 sessions run at once); after the shrink a two-block stage holds 3.
    const budget = String((6 * 64 * 1024) / 2 ** 20);
    const [a, b, c] = await Promise.all([0, 1, 2].map(() => startWorkerProcess(dir, ['--threads', '1', '--kv-budget-mb', budget])));
    workers.push(a, b, c);
    const ranges = [0, 1, 2].map((i) => ({ first: i, last: i + 1 }));
    const p = await RemotePipeline.connect([a.address, b.address, c.address], { spec, fingerprint, ranges, recoveryTimeoutMs: 30_000, replaceGraceMs: 500 });
    assert.equal(p.slots.capacity, 6);
    const outputs = await runWithFault(p, () => kill(c));
    assert.deepEqual(outputs, solo);
    assert.equal(p.describe().stages.length, 2);
    assert.deepEqual(p.slots, { capacity: 3, waiting: 0 });
    p.close();
  });

  test('with no worker left, requests fail with a clear reason within the recovery bound (no hang)', async () => {
    const w = await startWorkerProcess(dir, ['--threads', '1']);
    workers.push(w);
    const p = await RemotePipeline.connect([w.address], { spec, fingerprint, recoveryTimeoutMs: 2_000 });
    await kill(w);
    const t0 = Date.now();
    await assert.rejects(generate(p, prompts[0], { maxNewTokens: 4, eosTokenId: null }), (e: StrataError) => e.code === 'pipeline_unavailable' && /replacement worker|spares/.test(e.message));
    assert.ok(Date.now() - t0 < 10_000);
    p.close();
  });
});
