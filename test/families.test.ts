import { describe, test, before } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { normalizeConfig } from '../model/config.ts';
import { StrataError } from '../model/errors.ts';
import { familyFor, knownModelTypes, registerFamily } from '../model/families/index.ts';
import type { EmbedWeights, ModelFamily, NormRefs, WeightRef } from '../model/families/family.ts';
import { attention } from '../model/graph/attention.ts';
import { linear } from '../model/graph/linear.ts';
import { embedTokens, layerNorm, mlp, type MlpWeights } from '../model/graph/ops.ts';
import { allRefs, stageParamCount, stageWeights } from '../model/layout.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { forwardLogits, generate } from '../model/generation.ts';
import { planPartition } from '../coordinator/planner.ts';
import { writeSyntheticModel } from '../model/synthetic.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { maxAbsDiff, testCacheDir } from './helpers/fixtures.ts';

/**
 * A family that exists only in this file: GPT-NeoX-like blocks (two norms read in parallel, x + attn(ln_a(x)) +
 * mlp(ln_m(x))), biased q/k/v, learned positions, an untied head, and key names no built-in family uses. It reaches
 * strata through registerFamily alone: if any driver still named a family, this model would not load.
 */
interface TinyBlock extends MlpWeights {
  attnNorm: NormRefs;
  mlpNorm: NormRefs;
  q: WeightRef; qb: WeightRef; k: WeightRef; kb: WeightRef; v: WeightRef; vb: WeightRef;
  o: WeightRef; ob: WeightRef;
}
interface TinyHead { norm: NormRefs; weight: WeightRef }

const MODEL_TYPE = 'strata_test_tiny';
const tiny: ModelFamily<EmbedWeights, TinyBlock, TinyHead> = {
  name: 'test-tiny',
  modelTypes: [{ type: MODEL_TYPE }],
  normalize(r) {
    const dModel = r.need<number>(['width'], 'hidden size');
    const heads = r.need<number>(['heads'], 'attention heads');
    return {
      family: 'test-tiny', causal: true, blocks: r.need<number>(['depth'], 'number of blocks'), dModel, heads, headDim: r.headDim(dModel, heads),
      inner: 2 * dModel, vocab: r.need<number>(['vocab_size'], 'vocabulary size'), maxPositions: r.opt('max_len', 64), eps: 1e-5,
      activation: r.activation(r.opt('act', 'gelu')), positions: 'learned', rotaryDim: 0, scaleAttnWeights: true, scaleAttnByInverseLayerIdx: false,
      tiedHead: false, headBias: false, keyLayout: 'hf',
    };
  },
  keyPrefix: (hasKey) => (hasKey('embed_tokens.weight') && !hasKey('model.embed_tokens.weight') ? '' : 'model.'),
  weights(spec, range, prefix) {
    const { dModel: D, inner: I } = spec;
    const w = (key: string, ...shape: number[]): WeightRef => ({ key: prefix + key, shape });
    const norm = (base: string): NormRefs => [w(`${base}.weight`, D), w(`${base}.bias`, D)];
    const blocks: TinyBlock[] = [];
    for (let i = range.first; i < range.last; i++) {
      const b = `layers.${i}.`;
      blocks.push({
        attnNorm: norm(`${b}attn_norm`), mlpNorm: norm(`${b}mlp_norm`),
        q: w(`${b}q.weight`, D, D), qb: w(`${b}q.bias`, D), k: w(`${b}k.weight`, D, D), kb: w(`${b}k.bias`, D),
        v: w(`${b}v.weight`, D, D), vb: w(`${b}v.bias`, D), o: w(`${b}o.weight`, D, D), ob: w(`${b}o.bias`, D),
        fcIn: w(`${b}up.weight`, I, D), fcInBias: w(`${b}up.bias`, I), fcOut: w(`${b}down.weight`, D, I), fcOutBias: w(`${b}down.bias`, D),
      });
    }
    return {
      embed: range.first === 0 ? { tokens: w('embed_tokens.weight', spec.vocab, D), positions: w('embed_positions.weight', spec.maxPositions, D) } : null,
      blocks,
      head: range.last === spec.blocks ? { norm: norm('final_norm'), weight: { key: 'lm_head.weight', shape: [spec.vocab, D] } } : null,
    };
  },
  legacyBuffers: [],
  embed: (ctx, ids, e) => embedTokens(ctx, ids, e),
  block(ctx, x, b, layer) {
    const a = layerNorm(ctx, x, b.attnNorm);
    const [q, k, v] = [linear(ctx, a, b.q, b.qb, false), linear(ctx, a, b.k, b.kb, false), linear(ctx, a, b.v, b.vb, false)];
    const attn = linear(ctx, attention(ctx, q, k, v, layer, { sqrtHeadDim: 'scores', inverseLayer: false }), b.o, b.ob, false);
    const m = mlp(ctx, layerNorm(ctx, x, b.mlpNorm), b, false);
    return ctx.g.o('Add', [x, ctx.g.o('Add', [attn, m])]);
  },
  finalNorm: (ctx, x, h) => layerNorm(ctx, x, h.norm),
  lmHead: (ctx, x, h) => linear(ctx, x, h.weight, null, false),
  tokenizer: { eosToken: null, maskToken: null },
  synthetic: {
    config: (s) => ({ model_type: MODEL_TYPE, width: s.dModel, heads: s.heads, depth: s.blocks, vocab_size: s.vocab, max_len: s.maxPositions ?? 64, act: 'gelu' }),
    isNormWeight: (key) => /norm\.weight$/.test(key),
  },
};

const rejectsWith = (fn: () => unknown, code: string, mentions: RegExp) =>
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof StrataError, `expected a StrataError, got ${e}`);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, mentions);
    return true;
  });

before(() => testCacheDir());

describe('model families behind a registry', () => {
  let dir = '';
  before(() => {
    registerFamily(tiny);
    dir = mkdtempSync(join(tmpdir(), 'strata-family-'));
    writeSyntheticModel(dir, { family: 'test-tiny', blocks: 3, dModel: 32, heads: 4, vocab: 97, maxPositions: 64, seed: 7 });
  });

  test('a registered family claims its model_type; unknown types list every registered one', () => {
    assert.equal(familyFor(MODEL_TYPE), tiny);
    assert.ok(knownModelTypes().includes(MODEL_TYPE));
    assert.equal(normalizeConfig({ model_type: MODEL_TYPE, width: 32, heads: 4, depth: 3, vocab_size: 97 }).family, 'test-tiny');
    rejectsWith(() => normalizeConfig({ model_type: 'llama' }), 'config_unsupported_model_type', /supported: gpt2, gptj, gpt_neo \(with "rotary": true\), distilbert, strata_test_tiny/);
    rejectsWith(() => normalizeConfig({ model_type: MODEL_TYPE, heads: 4, depth: 3, vocab_size: 97 }), 'config_missing_field', /width/);
  });

  test('a family name, model_type or preset name is registered once', () => {
    rejectsWith(() => registerFamily(tiny), 'family_duplicate', /test-tiny/);
    rejectsWith(() => registerFamily({ ...tiny, name: 'other', modelTypes: [{ type: 'gpt2' }] }), 'family_duplicate', /gpt2/);
    rejectsWith(() => registerFamily({ ...tiny, name: 'other', modelTypes: [{ type: 'other' }], synthetic: { ...tiny.synthetic!, presets: { 'gpt-j': { family: 'other', blocks: 1, dModel: 8, heads: 1, vocab: 8 } } } }), 'family_duplicate', /gpt-j/);
    assert.equal(familyFor('other'), undefined, 'a refused family leaves nothing behind');
  });

  test('the synthetic checkpoint holds exactly the weights the family names', () => {
    const spec = normalizeConfig({ model_type: MODEL_TYPE, width: 32, heads: 4, depth: 3, vocab_size: 97, max_len: 64 });
    const ck = Checkpoint.open(dir);
    try {
      const want = allRefs(stageWeights(spec, { first: 0, last: 3 }, 'model.')).map((r) => r.key).sort();
      assert.deepEqual(ck.keys().sort(), want);
      assert.ok(want.includes('model.layers.2.mlp_norm.bias') && want.includes('lm_head.weight'));
    } finally {
      ck.close();
    }
    // The planner walks the same records: every parameter is placed, once.
    const plan = planPartition(spec, [{ id: 'a', memoryBytes: Infinity }, { id: 'b', memoryBytes: Infinity }]);
    assert.equal(plan.model.family, 'test-tiny');
    const total = stageParamCount(stageWeights(spec, { first: 0, last: 3 }, ''));
    assert.equal(plan.stages.reduce((n, s) => n + s.paramBytes, 0), total * 4);
  });

  test('runs through a real stage pipeline: K=1, K=2 and a fused K=3 agree', async () => {
    const warnings: string[] = [];
    const onProgress = (m: string) => m.startsWith('warning') && warnings.push(m);
    const ids = [5, 17, 3, 42, 8, 1];
    const load = (k: number, o: { fused?: boolean } = {}) => LocalPipeline.load(dir, k, { onProgress, ...o });
    const one = await load(1);
    const two = await load(2);
    const fused = await load(3, { fused: true });
    try {
      assert.equal(one.spec.family, 'test-tiny');
      const ref = await forwardLogits(one, ids);
      assert.equal(ref.length, ids.length);
      assert.equal(ref[0].length, 97);
      assert.ok(ref.flat().every(Number.isFinite));
      // Not a constant model: rows differ by position and token.
      assert.ok(maxAbsDiff([ref[0]], [ref[1]]) > 1e-3, 'logits do not depend on the input');
      for (const p of [two, fused]) assert.ok(maxAbsDiff(await forwardLogits(p, ids), ref) <= 1e-4);
      const greedy = async (p: LocalPipeline) => (await generate(p, ids, { maxNewTokens: 8, eosTokenId: null })).outputIds;
      const want = await greedy(one);
      assert.equal(want.length, 8);
      assert.deepEqual(await greedy(two), want);
      assert.deepEqual(await greedy(fused), want);
      assert.deepEqual(warnings, []);
    } finally {
      await Promise.all([one.close(), two.close(), fused.close()]);
    }
  });
});
