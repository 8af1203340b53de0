import type { ModelSpec } from './config.ts';
import type { BlockRange } from './range.ts';
import { IO } from './graph/io.ts';
import type { Feed } from './executor.ts';
import { BYTES_PER_ELEMENT, elementCount, type DType, type TensorData } from './tensor.ts';
import { StrataError } from './errors.ts';

// What a stage accepts, checked before anything reaches ORT (a bad request is a typed error, never an ORT crash or a
// wrong answer), and packed into the stage graph's feeds. Stage (model/stage.ts) owns caches and runs.

/** What flows into a stage for one step of one sequence batch. */
export interface StepInput {
  /** Stage 0: token ids, int64 [B, T]. */
  inputIds?: TensorData;
  /** Later stages: the previous stage's hidden states [B, T, D]. */
  hidden?: TensorData;
  /** int64 [B, T]: absolute positions. */
  positionIds: TensorData;
  /** int64 [B, past + T] for decoders (all ones: no padding), [B, T] for encoders: 1 = attend, 0 = padding. */
  attentionMask: TensorData;
  /** Last stage: which of the T positions get logits (int64 [R]). Default: all. */
  logitPositions?: TensorData;
}

/** What the feed packing needs to know of a stage. */
export interface StageShape {
  readonly spec: ModelSpec;
  readonly range: BlockRange;
  readonly actDType: DType;
  readonly isFirst: boolean;
  readonly isLast: boolean;
}

/** Position tables end at the model's context length: out-of-range ids are a request error, not an ORT crash. */
export function checkPositions(positionIds: TensorData, maxPositions: number): void {
  for (const p of positionIds.data as BigInt64Array) {
    if (p < 0n || p >= BigInt(maxPositions)) {
      throw new StrataError('prompt_too_long', `position ${p} is outside the model's context of ${maxPositions} tokens; shorten the prompt or lower max_tokens`);
    }
  }
}

/** A decoder's mask only says how long each row is: no padding (rows are ragged, each with its own length). */
export function checkCausalMask(mask: TensorData, rows: number, total: number, maxPositions: number): void {
  checkDims(mask, [rows, total], 'attention_mask', 'int64');
  if ((mask.data as BigInt64Array).some((v) => v !== 1n)) {
    throw new StrataError('attention_mask_unsupported', 'a decoder step\'s attention_mask must be all ones (past + new tokens): padding is not needed, rows keep their own lengths');
  }
  if (total > maxPositions) {
    throw new StrataError('prompt_too_long', `the session would hold ${total} tokens, more than the model's context of ${maxPositions}; shorten the prompt or lower max_tokens`);
  }
}

export function checkDims(t: TensorData, want: number[], name: string, dtype: DType): void {
  if (t.dtype !== dtype) throw new StrataError('tensor_dtype_mismatch', `${name} must be ${dtype}, got ${t.dtype}`);
  if (t.dims.length !== want.length || t.dims.some((d, i) => d !== want[i])) {
    throw new StrataError('tensor_shape_mismatch', `${name} has shape [${t.dims.join(', ')}], expected [${want.join(', ')}]`);
  }
  if (t.data.byteLength !== elementCount(t.dims) * BYTES_PER_ELEMENT[dtype]) {
    throw new StrataError('tensor_size_mismatch', `${name}: ${t.data.byteLength} bytes do not match shape [${t.dims.join(', ')}]`);
  }
}

export function checkTokenIds(ids: TensorData, vocab: number): void {
  for (const v of ids.data as BigInt64Array) {
    if (v < 0n || v >= BigInt(vocab)) throw new StrataError('token_id_out_of_range', `token id ${v} is outside the vocabulary [0, ${vocab}); check the tokenizer matches the model`);
  }
}

/**
 * One step's feeds, checked: positions, then token ids (first stage) or hidden states (later stages), then which
 * positions get logits (last stage). The attention mask and KV inputs are the caller's (they differ by family).
 */
export function stepFeeds(stage: StageShape, input: StepInput): Record<string, Feed> {
  const [batch, seq] = input.positionIds.dims;
  checkPositions(input.positionIds, stage.spec.maxPositions);
  const feeds: Record<string, Feed> = { [IO.positionIds]: input.positionIds };
  if (stage.isFirst) {
    if (!input.inputIds) throw new StrataError('stage_input_invalid', `stage ${stage.range.first}..${stage.range.last} is the first stage and needs token ids`);
    checkTokenIds(input.inputIds, stage.spec.vocab);
    feeds[IO.inputIds] = input.inputIds;
  } else {
    const h = input.hidden;
    if (!h) throw new StrataError('stage_input_invalid', `stage [${stage.range.first}, ${stage.range.last}) needs hidden states from the previous stage`);
    checkDims(h, [batch, seq, stage.spec.dModel], 'hidden_states', stage.actDType);
    feeds[IO.hiddenIn] = h;
  }
  if (stage.isLast) {
    feeds[IO.logitPositions] = input.logitPositions ?? { dtype: 'int64', dims: [seq], data: BigInt64Array.from({ length: seq }, (_, i) => BigInt(i)) };
  }
  return feeds;
}

/** Each session of a batched decode step must be one row of one new token, within its context. */
export function checkDecodeBatch(inputs: StepInput[], pasts: { slots: number[]; length: number }[], maxRows: number, maxPositions: number): void {
  if (inputs.length > maxRows) throw new StrataError('batch_input_invalid', `a batch may have at most ${maxRows} sessions here (--max-batch), got ${inputs.length}`);
  for (const [b, input] of inputs.entries()) {
    const c = pasts[b];
    if (input.positionIds.dims[0] !== 1 || input.positionIds.dims[1] !== 1 || c.slots.length !== 1) throw new StrataError('batch_input_invalid', 'only single-row decode steps (T = 1) can be batched');
    checkCausalMask(input.attentionMask, 1, c.length + 1, maxPositions);
    checkPositions(input.positionIds, maxPositions);
  }
}

/** B single-token steps (already checked by checkDecodeBatch) packed as the rows of one [B, 1] run's feeds. */
export function batchFeeds(stage: StageShape, inputs: StepInput[]): Record<string, Feed> {
  const B = inputs.length;
  const feeds: Record<string, Feed> = {
    [IO.positionIds]: { dtype: 'int64', dims: [B, 1], data: BigInt64Array.from(inputs, (i) => (i.positionIds.data as BigInt64Array)[0]) },
  };
  if (stage.isFirst) {
    const ids = { dtype: 'int64' as const, dims: [B, 1], data: BigInt64Array.from(inputs, (i) => (i.inputIds!.data as BigInt64Array)[0]) };
    checkTokenIds(ids, stage.spec.vocab);
    feeds[IO.inputIds] = ids;
  } else {
    const D = stage.spec.dModel;
    const hidden = stage.actDType === 'float16' ? new Uint16Array(B * D) : new Float32Array(B * D);
    inputs.forEach((input, b) => {
      checkDims(input.hidden!, [1, 1, D], 'hidden_states', stage.actDType);
      hidden.set(input.hidden!.data as Float32Array, b * D);
    });
    feeds[IO.hiddenIn] = { dtype: stage.actDType, dims: [B, 1, D], data: hidden };
  }
  if (stage.isLast) feeds[IO.logitPositions] = { dtype: 'int64', dims: [1], data: BigInt64Array.of(0n) };
  return feeds;
}
