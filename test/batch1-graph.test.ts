import { describe, test, before } from 'node:test';
import assert from 'node:assert/strict';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { generate } from '../model/generation.ts';
import { openBatch1Graph } from '../model/batch1-graph.ts';
import { BATCH1_GRAPH_MAX_BYTES, batch1GraphUsed } from '../model/memory.ts';
import { loadModelSpec } from '../model/config.ts';
import { prepareStage } from '../model/stage-cache.ts';
import type { KvCache, Stage, StepInput } from '../model/stage.ts';
import type { WeightDType } from '../model/stage-graph.ts';
import { CAUSAL_FIXTURES, fixtureDir, testCacheDir } from './helpers/fixtures.ts';

before(() => testCacheDir());

const i64 = (rows: number[][]) => ({ dtype: 'int64' as const, dims: [rows.length, rows[0].length], data: BigInt64Array.from(rows.flat(), BigInt) });
const prefill = (ids: number[]): StepInput => ({ inputIds: i64([ids]), positionIds: i64([ids.map((_, i) => i)]), attentionMask: i64([ids.map(() => 1)]) });
const decode = (token: number, past: number): StepInput => ({ inputIds: i64([[token]]), positionIds: i64([[past]]), attentionMask: i64([Array(past + 1).fill(1)]) });
const argmaxLast = (logits: Float32Array, vocab: number): number => {
  const row = logits.subarray(logits.length - vocab);
  return row.indexOf(Math.max(...row));
};

test('a stage holds a one-row graph when it has more than one row, on the CPU, and is small (or STRATA_BATCH1_GRAPH=on)', () => {
  assert.equal(batch1GraphUsed(8, 'cpu', 100 * 2 ** 20, undefined), true);
  assert.equal(batch1GraphUsed(8, 'cpu', BATCH1_GRAPH_MAX_BYTES + 1, undefined), false, 'a big stage: the If costs little against its layers');
  assert.equal(batch1GraphUsed(8, 'cpu', BATCH1_GRAPH_MAX_BYTES + 1, 'on'), true);
  assert.equal(batch1GraphUsed(8, 'cpu', 100, 'off'), false);
  assert.equal(batch1GraphUsed(1, 'cpu', 100, 'on'), false, 'a one-row graph is the stage graph itself');
  assert.equal(batch1GraphUsed(8, 'webgpu', 100, 'on'), false, 'WebGPU graphs have no If');
});

test('a one-row graph that cannot be opened is said and left out: the batch graph runs every batch', async () => {
  const dir = fixtureDir('gpt2-tiny');
  const main = prepareStage(dir, { first: 0, last: loadModelSpec(dir).blocks }, { rows: 8 });
  const log: string[] = [];
  const got = await openBatch1Graph(dir, main, { rows: 8, onProgress: (m) => log.push(m) }, async () => {
    throw new Error('ENOSPC: no space left on device');
  });
  assert.equal(got, null);
  assert.ok(log.some((m) => m.includes('not used (ENOSPC: no space left on device): the 8-row graph runs batch 1 too')), log.join('\n'));
});

/**
 * One single-stage pipeline's logits for a fixed schedule: sessions A and B prefill alone, A decodes alone, A and B
 * decode as one batch of two, then B alone; every step's logits, in order.
 */
async function schedule(p: LocalPipeline): Promise<Float32Array[]> {
  const stage = p.stages[0] as Stage;
  const vocab = p.spec.vocab;
  const out: Float32Array[] = [];
  const take = (logits: unknown) => {
    const l = logits as { data: Float32Array };
    out.push(Float32Array.from(l.data));
    return argmaxLast(l.data, vocab);
  };
  const [a, b]: KvCache[] = [stage.emptyCache(1), stage.emptyCache(1)];
  const pa = [5, 17, 42, 7, 99], pb = [3, 8, 13];
  let ta = take((await stage.step(prefill(pa), a)).logits);
  let tb = take((await stage.step(prefill(pb), b)).logits);
  ta = take((await stage.step(decode(ta, a.length), a)).logits);
  const both = await stage.stepBatch([decode(ta, a.length), decode(tb, b.length)], [a, b]);
  take(both[0].logits);
  tb = take(both[1].logits);
  take((await stage.step(decode(tb, b.length), b)).logits);
  stage.closeCache(a);
  stage.closeCache(b);
  return out;
}

/** Counts the runs of a stage's batch graph and of its one-row graph. */
function countRuns(stage: Stage): { batch: number; one: number } {
  const n = { batch: 0, one: 0 };
  const wrap = (s: { run: (...a: never[]) => unknown }, key: 'batch' | 'one') => {
    const run = s.run.bind(s);
    s.run = ((...a: never[]) => (n[key]++, run(...a))) as typeof s.run;
  };
  wrap(stage.session as never, 'batch');
  if (stage.batch1) wrap(stage.batch1 as never, 'one');
  return n;
}

/** The same model loaded twice: with its one-row graphs (the default here) and with STRATA_BATCH1_GRAPH=off. */
async function withAndWithout(dir: string, stages: number, dtype: WeightDType): Promise<{ withOne: LocalPipeline; batchOnly: LocalPipeline }> {
  const withOne = await LocalPipeline.load(dir, stages, { dtype });
  process.env.STRATA_BATCH1_GRAPH = 'off';
  try {
    return { withOne, batchOnly: await LocalPipeline.load(dir, stages, { dtype }) };
  } catch (e) {
    await withOne.close();
    throw e;
  } finally {
    delete process.env.STRATA_BATCH1_GRAPH;
  }
}

describe('one-row graph for batch 1: the same logits as the batch graph, bit for bit', () => {
  for (const name of CAUSAL_FIXTURES) {
    for (const dtype of ['float32', 'int8'] as WeightDType[]) {
      test(`${name} ${dtype}: runs of one row take the one-row graph, the batch of two the 8-row one, and every logit is the 8-row graph's alone`, async () => {
        const { withOne, batchOnly } = await withAndWithout(fixtureDir(name), 1, dtype);
        try {
          assert.ok(withOne.stages[0].batch1, 'a tiny stage of 8 rows holds a one-row graph');
          assert.equal(batchOnly.stages[0].batch1, null, 'STRATA_BATCH1_GRAPH=off: none');
          const runs = countRuns(withOne.stages[0]);
          const got = await schedule(withOne);
          assert.deepEqual(runs, { batch: 1, one: 4 }, 'four runs of one row, one batch of two');
          const want = await schedule(batchOnly);
          assert.equal(got.length, want.length);
          got.forEach((g, i) => assert.deepEqual(g, want[i], `step ${i}: logits differ between the graphs`));
        } finally {
          await withOne.close();
          await batchOnly.close();
        }
      });
    }
  }

  test('a pipeline of two stages holds a one-row graph in each and generates what the 8-row graphs alone do', async () => {
    const { withOne, batchOnly } = await withAndWithout(fixtureDir('gptj-tiny'), 2, 'int8');
    try {
      assert.ok(withOne.stages.every((s) => s.batch1));
      const runs = withOne.stages.map(countRuns);
      const a = await generate(withOne, [1, 2, 3, 4], { maxNewTokens: 8, eosTokenId: null });
      const b = await generate(batchOnly, [1, 2, 3, 4], { maxNewTokens: 8, eosTokenId: null });
      assert.deepEqual(a.outputIds, b.outputIds);
      assert.ok(runs.every((r) => r.one >= 8 && r.batch === 0), JSON.stringify(runs));
    } finally {
      await withOne.close();
      await batchOnly.close();
    }
  });
});
