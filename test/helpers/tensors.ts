import type { TensorData } from '../../model/tensor.ts';

/** Rows of ids as an int64 [rows, cols] tensor (a step's input_ids, position_ids or attention_mask). */
export const i64 = (rows: number[][]): TensorData => ({ dtype: 'int64', dims: [rows.length, rows[0].length], data: BigInt64Array.from(rows.flat(), BigInt) });

/** Index of the largest value of a float32 tensor (the greedy token of one row of logits). */
export const argmax = (t: TensorData): number => {
  const d = t.data as Float32Array;
  let best = 0;
  for (let i = 1; i < d.length; i++) if (d[i] > d[best]) best = i;
  return best;
};
