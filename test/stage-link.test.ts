import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { writeShardedCheckpoint } from '../bench/load-checkpoint.ts';
import { prepareStage } from '../model/stage-cache.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { forwardLogits, generate } from '../model/generation.ts';
import { stageWeightSpans } from '../model/stage-prefetch.ts';

// Big same-dtype stages hard-link the checkpoint's shards into their cache entry instead of copying the weights
// (STRATA_LINK_MIN_MB, default 256 MiB; 0 here so a small model takes that path). Same graph, same numbers.

let root: string;
let model: string;
const env = { ...process.env };

before(() => {
  root = mkdtempSync(join(tmpdir(), 'strata-link-'));
  model = join(root, 'model');
  writeShardedCheckpoint(model, { family: 'gpt2', blocks: 3, dModel: 64, heads: 4, vocab: 300, maxPositions: 64 }, 'F32', 60_000);
});

after(() => {
  process.env = env;
  rmSync(root, { recursive: true, force: true });
});

const useCache = (link: boolean) => {
  process.env.STRATA_LINK_MIN_MB = link ? '0' : '100000';
  process.env.STRATA_CACHE_DIR = mkdtempSync(join(root, 'cache-'));
};

test('a linked float32 stage writes no weight bytes, records its links, and computes exactly what a copied one does', async () => {
  useCache(true);
  const stage = prepareStage(model, { first: 0, last: 3 }, { rows: 1 });
  const dir = dirname(stage.path);
  const links = readdirSync(dir).filter((f) => f.startsWith('ckpt-'));
  assert.ok(links.length >= 2, `links: ${links}`);
  assert.equal(statSync(join(dir, 'weights.bin')).size, 0, 'every gpt2 float32 weight is linked');
  const meta = JSON.parse(readFileSync(join(dir, 'meta.json'), 'utf8'));
  for (const l of links) assert.equal(meta.files[l], statSync(join(dir, l)).size);
  const spans = stageWeightSpans(stage.path);
  assert.ok(spans.filter((s) => s[0] !== stage.path).reduce((n, s) => n + s[2], 0) >= stage.paramBytes, 'the spans cover every weight');

  const linked = await LocalPipeline.load(model, 2);
  const a = await forwardLogits(linked, [1, 2, 3, 4]);
  const ga = await generate(linked, [5, 6], { maxNewTokens: 5, eosTokenId: null });
  await linked.close();
  useCache(false);
  const copied = await LocalPipeline.load(model, 2);
  const b = await forwardLogits(copied, [1, 2, 3, 4]);
  const gb = await generate(copied, [5, 6], { maxNewTokens: 5, eosTokenId: null });
  await copied.close();
  assert.deepEqual(a, b);
  assert.deepEqual(ga.outputIds, gb.outputIds);
});

test('a linked entry whose link is gone is rebuilt, not loaded', () => {
  useCache(true);
  const first = prepareStage(model, { first: 0, last: 2 }, { rows: 1 });
  const dir = dirname(first.path);
  rmSync(join(dir, readdirSync(dir).find((f) => f.startsWith('ckpt-'))!));
  const again = prepareStage(model, { first: 0, last: 2 }, { rows: 1 });
  assert.equal(again.built, true);
  assert.equal(prepareStage(model, { first: 0, last: 2 }, { rows: 1 }).built, false);
});
