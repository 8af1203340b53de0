import { KvBufferPool } from './kv-pool.ts';
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

/**
 * The KV cache of one session for this stage's blocks. Its tensors [Bt, H, Pt, hd] may be shared with the other
 * sessions of a batched run: this session's rows are [row, row + batch) and its positions [offset, offset + length).
 * Sharing lets a batch that meets again next step feed last step's present tensors as past without a copy.
 */
export interface KvCache {
  length: number;
  layers: Map<number, { key: TensorData; value: TensorData }>;
  row: number;
  offset: number;
  batch: number;
}

export const kvCacheBytes = (c: KvCache): number => {
  const first = c.layers.values().next().value;
  if (!first) return 0;
  const [, heads, , headDim] = first.key.dims;
  return c.layers.size * 2 * c.batch * heads * c.length * headDim * BYTES_PER_ELEMENT[first.key.dtype];
};

/** True when the cache's tensors hold exactly this session (no other rows, no padding): feed them as they are. */
const isExact = (c: KvCache): boolean => {
  const t = c.layers.values().next().value?.key;
  return !t || (c.row === 0 && c.offset === 0 && t.dims[0] === c.batch && t.dims[2] === c.length);
};

/** A stable number per KV tensor, to group sessions that share one. */
const tensorIds = new WeakMap<object, number>();
let nextTensorId = 0;
function tensorId(c: KvCache): number {
  const t = c.layers.values().next().value?.key;
  if (!t) return -1;
  let id = tensorIds.get(t);
  if (id === undefined) tensorIds.set(t, (id = nextTensorId++));
  return id;
}

/**
 * Gathers the caches of several sessions into fresh [sum(batch), H, P, hd] tensors, each session's positions
 * right-aligned (left padding, masked out by the attention mask).
 */
function packCaches(caches: KvCache[], P: number, dtype: DType, heads: number, headDim: number): Map<number, { key: TensorData; value: TensorData }> {
  const rows = caches.reduce((n, c) => n + c.batch, 0);
  const out = new Map<number, { key: TensorData; value: TensorData }>();
  const alloc = (): TensorData => ({ dtype, dims: [rows, heads, P, headDim], data: dtype === 'float16' ? new Uint16Array(rows * heads * P * headDim) : new Float32Array(rows * heads * P * headDim) });
  for (const layer of caches[0].layers.keys()) {
    const key = alloc();
    const value = alloc();
    let dstRow = 0;
    for (const c of caches) {
      const src = c.layers.get(layer)!;
      const [, , srcP] = src.key.dims;
      for (let r = 0; r < c.batch; r++, dstRow++) {
        for (let h = 0; h < heads; h++) {
          const from = (((c.row + r) * heads + h) * srcP + c.offset) * headDim;
          const to = ((dstRow * heads + h) * P + (P - c.length)) * headDim;
          const n = c.length * headDim;
          (key.data as Float32Array).set((src.key.data as Float32Array).subarray(from, from + n), to);
          (value.data as Float32Array).set((src.value.data as Float32Array).subarray(from, from + n), to);
        }
      }
    }
    out.set(layer, { key, value });
  }
  return out;
}

/** One stage (a block range and its ORT session) that steps sequences through its blocks, keeping their KV caches. */
export class Stage {
  readonly actDType: DType;

  private readonly kvPool = new KvBufferPool();

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
    return { length: 0, layers, row: 0, offset: 0, batch };
  }

  /** Output buffers for this step's present KV tensors [B, H, total, hd], filled by ORT in place. */
  private presentBuffers(batch: number, total: number): Record<string, TensorData> {
    if (!this.spec.causal) return {};
    const make = (): TensorData => this.kvPool.alloc(this.actDType, [batch, this.spec.heads, total, this.spec.headDim]);
    const out: Record<string, TensorData> = {};
    for (let l = this.range.first; l < this.range.last; l++) {
      out[IO.presentKey(l)] = make();
      out[IO.presentValue(l)] = make();
    }
    return out;
  }

  /** Position tables end at the model's context length: out-of-range ids are a request error, not an ORT crash. */
  private checkPositions(positionIds: TensorData): void {
    for (const p of positionIds.data as BigInt64Array) {
      if (p < 0n || p >= BigInt(this.spec.maxPositions)) {
        throw new StrataError('prompt_too_long', `position ${p} is outside the model's context of ${this.spec.maxPositions} tokens; shorten the prompt or lower max_tokens`);
      }
    }
  }

  /** Runs one step. For decoders `cache` is read as past and replaced by present (pass null for encoders). */
  async step(input: StepInput, cache: KvCache | null): Promise<StepOutput> {
    const [batch, seq] = input.positionIds.dims;
    this.checkPositions(input.positionIds);
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
    let exclusive = false; // whether the past tensors are this session's alone (then they can be recycled)
    if (this.spec.causal) {
      if (!cache) throw new StrataError('stage_input_invalid', 'decoder stages need a KV cache');
      const expectMask = cache.length + seq;
      checkDims(input.attentionMask, [batch, expectMask], 'attention_mask', 'int64');
      exclusive = isExact(cache);
      const past = exclusive ? cache.layers : packCaches([cache], cache.length, this.actDType, this.spec.heads, this.spec.headDim);
      for (const [l, kv] of past) {
        feeds[IO.pastKey(l)] = kv.key;
        feeds[IO.pastValue(l)] = kv.value;
      }
    } else {
      checkDims(input.attentionMask, [batch, seq], 'attention_mask', 'int64');
    }
    if (this.isLast) {
      feeds[IO.logitPositions] = input.logitPositions ?? { dtype: 'int64', dims: [seq], data: BigInt64Array.from({ length: seq }, (_, i) => BigInt(i)) };
    }
    const out = await this.session.run(feeds, cache ? this.presentBuffers(batch, cache.length + seq) : {});
    if (cache) {
      // A new map: after a batched run the old one is shared with the batch's other sessions.
      const layers = new Map([...cache.layers.keys()].map((l) => [l, { key: out[IO.presentKey(l)], value: out[IO.presentValue(l)] }]));
      if (exclusive) this.kvPool.release(cache.layers.values());
      Object.assign(cache, { layers, length: cache.length + seq, row: 0, offset: 0 });
    }
    return this.isLast ? { logits: out[IO.logits], lastHidden: out[IO.lastHidden] } : { hidden: out[IO.hiddenOut] };
  }

  /**
   * One decode step (T = 1) of several sessions as ONE ORT run: their caches are left-padded to a common length
   * and the padding masked out, so each session computes what it would alone. When the same sessions met in the
   * previous run, in the same order, last run's present tensors are fed back as past without copying.
   */
  async stepBatch(inputs: StepInput[], caches: KvCache[]): Promise<StepOutput[]> {
    // Sessions arrive in any order: run them in the order of their last batch so its tensors can be reused as is.
    const order = [...caches.keys()].sort((a, b) => tensorId(caches[a]) - tensorId(caches[b]) || caches[a].row - caches[b].row);
    if (order.some((o, i) => o !== i)) {
      const outs = await this.stepBatch(order.map((o) => inputs[o]), order.map((o) => caches[o]));
      const back: StepOutput[] = new Array(outs.length);
      order.forEach((o, i) => (back[o] = outs[i]));
      return back;
    }
    const B = inputs.length;
    for (const [b, input] of inputs.entries()) {
      const c = caches[b];
      if (input.positionIds.dims[0] !== 1 || input.positionIds.dims[1] !== 1 || c.batch !== 1) throw new StrataError('batch_input_invalid', 'only single-row decode steps (T = 1) can be batched');
      checkDims(input.attentionMask, [1, c.length + 1], 'attention_mask', 'int64');
    }
    const shared = caches[0].layers.values().next().value!.key;
    const reuse = caches.every((c, b) => c.layers.values().next().value!.key === shared && c.row === b && c.offset + c.length === shared.dims[2]) && shared.dims[0] === B;
    const P = reuse ? shared.dims[2] : Math.max(...caches.map((c) => c.length));
    const past = reuse ? caches[0].layers : packCaches(caches, P, this.actDType, this.spec.heads, this.spec.headDim);
    const offsets = caches.map((c) => (reuse ? c.offset : P - c.length));

    inputs.forEach((i) => this.checkPositions(i.positionIds));
    const mask = new BigInt64Array(B * (P + 1));
    inputs.forEach((input, b) => mask.set(input.attentionMask.data as BigInt64Array, b * (P + 1) + offsets[b]));
    const feeds: Record<string, TensorData> = {
      [IO.positionIds]: { dtype: 'int64', dims: [B, 1], data: BigInt64Array.from(inputs, (i) => (i.positionIds.data as BigInt64Array)[0]) },
      [IO.attentionMask]: { dtype: 'int64', dims: [B, P + 1], data: mask },
    };
    if (this.isFirst) {
      const ids = { dtype: 'int64' as const, dims: [B, 1], data: BigInt64Array.from(inputs, (i) => (i.inputIds!.data as BigInt64Array)[0]) };
      checkTokenIds(ids, this.spec.vocab);
      feeds[IO.inputIds] = ids;
    } else {
      const D = this.spec.dModel;
      const hidden = this.actDType === 'float16' ? new Uint16Array(B * D) : new Float32Array(B * D);
      inputs.forEach((input, b) => {
        checkDims(input.hidden!, [1, 1, D], 'hidden_states', this.actDType);
        hidden.set(input.hidden!.data as Float32Array, b * D);
      });
      feeds[IO.hiddenIn] = { dtype: this.actDType, dims: [B, 1, D], data: hidden };
    }
    if (this.isLast) feeds[IO.logitPositions] = { dtype: 'int64', dims: [1], data: BigInt64Array.of(0n) };
    for (const [l, kv] of past) {
      feeds[IO.pastKey(l)] = kv.key;
      feeds[IO.pastValue(l)] = kv.value;
    }
    const out = await this.session.run(feeds, this.presentBuffers(B, P + 1));
    const present = new Map([...past.keys()].map((l) => [l, { key: out[IO.presentKey(l)], value: out[IO.presentValue(l)] }]));
    caches.forEach((c, b) => Object.assign(c, { layers: present, row: b, offset: offsets[b], length: c.length + 1 }));
    if (reuse) this.kvPool.release(past.values()); // every row of the shared past belonged to this batch
    // Each session gets its own copy of its row, so results can travel (and be transferred) independently.
    const rowOf = (t: TensorData, b: number): TensorData => {
      const n = t.data.length / B;
      return { dtype: t.dtype, dims: [1, ...t.dims.slice(1)], data: t.data.slice(b * n, (b + 1) * n) as TensorData['data'] };
    };
    return inputs.map((_, b) => (this.isLast ? { logits: rowOf(out[IO.logits], b), lastHidden: rowOf(out[IO.lastHidden], b) } : { hidden: rowOf(out[IO.hiddenOut], b) }));
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
