import { StrataError } from './errors.ts';

/** Next-token selection, as Hugging Face `generate` configures it. Absent or 0 temperature = greedy. */
export interface SamplingParams {
  temperature?: number;
  /** 0 or absent: no top-k filter. */
  topK?: number;
  /** 1 or absent: no nucleus filter. */
  topP?: number;
  /** 1 or absent: no penalty. */
  repetitionPenalty?: number;
  seed?: number;
}

const bad = (message: string) => new StrataError('invalid_sampling', message);

export function validateSamplingParams(p: SamplingParams): void {
  const { temperature, topK, topP, repetitionPenalty, seed } = p;
  if (temperature !== undefined && !(Number.isFinite(temperature) && temperature >= 0)) {
    throw bad(`temperature must be a finite number >= 0 (0 = greedy), got ${temperature}`);
  }
  if (topK !== undefined && !(Number.isInteger(topK) && topK >= 0)) throw bad(`top_k must be an integer >= 0 (0 = off), got ${topK}`);
  if (topP !== undefined && !(topP > 0 && topP <= 1)) throw bad(`top_p must be in (0, 1] (1 = off), got ${topP}`);
  if (repetitionPenalty !== undefined && !(Number.isFinite(repetitionPenalty) && repetitionPenalty > 0)) {
    throw bad(`repetition_penalty must be a finite number > 0 (1 = off), got ${repetitionPenalty}`);
  }
  if (seed !== undefined && !Number.isSafeInteger(seed)) throw bad(`seed must be an integer, got ${seed}`);
}

/**
 * Uniform [0, 1) generator. Seeded: mulberry32, so the same seed gives the same tokens on every machine and
 * in every stage replica. Unseeded: a random seed. Seeds above 2^32 are folded, not truncated, so they differ.
 */
export function createRng(seed?: number): () => number {
  let state = seed === undefined ? (Math.random() * 2 ** 32) >>> 0 : (seed % 2 ** 32) ^ Math.floor(seed / 2 ** 32);
  return () => {
    state = (state + 0x6d2b79f5) | 0;
    let t = Math.imul(state ^ (state >>> 15), 1 | state);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

/** torch.argmax: the first maximum wins. NaN never wins (torch would pick it; a NaN logit is a bug upstream). */
function argmax(x: Float32Array): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best] || Number.isNaN(x[best])) best = i;
  return best;
}

/**
 * CTRL-style repetition penalty (HF RepetitionPenaltyLogitsProcessor): every id seen so far, once however often
 * it appeared, has its logit divided by the penalty when positive and multiplied when negative. Works on a copy;
 * the Float32Array store rounds each result to float32 exactly as torch does.
 */
function penalize(logits: Float32Array, penalty: number, previousIds: readonly number[]): Float32Array {
  if (penalty === 1 || previousIds.length === 0) return logits;
  const out = new Float32Array(logits);
  for (const id of new Set(previousIds)) {
    if (id >= 0 && id < out.length) out[id] = logits[id] < 0 ? logits[id] * penalty : logits[id] / penalty;
  }
  return out;
}

/** Indices of the k largest values, plus any tied with the k-th (HF keeps ties: it removes only `< kth`). */
function topKIndices(x: Float32Array, k: number): number[] {
  // Min-heap of the best k so far: O(V log k), no full sort of a 50k vocabulary.
  const heap: number[] = [];
  const less = (a: number, b: number) => x[heap[a]] < x[heap[b]];
  const swap = (a: number, b: number) => { [heap[a], heap[b]] = [heap[b], heap[a]]; };
  const siftDown = (i: number) => {
    for (;;) {
      const l = 2 * i + 1, r = l + 1;
      let m = i;
      if (l < heap.length && less(l, m)) m = l;
      if (r < heap.length && less(r, m)) m = r;
      if (m === i) return;
      swap(i, m);
      i = m;
    }
  };
  for (let i = 0; i < x.length; i++) {
    if (Number.isNaN(x[i])) continue;
    if (heap.length < k) {
      heap.push(i);
      for (let j = heap.length - 1; j > 0 && less(j, (j - 1) >> 1); j = (j - 1) >> 1) swap(j, (j - 1) >> 1);
    } else if (x[i] > x[heap[0]]) {
      heap[0] = i;
      siftDown(0);
    }
  }
  const kth = x[heap[0]];
  const kept: number[] = [];
  for (let i = 0; i < x.length; i++) if (x[i] >= kth) kept.push(i);
  return kept;
}

/**
 * Picks the next token from one row of logits. Order as HF `generate`: repetition penalty, then (sampling only)
 * temperature, top-k, top-p, softmax, draw. Greedy ignores top-k/top-p, as HF does without do_sample.
 */
export function selectNextToken(logits: Float32Array, params: SamplingParams, rng: () => number, previousIds: readonly number[]): number {
  validateSamplingParams(params);
  const x = penalize(logits, params.repetitionPenalty ?? 1, previousIds);
  const temperature = params.temperature ?? 0;
  if (temperature === 0) return argmax(x);

  const topK = params.topK ?? 0;
  const topP = params.topP ?? 1;
  // Candidates, and their logits already divided by the temperature (in double; the draw needs no float32 parity).
  let ids: number[] | null = topK > 0 && topK < x.length ? topKIndices(x, topK) : null;
  const count = ids ? ids.length : x.length;
  const scaled = new Float64Array(count);
  let max = -Infinity;
  for (let j = 0; j < count; j++) {
    const v = x[ids ? ids[j] : j] / temperature;
    scaled[j] = Number.isNaN(v) ? -Infinity : v;
    if (scaled[j] > max) max = scaled[j];
  }
  if (max === -Infinity) return argmax(x); // nothing is drawable (all -inf): fall back like an all-masked row
  const probs = new Float64Array(count);
  let sum = 0;
  for (let j = 0; j < count; j++) sum += probs[j] = Math.exp(scaled[j] - max);

  if (topP < 1) {
    // HF TopPLogitsWarper: sorted ascending, drop tokens whose cumulative prob is <= 1 - top_p; i.e. walking down
    // from the top, keep each token while the mass above it is < top_p. A token with p <= (1 - top_p) / V lies
    // in that dropped tail whatever the others are (everything at or below it weighs <= V·p), so only the
    // survivors of that cheap test need sorting.
    const tail = ((1 - topP) * sum) / count;
    let order: number[] = [];
    // The most probable token (weight exactly exp(0) = 1) always survives: HF keeps min_tokens_to_keep = 1, and a
    // top_p so small that 1 - top_p rounds to 1 would otherwise drop everything.
    for (let j = 0; j < count; j++) if (probs[j] > tail || probs[j] === 1) order.push(j);
    order.sort((a, b) => probs[b] - probs[a] || a - b);
    let above = 0;
    let keep = 0;
    while (keep < order.length && (keep === 0 || above < topP * sum)) above += probs[order[keep++]];
    order = order.slice(0, keep);
    const idsBefore = ids;
    ids = order.map((j) => (idsBefore ? idsBefore[j] : j));
    const kept = order.map((j) => probs[j]);
    return draw(ids, kept, above, rng);
  }
  return draw(ids, probs, sum, rng);
}

/** Inverse-CDF draw over unnormalised weights; `ids` null means position = token id. */
function draw(ids: number[] | null, weights: ArrayLike<number>, total: number, rng: () => number): number {
  const u = rng() * total;
  let acc = 0;
  let last = 0;
  for (let j = 0; j < weights.length; j++) {
    if (weights[j] === 0) continue;
    acc += weights[j];
    last = j;
    if (u < acc) return ids ? ids[j] : j;
  }
  return ids ? ids[last] : last; // rounding left u just past the end: the last drawable token
}

/** First occurrence of any stop string in the generated text (earliest position wins), or null. */
export function stopSequenceHit(text: string, stops: string[]): { index: number; stop: string } | null {
  let hit: { index: number; stop: string } | null = null;
  for (const stop of stops) {
    if (stop.length === 0) continue;
    const index = text.indexOf(stop);
    if (index >= 0 && (hit === null || index < hit.index)) hit = { index, stop };
  }
  return hit;
}
