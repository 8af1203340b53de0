import { describe, test, before } from 'node:test';
import assert from 'node:assert/strict';
import { loadModelSpec } from '../model/config.ts';
import { evenSplit } from '../model/range.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { fillMask, forwardLogits, generate } from '../model/generation.ts';
import { ALL_FIXTURES, expected, fixtureDir, maxAbsDiff, testCacheDir } from './helpers/fixtures.ts';

// Every fixture, every K from 1 to its block count (balanced, possibly uneven splits): HF parity in process.
before(() => testCacheDir());

for (const name of ALL_FIXTURES) {
  const dir = fixtureDir(name);
  const spec = loadModelSpec(dir);
  const exp = expected(name);
  for (const fused of [false, true]) describe(`${name} in process, ${fused ? 'fused ORT kernels' : 'op-by-op graph'}`, () => {
    for (let k = 1; k <= spec.blocks; k++) {
      const split = evenSplit(spec.blocks, k).map((r) => `[${r.first},${r.last})`).join(' ');
      test(`K=${k} ${split}: logits within 1e-4, greedy ids identical with KV cache, fill-mask top-5`, async () => {
        const p = await LocalPipeline.load(dir, k, { fused });
        try {
          for (const c of exp.forward) {
            const err = maxAbsDiff(await forwardLogits(p, c.input_ids), c.logits);
            assert.ok(err <= 1e-4, `T=${c.input_ids.length}: max |logit - HF| = ${err}`);
          }
          for (const c of exp.generate ?? []) {
            const { outputIds } = await generate(p, c.input_ids, { maxNewTokens: c.max_new_tokens, eosTokenId: null });
            assert.deepEqual(outputIds, c.output_ids);
            // Chunked prefill (the prompt in pieces of 4 through the KV cache) computes the same continuation.
            assert.deepEqual((await generate(p, c.input_ids, { maxNewTokens: c.max_new_tokens, eosTokenId: null, prefillChunk: 4 })).outputIds, c.output_ids);
          }
          for (const c of exp.fill_mask ?? []) {
            const top = await fillMask(p, c.input_ids, c.mask_index, 5);
            assert.deepEqual(top.map((t) => t.id), c.top5_ids);
          }
        } finally {
          await p.close();
        }
      });
    }
  });
}
