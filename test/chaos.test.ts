import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { runChaos } from './chaos/chaos.ts';
import { fixtureDir, testCacheDir } from './helpers/fixtures.ts';

before(() => testCacheDir());

// The subset of the chaos suite that runs in `npm test` (the full one: `npm run test:chaos`).
test('chaos: random worker kills and restarts during a stream of requests lose nothing and change nothing', async () => {
  const r = await runChaos({ modelDir: fixtureDir('gptj-tiny'), requests: 24, concurrency: 6, newTokens: 16, stages: 3, spares: 1, killEveryMs: 1200 });
  console.log(`chaos subset: ${JSON.stringify(r)}`);
  assert.ok(r.kills >= 1, 'at least one worker was killed');
  assert.equal(r.lost, 0);
  assert.equal(r.wrong, 0);
});
