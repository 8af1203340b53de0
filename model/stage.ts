import type { ModelSpec } from './config.ts';
import type { BlockRange } from './range.ts';
import { IO } from './stage-graph.ts';
import { StageSession } from './executor.ts';
import { BYTES_PER_ELEMENT, elementCount, type DType, type TensorData } from './tensor.ts';
import { StrataError } from './errors.ts';

/** What flows into a stage for one step of one sequence batch. */
export interface StepInput {
  /** Stage 0: token ids, int64 [B, T]. */
  inputIds?: TensorData;
  /** Later stages: the previous stage's hidden states [B, T, D]. */
  hidden?: TensorData;
  /** int64 [B, T]: absolute positions (left padding shifts them). */
  positionIds: TensorData;
  /** int64 [B, past + T] for decoders, [B, T] for encoders: 1 = attend, 0 = padding. */
  attentionMask: TensorData;
  /** Last stage: which of the T positions get logits (int64 [R]). Default: all. */
  logitPositions?: TensorData;
}

export interface StepOutput {
  hidden?: TensorData;
  logits?: TensorData;
  /** Last stage: the final hidden states [B, T, D] (HF's last_hidden_state). */
  lastHidden?: TensorData;
}

/** The KV cache of one session for this stage's blocks: [B, H, len, hd] per layer. */
export interface KvCache {
  length: number;
  layers: Map<number, { key: TensorData; value: TensorData }>;
}

export const kvCacheBytes = (c: KvCache): number => {
  let n = 0;
  for (const { key, value } of c.layers.values()) n += key.data.byteLength + value.data.byteLength;
  return n;
};

/** One stage (a block range and its ORT session) that steps sequences through its blocks, keeping their KV caches. */
export class Stage {
  readonly actDType: DType;

  constructor(
    readonly spec: ModelSpec,
    readonly range: BlockRange,
    readonly session: StageSession,
    dtype: 'float32' | 'float16',
  ) {
    this.actDType = dtype;
  }

  get isFirst(): boolean {
    return this.range.first === 0;
  }

  get isLast(): boolean {
    return this.range.last === this.spec.blocks;
  }

  emptyCache(batch: number): KvCache {
    const layers = new Map<number, { key: TensorData; value: TensorData }>();
    const empty = (): TensorData => ({ dtype: this.actDType, dims: [batch, this.spec.heads, 0, this.spec.headDim], data: this.actDType === 'float16' ? new Uint16Array(0) : new Float32Array(0) });
    for (let l = this.range.first; l < this.range.last; l++) layers.set(l, { key: empty(), value: empty() });
    return { length: 0, layers };
  }

  /** Runs one step. For decoders `cache` is read as past and replaced by present (pass null for encoders). */
  async step(input: StepInput, cache: KvCache | null): Promise<StepOutput> {
    const [batch, seq] = input.positionIds.dims;
    const feeds: Record<string, TensorData> = { [IO.positionIds]: input.positionIds, [IO.attentionMask]: input.attentionMask };
    if (this.isFirst) {
      if (!input.inputIds) throw new StrataError('stage_input_invalid', `stage ${this.range.first}..${this.range.last} is the first stage and needs token ids`);
      checkTokenIds(input.inputIds, this.spec.vocab);
      feeds[IO.inputIds] = input.inputIds;
    } else {
      const h = input.hidden;
      if (!h) throw new StrataError('stage_input_invalid', `stage [${this.range.first}, ${this.range.last}) needs hidden states from the previous stage`);
      checkDims(h, [batch, seq, this.spec.dModel], 'hidden_states', this.actDType);
      feeds[IO.hiddenIn] = h;
    }
    if (this.spec.causal) {
      if (!cache) throw new StrataError('stage_input_invalid', 'decoder stages need a KV cache');
      const expectMask = cache.length + seq;
      checkDims(input.attentionMask, [batch, expectMask], 'attention_mask', 'int64');
      for (const [l, kv] of cache.layers) {
        feeds[IO.pastKey(l)] = kv.key;
        feeds[IO.pastValue(l)] = kv.value;
      }
    } else {
      checkDims(input.attentionMask, [batch, seq], 'attention_mask', 'int64');
    }
    if (this.isLast) {
      feeds[IO.logitPositions] = input.logitPositions ?? { dtype: 'int64', dims: [seq], data: BigInt64Array.from({ length: seq }, (_, i) => BigInt(i)) };
    }
    const out = await this.session.run(feeds);
    if (cache) {
      for (const l of cache.layers.keys()) cache.layers.set(l, { key: out[IO.presentKey(l)], value: out[IO.presentValue(l)] });
      cache.length += seq;
    }
    return this.isLast ? { logits: out[IO.logits], lastHidden: out[IO.lastHidden] } : { hidden: out[IO.hiddenOut] };
  }
}

function checkDims(t: TensorData, want: number[], name: string, dtype: DType): void {
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
