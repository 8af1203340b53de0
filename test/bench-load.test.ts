import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runBench } from '../bin/bench.ts';
import { silentProgress } from '../bench/progress.ts';
import { writeShardedCheckpoint } from '../bench/load-checkpoint.ts';
import type { LoadBenchReport } from '../bench/load.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { loadModelSpec } from '../model/config.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { generate } from '../model/generation.ts';

// `strata bench --suite load` on a tiny preset: the same code path as the full-size runs (sharded checkpoint, real
// supervised worker processes, first start, cache hit, kill -9 and restart), in seconds. The figures are not
// asserted against the bounds here (a tiny model is all fixed costs); that they are measured and consistent is.

const tiny = { preset: 'gpt2-small', blocks: 2, dModel: 128, heads: 4, vocab: 1000 };

test('sharded F16 checkpoint: index, several shards, readable and servable', async () => {
  const root = mkdtempSync(join(tmpdir(), 'strata-ckpt-'));
  try {
    const dir = join(root, 'm');
    const shards = writeShardedCheckpoint(dir, { family: 'gptj', blocks: 2, dModel: 128, heads: 4, vocab: 500, maxPositions: 64, rotaryDim: 16 }, 'F16', 100_000);
    assert.ok(shards.length >= 3, `${shards.length} shards`);
    const index = JSON.parse(readFileSync(join(dir, 'model.safetensors.index.json'), 'utf8'));
    assert.deepEqual([...new Set(Object.values(index.weight_map))].sort(), shards.map((s) => s.slice(dir.length + 1)));
    const ck = Checkpoint.open(dir);
    assert.ok(ck.keys().every((k) => ck.info(k)!.dtype === 'F16'));
    ck.close();
    // It is a model: two stages generate without error, the same tokens as one.
    const spec = loadModelSpec(dir);
    const one = await LocalPipeline.load(dir, 1);
    const two = await LocalPipeline.load(dir, 2);
    const a = await generate(one, [1, 2, 3], { maxNewTokens: 4, eosTokenId: null });
    const b = await generate(two, [1, 2, 3], { maxNewTokens: 4, eosTokenId: null });
    assert.deepEqual(a.outputIds, b.outputIds);
    assert.ok(a.outputIds.every((id) => id >= 0 && id < spec.vocab));
    await one.close();
    await two.close();
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

test('strata bench --suite load on a tiny preset: starts, cache hit, memory, decode, recovery with identical output', { timeout: 120_000 }, async () => {
  const cacheDir = mkdtempSync(join(tmpdir(), 'strata-loadbench-'));
  const out = join(cacheDir, 'out');
  try {
    const { report, jsonPath } = await runBench(
      { suite: 'load', ...tiny, workers: 2, newTokens: 8, ckptDtype: 'f16', shardMb: 0.5, dropCaches: false, recover: true, cacheDir, out } as never,
      { progress: silentProgress },
    );
    const r = report as LoadBenchReport;
    assert.equal(r.suite, 'load');
    assert.ok(existsSync(jsonPath));
    assert.equal(r.model.ckptDtype, 'F16');
    assert.ok(r.model.shards >= 2 && existsSync(join(r.model.dir, 'model.safetensors.index.json')));
    assert.equal(r.rawRead.cold, false);
    assert.ok(r.rawRead.bytes > 0 && r.rawRead.ms > 0);
    assert.ok(r.newMemory.firstTouchGbPerSec > 0 && r.newMemory.againGbPerSec > 0, JSON.stringify(r.newMemory));
    assert.equal(r.firstStart.stages.length, 2);
    for (const s of r.firstStart.stages) {
      assert.equal(s.cached, false);
      assert.ok(s.buildMs >= 0 && s.loadMs >= 0 && s.weightBytes > 0 && s.peakRssBytes > s.weightBytes, JSON.stringify(s));
    }
    for (const s of r.cacheHit.stages) {
      assert.equal(s.cached, true);
      assert.ok(s.cachedRead.bytes >= s.weightBytes && Number.isFinite(s.vsCachedRead), JSON.stringify(s));
    }
    assert.ok(r.decode.tokPerSec > 0);
    assert.ok(r.recover, 'the recovery run');
    assert.equal(r.recover.identical, r.recover.requests);
    assert.ok(r.recover.toServingMs > 0 && Number.isFinite(r.recover.pipelineRecoveredMs));
  } finally {
    rmSync(cacheDir, { recursive: true, force: true });
  }
});
