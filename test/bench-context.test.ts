import { test } from 'node:test';
import assert from 'node:assert/strict';
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
