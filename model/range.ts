import { StrataError } from './errors.ts';

/** A contiguous slice of a model's transformer blocks, `[first, last)`. */
export interface BlockRange {
  first: number;
  last: number;
}

export function checkRange(range: BlockRange, blocks: number): BlockRange {
  const { first, last } = range;
  if (!Number.isInteger(first) || !Number.isInteger(last) || first < 0 || last > blocks || first >= last) {
    throw new StrataError('invalid_block_range', `block range [${first}, ${last}) is not a non-empty slice of [0, ${blocks})`);
  }
  return range;
}

/** K contiguous, balanced ranges covering every block (sizes differ by at most one; earlier stages get the extra). */
export function evenSplit(blocks: number, stages: number): BlockRange[] {
  if (!Number.isInteger(stages) || stages < 1 || stages > blocks) {
    throw new StrataError('invalid_stage_count', `--stages must be between 1 and the model's ${blocks} blocks (got ${stages})`);
  }
  const base = Math.floor(blocks / stages);
  const extra = blocks % stages;
  const ranges: BlockRange[] = [];
  let first = 0;
  for (let s = 0; s < stages; s++) {
    const last = first + base + (s < extra ? 1 : 0);
    ranges.push({ first, last });
    first = last;
  }
  return ranges;
}

export const rangeLabel = (r: BlockRange): string => `[${r.first}, ${r.last})`;
