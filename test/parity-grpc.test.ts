import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';
import { loadModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { evenSplit } from '../model/range.ts';
import { fillMask, forwardLogits, generate } from '../model/generation.ts';
import { RemotePipeline } from '../coordinator/remote-pipeline.ts';
import { startLocalCluster, type LocalCluster } from '../bin/local-cluster.ts';
import { ALL_FIXTURES, expected, fixtureDir, maxAbsDiff, testCacheDir } from './helpers/fixtures.ts';

const STRATA = fileURLToPath(new URL('../bin/strata.js', import.meta.url));
const run = promisify(execFile);
const strata = async (args: string[]) => JSON.parse((await run(process.execPath, [STRATA, ...args, '--json'], { maxBuffer: 64 << 20 })).stdout);

before(() => testCacheDir());

// Every fixture, K in {1, 2, 3, blocks}, over gRPC between real worker processes on loopback. The same workers are
// re-configured for each K (a worker may be re-assigned a block range at any time).
for (const name of ALL_FIXTURES) {
  const dir = fixtureDir(name);
  const spec = loadModelSpec(dir);
  const exp = expected(name);
  const fingerprint = Checkpoint.open(dir).fingerprint();
  const ks = [...new Set([1, 2, 3, spec.blocks])].filter((k) => k <= spec.blocks);
  describe(`${name} over gRPC`, () => {
    let cluster: LocalCluster;
    before(async () => {
      cluster = await startLocalCluster(dir, Math.max(...ks));
    });
    after(async () => cluster?.stop());
    for (const k of ks) {
      test(`K=${k}: logits 1e-4, greedy ids identical, fill-mask top-5 identical`, async () => {
        const addresses = cluster.workers.slice(0, k).map((w) => w.address);
        const p = await RemotePipeline.connect(addresses, { spec, fingerprint, ranges: evenSplit(spec.blocks, k) });
        try {
          for (const c of exp.forward) assert.ok(maxAbsDiff(await forwardLogits(p, c.input_ids), c.logits) <= 1e-4, `T=${c.input_ids.length}`);
          for (const g of exp.generate ?? []) {
            assert.deepEqual((await generate(p, g.input_ids, { maxNewTokens: g.max_new_tokens, eosTokenId: null })).outputIds, g.output_ids);
          }
          for (const f of exp.fill_mask ?? []) {
            assert.deepEqual((await fillMask(p, f.input_ids, f.mask_index, 5)).map((t) => t.id), f.top5_ids);
          }
          const stages = p.describe().stages;
          assert.deepEqual(stages.map((s) => s.blocks), evenSplit(spec.blocks, k).map((r) => [r.first, r.last]));
          assert.deepEqual(stages.map((s) => s.pid), cluster.workers.slice(0, k).map((w) => w.pid));
        } finally {
          p.close();
        }
      });
    }
  });
}

describe('CLI contract (strata … --stages K --json)', () => {
  test('forward over 3 worker processes reports logits and stages {blocks, pid, address}', async () => {
    const c = expected('gptj-tiny').forward[1];
    const out = await strata(['forward', '--model', fixtureDir('gptj-tiny'), '--stages', '3', '--ids', c.input_ids.join(',')]);
    assert.ok(maxAbsDiff(out.logits, c.logits) <= 1e-4);
    assert.deepEqual(out.stages.map((s: any) => s.blocks), [[0, 1], [1, 2], [2, 3]]);
    assert.equal(new Set(out.stages.map((s: any) => s.pid)).size, 3);
    assert.ok(out.stages.every((s: any) => /^127\.0\.0\.1:\d+$/.test(s.address) && s.pid !== process.pid));
  });
  test('generate and fill-mask, gRPC and --in-process agree', async () => {
    const g = expected('gpt2-tiny').generate![0];
    const args = ['generate', '--model', fixtureDir('gpt2-tiny'), '--stages', '2', '--ids', g.input_ids.join(','), '--max-new-tokens', String(g.max_new_tokens)];
    assert.deepEqual((await strata(args)).output_ids, g.output_ids);
    const local = await strata([...args, '--in-process']);
    assert.deepEqual(local.output_ids, g.output_ids);
    assert.deepEqual(local.stages.map((s: any) => s.address), ['in-process', 'in-process']);
    const f = expected('distilbert-tiny').fill_mask![0];
    const fm = await strata(['fill-mask', '--model', fixtureDir('distilbert-tiny'), '--stages', '2', '--ids', f.input_ids.join(','), '--mask-index', String(f.mask_index)]);
    assert.deepEqual(fm.top_k.map((t: any) => t.id), f.top5_ids);
    assert.ok(fm.top_k.every((t: any) => t.score > 0 && t.score < 1));
  });
});
