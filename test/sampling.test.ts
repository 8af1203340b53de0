import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRng, selectNextToken, stopSequenceHit, validateSamplingParams, type SamplingParams } from '../model/sampling.ts';
import { StrataError } from '../model/errors.ts';
import { finishStep, greedyOnly, type PipelineStep } from '../model/generation.ts';

const logits = (...v: number[]) => Float32Array.from(v);
const draws = (x: Float32Array, p: SamplingParams, n: number, seed = p.seed) => {
  const rng = createRng(seed);
  return Array.from({ length: n }, () => selectNextToken(x, p, rng, []));
};
/** A vocabulary-sized row with a few peaks, like real logits. */
function realistic(seed: number, vocab = 50257): Float32Array {
  const rng = createRng(seed);
  return Float32Array.from({ length: vocab }, () => (rng() - 0.5) * 8 + (rng() < 0.001 ? 10 : 0));
}

test('greedy (no or zero temperature) is argmax; ties go to the lowest id like torch.argmax', () => {
  const x = logits(0.1, 2.5, -1, 2.5, 0);
  assert.equal(selectNextToken(x, {}, createRng(1), []), 1);
  assert.equal(selectNextToken(x, { temperature: 0, topK: 3, topP: 0.5 }, createRng(1), []), 1);
  const big = realistic(3);
  let best = 0;
  big.forEach((v, i) => { if (v > big[best]) best = i; });
  assert.equal(selectNextToken(big, {}, createRng(), []), best);
  assert.equal(selectNextToken(logits(-Infinity, -Infinity), {}, createRng(), []), 0);
});

test('sampling is reproducible for a seed, and different seeds give different draws', () => {
  const x = realistic(7, 1000);
  const p = { temperature: 1.5, seed: 42 };
  assert.deepEqual(draws(x, p, 200), draws(x, p, 200));
  assert.notDeepEqual(draws(x, p, 200), draws(x, { ...p, seed: 43 }, 200));
  // seeds past 2^32 are folded in, not truncated away
  assert.notDeepEqual(draws(x, p, 50, 5), draws(x, p, 50, 5 + 2 ** 32));
  assert.equal(new Set(draws(x, p, 200)).size > 20, true, 'temperature 1.5 over 1000 tokens should spread');
});

test('top_k=1 and a tiny top_p both reduce to greedy', () => {
  const x = realistic(11);
  const greedy = selectNextToken(x, {}, createRng(), []);
  for (const seed of [1, 2, 3, 4, 5]) {
    assert.equal(selectNextToken(x, { temperature: 2, topK: 1 }, createRng(seed), []), greedy);
    assert.equal(selectNextToken(x, { temperature: 2, topP: 1e-9 }, createRng(seed), []), greedy);
  }
});

test('temperature 1 draws follow softmax(logits)', () => {
  const x = logits(1, 2, 0.5, -1, 3);
  const z = [...x].map(Math.exp);
  const probs = z.map((v) => v / z.reduce((a, b) => a + b));
  const n = 20000;
  const counts = new Array(x.length).fill(0);
  for (const id of draws(x, { temperature: 1 }, n, 1234)) counts[id]++;
  counts.forEach((c, i) => assert.ok(Math.abs(c / n - probs[i]) < 0.02, `token ${i}: ${c / n} vs ${probs[i]}`));
});

test('temperature sharpens and flattens the distribution', () => {
  const x = logits(0, 1);
  const share = (t: number) => draws(x, { temperature: t }, 5000, 9).filter((id) => id === 1).length / 5000;
  assert.ok(share(0.25) > 0.95); // e^4 / (1 + e^4) ≈ 0.982
  assert.ok(Math.abs(share(100) - 0.5) < 0.03);
});

test('top_k keeps exactly the k best (and ties with the k-th), top_p keeps the nucleus', () => {
  const x = logits(5, 4, 3, 2, 1, 0);
  const seen = (p: SamplingParams) => new Set(draws(x, { temperature: 10, ...p }, 3000, 5));
  assert.deepEqual([...seen({ topK: 3 })].sort(), [0, 1, 2]);
  assert.deepEqual([...new Set(draws(logits(3, 1, 3, 0, 3), { temperature: 1, topK: 2 }, 2000, 5))].sort(), [0, 2, 4]);
  // temperature 1: probs ≈ .636 .234 .086 .032 .012 .004. top_p .85 needs the first two (.87 ≥ .85)
  const x1 = (p: SamplingParams) => new Set(draws(x, { temperature: 1, ...p }, 3000, 5));
  assert.deepEqual([...x1({ topP: 0.85 })].sort(), [0, 1]);
  assert.deepEqual([...x1({ topP: 0.9 })].sort(), [0, 1, 2]);
  assert.deepEqual([...x1({ topP: 0.5 })], [0]);
  // top_k then top_p on a full-size vocabulary
  const big = realistic(13);
  const chosen = new Set(draws(big, { temperature: 1, topK: 40, topP: 0.9 }, 500, 1));
  const top40 = [...big.keys()].sort((a, b) => big[b] - big[a]).slice(0, 40);
  for (const id of chosen) assert.ok(top40.includes(id));
});

test('repetition penalty divides positive and multiplies negative logits of seen ids, as HF does', () => {
  const x = logits(2.0, 1.5, -0.5, -0.6);
  assert.equal(selectNextToken(x, { repetitionPenalty: 1.5 }, createRng(), [0]), 1); // 2.0/1.5 = 1.33 < 1.5
  assert.equal(selectNextToken(x, { repetitionPenalty: 1.5 }, createRng(), [0, 0, 0]), 1); // once, however often seen
  const neg = logits(-1, -0.6, -0.7);
  assert.equal(selectNextToken(neg, { repetitionPenalty: 2 }, createRng(), [1]), 2); // -0.6·2 = -1.2
  assert.equal(selectNextToken(x, { repetitionPenalty: 0.5 }, createRng(), [3]), 0); // < 1 rewards: -0.6·0.5 = -0.3
  assert.equal(x[0], 2.0, 'the caller’s logits are not modified');
});

test('invalid sampling parameters throw invalid_sampling', () => {
  const bad: SamplingParams[] = [
    { temperature: -1 }, { temperature: NaN }, { topP: 0 }, { topP: 1.5 }, { topK: -1 }, { topK: 2.5 },
    { repetitionPenalty: 0 }, { repetitionPenalty: -1 }, { seed: 1.5 },
  ];
  for (const p of bad) {
    assert.throws(() => validateSamplingParams(p), (e: unknown) => e instanceof StrataError && e.code === 'invalid_sampling', JSON.stringify(p));
    assert.throws(() => selectNextToken(logits(1, 2), p, createRng(), []), StrataError);
  }
  validateSamplingParams({ temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: 0 });
});

test('stopSequenceHit finds the earliest stop string', () => {
  assert.deepEqual(stopSequenceHit('abc\n\nUser: hi', ['User:', '\n\n']), { index: 3, stop: '\n\n' });
  assert.equal(stopSequenceHit('nothing here', ['###', '']), null);
  assert.equal(stopSequenceHit('x', []), null);
});

test('sampling a 50k vocabulary stays cheap', () => {
  const x = realistic(17);
  const rng = createRng(1);
  const t0 = performance.now();
  for (let i = 0; i < 50; i++) selectNextToken(x, { temperature: 0.8, topK: 50 }, rng, [1, 2, 3]);
  for (let i = 0; i < 50; i++) selectNextToken(x, { temperature: 0.8, topP: 0.95 }, rng, []);
  const perCall = (performance.now() - t0) / 100;
  assert.ok(perCall < 20, `${perCall.toFixed(2)} ms per token`);
});

test('a top_p below float precision still keeps the most probable token (HF min_tokens_to_keep = 1)', () => {
  const logits = Float32Array.from([0.5, 3, 1]);
  for (const topK of [undefined, 1, 2]) {
    assert.equal(selectNextToken(logits, { temperature: 1, topP: 1e-20, topK }, createRng(1), []), 1);
  }
});

test('greedyOnly: temperature 0 without a penalty, logprobs or pooling; finishStep reads such a step\'s token from the graph\'s argmax', () => {
  const base = { inputIds: null, positionIds: { dtype: 'int64', dims: [2, 3], data: new BigInt64Array(6) }, attentionMask: { dtype: 'int64', dims: [2, 3], data: new BigInt64Array(6).fill(1n) } } as never as PipelineStep;
  const sel = (sampling: SamplingParams) => ({ ...base, select: { sampling, history: [[], []], step: 0 } });
  assert.equal(greedyOnly(sel({})), true);
  assert.equal(greedyOnly(sel({ temperature: 0, topK: 5, seed: 3 })), true, 'top_k and seed do nothing at temperature 0');
  assert.equal(greedyOnly(sel({ temperature: 0.7 })), false);
  assert.equal(greedyOnly(sel({ repetitionPenalty: 1.2 })), false);
  assert.equal(greedyOnly({ ...sel({}), logprobs: { top: 2, targets: [[-1], [-1]] } } as PipelineStep), false);
  assert.equal(greedyOnly({ ...sel({}), output: 'hidden_mean' }), false);
  assert.equal(greedyOnly(base), false, 'no selection: the caller wants the logits');
  // [B = 2, R = 3] argmax rows: each batch row's token is its last requested row's.
  const nextTokens = { dtype: 'int64' as const, dims: [2, 3], data: BigInt64Array.of(1n, 2n, 3n, 4n, 5n, 6n) };
  assert.deepEqual(finishStep({ nextTokens }, sel({})).tokens, [3, 6]);
  assert.throws(() => finishStep({ nextTokens }, sel({ temperature: 0, topP: 2 })), (e: unknown) => e instanceof StrataError && e.code === 'invalid_sampling');
});
