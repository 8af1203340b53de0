import { float16ToFloat32 } from './dtype.ts';
import type { TensorData } from './tensor.ts';

/**
 * Log-probabilities as the last stage reports them: the log-softmax of a logit row (float32 logits, the sum in
 * float64, each value rounded to float32), for one target token and the row's N most likely tokens. Only these
 * 1 + N values per row leave the last stage, never the vocabulary-wide row.
 */

/** The most tokens one row may report (OpenAI's and vLLM's completions limit). */
export const MAX_TOP_LOGPROBS = 20;

/** Asks the last stage for log-probabilities of every logit row it computes. */
export interface LogprobRequest {
  /** How many of the most likely tokens to report per row (0..MAX_TOP_LOGPROBS). */
  top: number;
  /**
   * Per batch row, per logit row: the token whose log-probability to report (-1: none). With `select`, the last
   * logit row's target is the token the stage chooses.
   */
  targets: number[][];
}

export interface TopLogprob {
  id: number;
  logprob: number;
}

/** One logit row's report: the target (token -1 when none was asked) and the top N, most likely first. */
export interface RowLogprobs {
  token: number;
  logprob: number;
  top: TopLogprob[];
}

/** Log-softmax report of one row: `target`'s value and the `top` most likely (ties: lower id first). */
export function rowLogprobs(row: Float32Array, target: number, top: number): RowLogprobs {
  const n = row.length;
  let max = -Infinity;
  for (let i = 0; i < n; i++) if (row[i] > max) max = row[i];
  let sum = 0;
  for (let i = 0; i < n; i++) sum += Math.exp(row[i] - max);
  const lse = max + Math.log(sum);
  // The N best by insertion into a sorted run of at most N (N <= 20 against a vocabulary of ~50k): most values
  // fall below the run's floor and cost one comparison.
  const ids = new Int32Array(top);
  const vals = new Float32Array(top);
  let count = 0;
  let floor = -Infinity;
  for (let i = 0; i < n && top > 0; i++) {
    const v = row[i];
    if (count === top && v <= floor) continue;
    let at = count < top ? count++ : top - 1;
    for (; at > 0 && vals[at - 1] < v; at--) (vals[at] = vals[at - 1]), (ids[at] = ids[at - 1]);
    vals[at] = v;
    ids[at] = i;
    if (count === top) floor = vals[top - 1];
  }
  const lp = (id: number) => Math.fround(row[id] - lse);
  const known = Number.isInteger(target) && target >= 0 && target < n;
  return { token: known ? target : -1, logprob: known ? lp(target) : 0, top: Array.from(ids.subarray(0, count), (id) => ({ id, logprob: lp(id) })) };
}

/** Applies a LogprobRequest to logits [B, R, V]; `chosen` (one per batch row) replaces each last row's target. */
export function logprobsOf(logits: TensorData, req: LogprobRequest, chosen?: number[]): RowLogprobs[][] {
  const [batch, rows, vocab] = logits.dims;
  const data = logits.dtype === 'float16' ? float16ToFloat32(logits.data as Uint16Array) : (logits.data as Float32Array);
  const out: RowLogprobs[][] = [];
  for (let b = 0; b < batch; b++) {
    const rowsOut: RowLogprobs[] = [];
    for (let r = 0; r < rows; r++) {
      const target = chosen && r === rows - 1 ? chosen[b] : (req.targets[b]?.[r] ?? -1);
      const start = (b * rows + r) * vocab;
      rowsOut.push(rowLogprobs(data.subarray(start, start + vocab), target, req.top));
    }
    out.push(rowsOut);
  }
  return out;
}

/** Flat wire form: per row [target, top…] ids and values, `rows` rows per batch row. */
export interface FlatLogprobs {
  top: number;
  rows: number;
  ids: number[];
  values: number[];
}

export function flattenLogprobs(lp: RowLogprobs[][], top: number): FlatLogprobs {
  const ids: number[] = [];
  const values: number[] = [];
  for (const batchRow of lp) {
    for (const r of batchRow) {
      ids.push(r.token, ...r.top.map((t) => t.id));
      values.push(r.logprob, ...r.top.map((t) => t.logprob));
      // A vocabulary smaller than `top` reports fewer: pad so every row keeps its width.
      for (let i = r.top.length; i < top; i++) ids.push(-1), values.push(0);
    }
  }
  return { top, rows: lp[0]?.length ?? 0, ids, values };
}

export function unflattenLogprobs(f: FlatLogprobs): RowLogprobs[][] {
  const width = f.top + 1;
  const perBatch = f.rows * width;
  if (f.rows === 0 || f.ids.length !== f.values.length || f.ids.length % perBatch !== 0) return [];
  const out: RowLogprobs[][] = [];
  for (let b = 0; b < f.ids.length / perBatch; b++) {
    const rows: RowLogprobs[] = [];
    for (let r = 0; r < f.rows; r++) {
      const at = b * perBatch + r * width;
      const top: TopLogprob[] = [];
      for (let i = 1; i < width; i++) if (f.ids[at + i] >= 0) top.push({ id: f.ids[at + i], logprob: f.values[at + i] });
      rows.push({ token: f.ids[at], logprob: f.values[at], top });
    }
    out.push(rows);
  }
  return out;
}
