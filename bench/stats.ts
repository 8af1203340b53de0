/** Summary statistics over raw samples: every figure the bench reports is computed from the samples themselves. */

export interface Summary {
  n: number;
  mean: number;
  min: number;
  p50: number;
  p95: number;
  max: number;
}

/**
 * The q-th percentile (q in [0, 100]) of `samples`, by linear interpolation between the closest ranks (NumPy's
 * default, "type 7"). NaN for an empty list.
 */
export function percentile(samples: readonly number[], q: number): number {
  if (!(q >= 0 && q <= 100)) throw new RangeError(`percentile must be in [0, 100], got ${q}`);
  if (samples.length === 0) return NaN;
  const sorted = [...samples].sort((a, b) => a - b);
  const pos = ((sorted.length - 1) * q) / 100;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

export const median = (samples: readonly number[]): number => percentile(samples, 50);

export const mean = (samples: readonly number[]): number => (samples.length === 0 ? NaN : samples.reduce((a, b) => a + b, 0) / samples.length);

export const sum = (samples: readonly number[]): number => samples.reduce((a, b) => a + b, 0);

export function summarize(samples: readonly number[]): Summary {
  if (samples.length === 0) return { n: 0, mean: NaN, min: NaN, p50: NaN, p95: NaN, max: NaN };
  let min = Infinity;
  let max = -Infinity;
  for (const s of samples) {
    if (s < min) min = s;
    if (s > max) max = s;
  }
  return { n: samples.length, mean: mean(samples), min, p50: percentile(samples, 50), p95: percentile(samples, 95), max };
}

/** value / baseline, NaN when either is missing or the baseline is zero. */
export const ratio = (value: number, baseline: number): number => (Number.isFinite(value) && Number.isFinite(baseline) && baseline !== 0 ? value / baseline : NaN);
