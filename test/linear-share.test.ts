import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { dirname } from 'node:path';
import { loadModelSpec } from '../model/config.ts';
import { onnx } from '../model/onnx-builder.ts';
import { prepareStage } from '../model/stage-cache.ts';
import { StageSession } from '../model/executor.ts';
import { Stage } from '../model/stage.ts';
import { measureLinearShare, writeWithoutLinears } from '../bench/linear-share.ts';
import { fixtureDir, testCacheDir } from './helpers/fixtures.ts';
import { i64 } from './helpers/tensors.ts';

// `strata bench --suite quant` splits a quantized batch-1 step into its linear layers and the rest by timing the
// stage graph against a copy without them (bench/linear-share.ts). The copy must run the rest of the graph as it is.

before(() => testCacheDir());

const ops = (path: string) => (onnx.ModelProto.decode(readFileSync(path)).graph?.node ?? []).map((n) => n.opType ?? '');

test('the copy without linear layers swaps every MatMulNBits and the quantized token lookup, keeps every other node, and steps with the same shapes', async () => {
  const model = fixtureDir('gpt2-tiny');
  const spec = loadModelSpec(model);
  const range = { first: 0, last: spec.blocks };
  const prepared = prepareStage(model, range, { dtype: 'int4', rows: 1 });
  const copy = writeWithoutLinears(prepared.path);
  try {
    const before = ops(prepared.path);
    const after = ops(copy.graph);
    const linears = before.filter((o) => o === 'MatMulNBits').length;
    assert.ok(linears >= 4 * spec.blocks, `${linears} linear layers`);
    assert.equal(copy.swapped, linears);
    assert.equal(after.filter((o) => o === 'MatMulNBits' || o === 'GatherBlockQuantized').length, 0);
    // Each linear layer becomes Slice + MatMul, the int4 token lookup Gather + Cast + Concat; nothing else changes.
    const swappedOps = new Set(['Slice', 'MatMul', 'MatMulNBits', 'GatherBlockQuantized', 'Gather', 'Cast', 'Concat']);
    assert.deepEqual(after.filter((o) => !swappedOps.has(o)), before.filter((o) => !swappedOps.has(o)));
    assert.equal(after.length, before.length + linears + 2);

    const steps = [];
    for (const path of [prepared.path, copy.graph]) {
      const stage = new Stage(spec, range, await StageSession.create(path, { threads: 1 }), 'float32', { rows: 1 });
      const cache = stage.emptyCache(1);
      const prompt = [5, 9, 2, 7];
      await stage.step({ inputIds: i64([prompt]), positionIds: i64([[0, 1, 2, 3]]), attentionMask: i64([[1, 1, 1, 1]]), logitPositions: { dtype: 'int64', dims: [1], data: BigInt64Array.of(3n) } }, cache);
      const out = await stage.step({ inputIds: i64([[3]]), positionIds: i64([[4]]), attentionMask: i64([[1, 1, 1, 1, 1]]) }, cache);
      steps.push(out.logits!.dims);
      stage.closeCache(cache);
      await stage.close();
    }
    assert.deepEqual(steps[1], steps[0]);
  } finally {
    rmSync(dirname(copy.graph), { recursive: true, force: true });
  }
});

test('measureLinearShare runs both graphs in a child process and leaves no copy behind; given a block size, that graph too', () => {
  const model = fixtureDir('gpt2-tiny');
  const s = measureLinearShare(model, 'int8', 1, 1, testCacheDir(), 64);
  assert.equal(s.samples.stepMs.length, 24);
  assert.equal(s.samples.withoutLinearsMs.length, 24);
  assert.equal(s.samples.altStepMs?.length, 24);
  assert.ok(s.stepMs > 0 && s.withoutLinearsMs > 0 && Number.isFinite(s.linearsMs));
  assert.ok(s.alt && s.alt.blockSize === 64 && s.alt.stepMs > 0);
  assert.ok(prepareStage(model, { first: 0, last: loadModelSpec(model).blocks }, { dtype: 'int8', rows: 1, cacheDir: testCacheDir(), quantBlockSize: 64 }).built === false, 'the child built the block-64 graph into the cache');
  const prepared = prepareStage(model, { first: 0, last: loadModelSpec(model).blocks }, { dtype: 'int8', rows: 1, cacheDir: testCacheDir() });
  assert.equal(existsSync(`${dirname(prepared.path)}-no-linears`), false);
});
