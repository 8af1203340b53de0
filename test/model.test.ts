import { describe, test, before } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdtempSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadModelSpec, normalizeConfig, type ModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { StrataError } from '../model/errors.ts';
import { evenSplit } from '../model/range.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { ortSpin } from '../model/executor.ts';
import { forwardLogits, generate } from '../model/generation.ts';
import { buildStageGraph } from '../model/stage-graph.ts';
import { CountingSink } from '../model/onnx-builder.ts';
import { keyPrefix, stageParamCount, stageWeights } from '../model/layout.ts';
import { float32ToFloat16 } from '../model/dtype.ts';
import { CONFIG_ROOT, expected, fixtureDir, maxAbsDiff, testCacheDir } from './helpers/fixtures.ts';
import { readSafetensors, writeSafetensors, type RawTensor } from './helpers/safetensors.ts';

before(() => testCacheDir());

const realConfig = (file: string) => JSON.parse(readFileSync(join(CONFIG_ROOT, file), 'utf8'));
const rejects = async (fn: () => unknown, code: string, mentions?: RegExp) => {
  await assert.rejects(async () => fn(), (e: unknown) => {
    assert.ok(e instanceof StrataError, `expected a StrataError, got ${e}`);
    assert.equal(e.code, code, e.message);
    if (mentions) assert.match(e.message, mentions);
    return true;
  });
};

/** A copy of a fixture directory whose tensors `edit` may change; config.json is copied unless given. */
function variant(name: string, edit: (t: Map<string, RawTensor>) => Map<string, RawTensor> | void, config?: object): string {
  const dir = mkdtempSync(join(tmpdir(), `strata-${name}-`));
  const tensors = readSafetensors(join(fixtureDir(name), 'model.safetensors'));
  writeSafetensors(join(dir, 'model.safetensors'), edit(tensors) ?? tensors);
  if (config) writeFileSync(join(dir, 'config.json'), JSON.stringify(config));
  else copyFileSync(join(fixtureDir(name), 'config.json'), join(dir, 'config.json'));
  return dir;
}

async function assertForwardParity(dir: string, fixture: string, k: number, tol = 1e-4, dtype: 'float32' | 'float16' = 'float32') {
  const p = await LocalPipeline.load(dir, k, { dtype });
  try {
    for (const c of expected(fixture).forward) {
      const err = maxAbsDiff(await forwardLogits(p, c.input_ids), c.logits);
      assert.ok(err <= tol, `${fixture} K=${k} ${dtype}: max |logit - HF| = ${err} > ${tol}`);
    }
  } finally {
    await p.close();
  }
}

describe('config normalisation', () => {
  test('BioMedLM (GPT2Config) verbatim', () => {
    const s = normalizeConfig(realConfig('biomedlm.config.json'));
    assert.deepEqual(
      [s.family, s.blocks, s.dModel, s.heads, s.headDim, s.inner, s.vocab, s.maxPositions, s.activation, s.scaleAttnByInverseLayerIdx, s.tiedHead, s.positions],
      ['gpt2', 32, 2560, 20, 128, 10240, 28896, 1024, 'gelu_tanh', true, true, 'learned'],
    );
  });
  test('GPT-J-6B shipped as gpt_neo with rotary: true runs as GPT-J (fork key layout)', () => {
    const s = normalizeConfig(realConfig('gpt-j-6b.gptneo-rotary.config.json'));
    assert.deepEqual(
      [s.family, s.keyLayout, s.blocks, s.dModel, s.heads, s.headDim, s.rotaryDim, s.inner, s.vocab, s.maxPositions, s.tiedHead, s.headBias],
      ['gptj', 'neo-fork', 28, 4096, 16, 256, 64, 16384, 50400, 2048, false, true],
    );
  });
  test('GPTJConfig (model_type gptj)', () => {
    const s = loadModelSpec(fixtureDir('gptj-tiny'));
    assert.deepEqual([s.family, s.keyLayout, s.rotaryDim, s.inner], ['gptj', 'hf', 8, 256]);
  });
  test('ClinicalBERT (DistilBertConfig) verbatim', () => {
    const s = normalizeConfig(realConfig('clinicalbert.config.json'));
    assert.deepEqual(
      [s.family, s.causal, s.blocks, s.dModel, s.heads, s.inner, s.vocab, s.eps, s.activation, s.tiedHead],
      ['distilbert', false, 6, 768, 12, 3072, 119547, 1e-12, 'gelu_erf', true],
    );
  });
  test('unsupported model types and missing fields are typed errors saying what is supported', async () => {
    await rejects(() => normalizeConfig({ model_type: 'llama' }), 'config_unsupported_model_type', /supported: gpt2, gptj/);
    await rejects(() => normalizeConfig({ ...realConfig('gpt-j-6b.gptneo-rotary.config.json'), rotary: false }), 'config_unsupported_model_type', /rotary/);
    const { n_embd: _, ...noWidth } = realConfig('biomedlm.config.json');
    await rejects(() => normalizeConfig(noWidth), 'config_missing_field', /n_embd/);
    await rejects(() => loadModelSpec(tmpdir() + '/strata-no-such-dir'), 'model_dir_invalid', /config.json/);
  });
});

describe('weights', () => {
  test('sharded checkpoint (index + two shards) computes the same logits', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'strata-sharded-'));
    const tensors = readSafetensors(join(fixtureDir('gpt2-tiny'), 'model.safetensors'));
    const keys = [...tensors.keys()];
    const halves = [keys.slice(0, keys.length / 2), keys.slice(keys.length / 2)];
    const weightMap: Record<string, string> = {};
    halves.forEach((ks, i) => {
      const file = `model-0000${i + 1}-of-00002.safetensors`;
      writeSafetensors(join(dir, file), new Map(ks.map((k) => [k, tensors.get(k)!])));
      ks.forEach((k) => (weightMap[k] = file));
    });
    writeFileSync(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: weightMap }));
    copyFileSync(join(fixtureDir('gpt2-tiny'), 'config.json'), join(dir, 'config.json'));
    await assertForwardParity(dir, 'gpt2-tiny', 2);
  });

  test('legacy buffers are ignored by exact name; c_attn.bias is still a weight', async () => {
    const dir = variant('gpt2-tiny', (t) => {
      const mask = { dtype: 'F32', shape: [1, 1, 64, 64], data: new Uint8Array(64 * 64 * 4) };
      for (let i = 0; i < 4; i++) {
        t.set(`transformer.h.${i}.attn.bias`, mask);
        t.set(`transformer.h.${i}.attn.masked_bias`, { dtype: 'F32', shape: [], data: new Uint8Array(4) });
      }
      t.set('lm_head.weight', t.get('transformer.wte.weight')!); // tied copy some checkpoints store
    });
    await assertForwardParity(dir, 'gpt2-tiny', 1);
    // Zeroing c_attn.bias must change the result: proof it is read, not skipped as a "bias buffer".
    const zeroed = variant('gpt2-tiny', (t) => {
      const b = t.get('transformer.h.0.attn.c_attn.bias')!;
      t.set('transformer.h.0.attn.c_attn.bias', { ...b, data: new Uint8Array(b.data.byteLength) });
    });
    const p = await LocalPipeline.load(zeroed, 1);
    const c = expected('gpt2-tiny').forward[1];
    assert.ok(maxAbsDiff(await forwardLogits(p, c.input_ids), c.logits) > 1e-2);
    await p.close();
    const bert = variant('distilbert-tiny', (t) => {
      t.set('distilbert.embeddings.position_ids', { dtype: 'I64', shape: [1, 64], data: new Uint8Array(64 * 8) });
    });
    await assertForwardParity(bert, 'distilbert-tiny', 3);
  });

  test('GPT-2 checkpoint saved without the transformer. prefix (GPT2Model layout)', async () => {
    const dir = variant('gpt2-tiny', (t) => new Map([...t].map(([k, v]) => [k.replace(/^transformer\./, ''), v])));
    await assertForwardParity(dir, 'gpt2-tiny', 2);
  });

  test('F16 and BF16 checkpoints are read and widened', async () => {
    const narrow = (kind: 'F16' | 'BF16') => (t: Map<string, RawTensor>) => {
      for (const [k, v] of t) {
        const f = new Float32Array(v.data.slice().buffer);
        const half = kind === 'F16' ? float32ToFloat16(f) : Uint16Array.from(new Uint32Array(f.buffer), (b) => b >>> 16);
        t.set(k, { dtype: kind, shape: v.shape, data: new Uint8Array(half.buffer) });
      }
    };
    // Rounding the weights moves logits (by ~1e-2 for fp16, more for bf16); greedy ids on the fixture margins hold.
    for (const [kind, tol] of [['F16', 0.05], ['BF16', 0.5]] as const) {
      const dir = variant('gptj-tiny', narrow(kind));
      assert.equal(Checkpoint.open(dir).info('lm_head.weight')?.dtype, kind);
      await assertForwardParity(dir, 'gptj-tiny', 2, tol);
    }
  });

  test('missing or mis-shaped tensors name the key and the expected shape', async () => {
    const missing = variant('gpt2-tiny', (t) => void t.delete('transformer.h.2.mlp.c_fc.weight'));
    await rejects(() => LocalPipeline.load(missing, 1), 'weight_missing', /transformer\.h\.2\.mlp\.c_fc\.weight.*\[64, 256\]/);
    // A stage that does not need the missing tensor still builds: a stage reads only its own tensors.
    (await LocalPipeline.load(missing, [{ first: 0, last: 2 }])).close();
    const bad = variant('gptj-tiny', (t) => {
      const w = t.get('transformer.h.1.attn.q_proj.weight')!;
      t.set('transformer.h.1.attn.q_proj.weight', { ...w, shape: [32, 128] });
    });
    await rejects(() => LocalPipeline.load(bad, 3), 'weight_shape_mismatch', /q_proj\.weight.*\[32, 128\].*\[64, 64\]/);
    const wrongConfig = variant('gpt2-tiny', () => {}, { ...JSON.parse(readFileSync(join(fixtureDir('gpt2-tiny'), 'config.json'), 'utf8')), n_embd: 128 });
    await rejects(() => LocalPipeline.load(wrongConfig, 1), 'weight_shape_mismatch', /different checkpoints/);
  });

  test('pytorch_model.bin alone gets the one-line conversion', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'strata-bin-'));
    copyFileSync(join(fixtureDir('gpt2-tiny'), 'config.json'), join(dir, 'config.json'));
    writeFileSync(join(dir, 'pytorch_model.bin'), 'not really a pickle');
    await rejects(() => Checkpoint.open(dir), 'weights_missing', /pytorch_model\.bin.*safe_serialization=True/);
  });

  test('fingerprint differs between checkpoints and is stable for one', () => {
    const a = Checkpoint.open(fixtureDir('gptj-tiny'));
    const b = Checkpoint.open(fixtureDir('gptneo-rotary-tiny'));
    assert.equal(a.fingerprint(), Checkpoint.open(fixtureDir('gptj-tiny')).fingerprint());
    assert.notEqual(a.fingerprint(), b.fingerprint());
  });
});

describe('float16 stage graphs', () => {
  for (const name of ['gpt2-tiny', 'gptj-tiny', 'distilbert-tiny']) {
    test(`${name}: fp16 weights, fp32 norms and softmax: logits close, greedy ids identical`, async () => {
      const dir = fixtureDir(name);
      await assertForwardParity(dir, name, 2, 0.05, 'float16');
      const p = await LocalPipeline.load(dir, 2, { dtype: 'float16' });
      for (const c of expected(name).generate ?? []) {
        assert.deepEqual((await generate(p, c.input_ids, { maxNewTokens: c.max_new_tokens, eosTokenId: null })).outputIds, c.output_ids);
      }
      await p.close();
    });
  }
});

describe('bad input', () => {
  test('unknown token ids, over-long prompts, empty prompts, bad splits', async () => {
    const dir = fixtureDir('gpt2-tiny');
    const p = await LocalPipeline.load(dir, 2);
    await rejects(() => forwardLogits(p, [1, 256]), 'token_id_out_of_range', /256.*\[0, 256\)/);
    await rejects(() => forwardLogits(p, [1, -1]), 'token_id_out_of_range');
    await rejects(() => generate(p, Array(60).fill(1), { maxNewTokens: 10, maxPositions: 64 }), 'prompt_too_long', /64/);
    await rejects(() => forwardLogits(p, []), 'prompt_empty');
    await p.close();
    await rejects(() => LocalPipeline.load(dir, 5), 'invalid_stage_count', /between 1 and the model's 4 blocks/);
    await rejects(() => LocalPipeline.load(dir, 0), 'invalid_stage_count');
  });
});

describe('padding (none: decoder rows keep their own lengths in KV slots)', () => {
  test('a padded decoder mask is refused clearly; two rows of one session each compute their own sequence', async () => {
    const dir = fixtureDir('gptj-tiny');
    const spec = loadModelSpec(dir);
    const p = await LocalPipeline.load(dir, 3);
    const c = expected('gptj-tiny').forward[1];
    const i64 = (rows: number[][]) => ({ dtype: 'int64' as const, dims: [rows.length, rows[0].length], data: BigInt64Array.from(rows.flat(), BigInt) });
    const pos = (n: number, from = 0) => Array.from({ length: n }, (_, i) => from + i);
    await rejects(() => p.step('padded', { inputIds: i64([[0, 0, ...c.input_ids.slice(0, 4)]]), positionIds: i64([[0, 0, 0, 1, 2, 3]]), attentionMask: i64([[0, 0, 1, 1, 1, 1]]) }), 'attention_mask_unsupported', /padding is not needed/);
    await p.end('padded');
    const a = c.input_ids.slice(0, 10);
    const b = c.input_ids.slice(20, 30);
    const { logits } = await p.step('rows', { inputIds: i64([a, b]), positionIds: i64([pos(10), pos(10)]), attentionMask: i64([a.map(() => 1), b.map(() => 1)]) });
    const V = spec.vocab;
    const data = logits!.data as Float32Array;
    const row = (r: number) => Array.from({ length: 10 }, (_, t) => Array.from(data.subarray((r * 10 + t) * V, (r * 10 + t + 1) * V)));
    assert.ok(maxAbsDiff(row(0), c.logits.slice(0, 10)) <= 1e-4, 'row 0');
    assert.ok(maxAbsDiff(row(1), await forwardLogits(p, b)) <= 1e-4, 'row 1');
    // One more step for both rows through their slots.
    const next = await p.step('rows', { inputIds: i64([[c.input_ids[10]], [c.input_ids[30]]]), positionIds: i64([[10], [10]]), attentionMask: i64([pos(11).map(() => 1), pos(11).map(() => 1)]) });
    const last = Array.from((next.logits!.data as Float32Array).subarray(0, V));
    assert.ok(maxAbsDiff([last], [c.logits[10]]) <= 1e-4, 'decode, row 0');
    await p.end('rows');
    await p.close();
  });
});

describe('full-size stage graphs (built, not run) from the real configs', () => {
  // Never called: a CountingSink sizes weights from their declared shapes without reading them.
  const zeros = { prefix: '', readFloat32: (): Float32Array => assert.fail('a counting build must not read weights') };
  const cases: [string, number, (s: ModelSpec) => number, (s: ModelSpec) => number, (s: ModelSpec) => number][] = [
    // [config, stages, params per block, embedding params, head params (beyond a tied embedding)]
    ['biomedlm.config.json', 4, (s) => 4 * s.dModel + (s.dModel * 3 * s.dModel + 3 * s.dModel) + (s.dModel * s.dModel + s.dModel) + 2 * s.dModel * s.inner + s.inner + s.dModel,
      (s) => s.vocab * s.dModel + s.maxPositions * s.dModel, (s) => 2 * s.dModel + s.vocab * s.dModel],
    ['gpt-j-6b.gptneo-rotary.config.json', 4, (s) => 2 * s.dModel + 4 * s.dModel * s.dModel + 2 * s.dModel * s.inner + s.inner + s.dModel,
      (s) => s.vocab * s.dModel, (s) => 2 * s.dModel + s.vocab * s.dModel + s.vocab],
    ['clinicalbert.config.json', 3, (s) => 4 * s.dModel + 4 * (s.dModel * s.dModel + s.dModel) + 2 * s.dModel * s.inner + s.inner + s.dModel,
      (s) => s.vocab * s.dModel + s.maxPositions * s.dModel + 2 * s.dModel, (s) => s.dModel * s.dModel + 3 * s.dModel + s.vocab + s.vocab * s.dModel],
  ];
  for (const [file, k, perBlock, embed, head] of cases) {
    test(`${file}: K=1 and K=${k} stage graphs have exactly the parameter bytes the config implies`, () => {
      const spec = normalizeConfig(realConfig(file));
      for (const r of [...evenSplit(spec.blocks, 1), ...evenSplit(spec.blocks, k)]) {
        const sink = new CountingSink();
        const { model, paramBytes } = buildStageGraph(spec, r, zeros, sink, { dtype: 'float32' });
        const rotary = spec.positions === 'rotary' ? 2 * spec.maxPositions * (spec.rotaryDim / 2) : 0;
        // A tied head on the stage that also holds the embeddings shares their matrix.
        const shared = r.first === 0 && r.last === spec.blocks && spec.tiedHead ? spec.vocab * spec.dModel : 0;
        const params = (r.last - r.first) * perBlock(spec) + (r.first === 0 ? embed(spec) : 0) + (r.last === spec.blocks ? head(spec) : 0) + rotary - shared;
        assert.equal(paramBytes, params * 4, `stage [${r.first}, ${r.last})`);
        assert.equal(sink.total, paramBytes);
        assert.equal(stageParamCount(stageWeights(spec, r, keyPrefix(spec, () => true))) + rotary, params);
        assert.ok(model.byteLength < 1 << 20, 'weights live in external data, not in the protobuf');
      }
      // fp16 halves the weight bytes (norms stay fp32).
      const r = evenSplit(spec.blocks, k).at(-1)!;
      const half = buildStageGraph(spec, r, zeros, new CountingSink(), { dtype: 'float16' });
      const full = buildStageGraph(spec, r, zeros, new CountingSink(), { dtype: 'float32' });
      assert.ok(half.paramBytes < full.paramBytes * 0.51 && half.paramBytes > full.paramBytes * 0.5);
    });
  }
});

describe('ORT thread spinning', () => {
  test('spins only when the stage threads fit the cores, unless STRATA_ORT_SPIN decides', () => {
    const cores = availableParallelism();
    assert.equal(ortSpin(cores, undefined), true);
    assert.equal(ortSpin(undefined, undefined), true); // ORT's default thread count: the cores
    assert.equal(ortSpin(cores + 1, undefined), false);
    assert.equal(ortSpin(1, '0'), false);
    assert.equal(ortSpin(cores + 1, '1'), true);
  });
});
