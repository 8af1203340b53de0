import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { renderContextReport, runContextBench } from '../bench/context.ts';
import { fixtureDir, testCacheDir } from './helpers/fixtures.ts';

// `strata bench --suite context` end to end on a tiny fixture: real child processes, real ORT stages (no baseline
// worktree and no llama.cpp here; those run where the figures are taken).

test('--suite context: decode ms/step and host↔device bytes for every prompt × batch, growth line in the report', { timeout: 120_000 }, async () => {
  testCacheDir();
  const r = await runContextBench({ model: fixtureDir('gpt2-tiny'), threads: 1, prompts: [4, 32], batches: [1, 2], steps: 2, rounds: 1, baseline: '' });
  assert.equal(r.baseline, null);
  assert.deepEqual(r.rows.map((x) => [x.runtime, x.prompt, x.batch]).sort(), [['current', 32, 1], ['current', 32, 2], ['current', 4, 1], ['current', 4, 2]]);
  for (const x of r.rows) {
    assert.ok(x.decodeMsPerStep > 0 && Number.isFinite(x.tokPerSec), `${x.prompt}×${x.batch}: timed`);
    assert.equal(x.hostDeviceBytesPerStep, 0, 'the CPU EP moves nothing between host and device');
  }
  assert.match(renderContextReport(r), /batch-8 step growth|\| current \| 32 \| 2 \|/);
});

test('--suite context --dtype int8: int8 stages, and no previous runtime (it had float32 stages only)', { timeout: 120_000 }, async () => {
  testCacheDir();
  const common = { model: fixtureDir('gpt2-tiny'), threads: 1, prompts: [4], batches: [1, 2], steps: 2, rounds: 1 };
  const r = await runContextBench({ ...common, dtype: 'int8' });
  const f32 = await runContextBench({ ...common, baseline: '' });
  assert.equal(r.dtype, 'int8');
  assert.ok(r.weightBytes! > 0 && r.weightBytes! < 0.5 * f32.weightBytes!, `int8 ${r.weightBytes} B of weights against float32's ${f32.weightBytes}`);
  assert.equal(r.baseline, null, 'the default baseline is skipped for a quantized stage');
  assert.deepEqual(r.rows.map((x) => [x.runtime, x.prompt, x.batch]).sort(), [['current', 4, 1], ['current', 4, 2]]);
  assert.ok(r.rows.every((x) => x.decodeMsPerStep > 0));
  assert.match(renderContextReport(r), /gpt2-tiny, int8 \([\d.]+ MiB of weights\), 1 stage/);
});

test('--suite context --max-batch 1: a 1-row graph, so batch 1 only', { timeout: 120_000 }, async () => {
  const cache = testCacheDir();
  const r = await runContextBench({ model: fixtureDir('gpt2-tiny'), threads: 1, prompts: [4], batches: [1, 2], steps: 2, rounds: 1, baseline: '', maxBatch: 1 });
  assert.deepEqual(r.rows.map((x) => [x.runtime, x.prompt, x.batch]), [['current', 4, 1]]);
  assert.ok(r.rows[0].decodeMsPerStep > 0);
  // The child built (or found) the one-row stage graph: the rows are part of the stage cache's key.
  const entries = readdirSync(cache, { recursive: true }).map(String);
  assert.ok(entries.some((e) => /float32-r1-v\d+$/.test(e)), entries.join(', '));
});
