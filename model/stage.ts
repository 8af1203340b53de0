import type { ModelSpec } from './config.ts';
import type { BlockRange } from './range.ts';
import { IO } from './graph/io.ts';
import { SLOT_IO, DEFAULT_SLOT_ROWS } from './graph/slot-attention.ts';
import { isDeviceTensor, type DeviceTensor, type Feed, type StageSession, type Transfer } from './executor.ts';
import { KvSlots } from './kv-slots.ts';
import { BYTES_PER_ELEMENT, elementCount, type DType, type TensorData } from './tensor.ts';
import { StrataError } from './errors.ts';

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

export interface StepOutput {
  hidden?: TensorData;
  logits?: TensorData;
  /** Last stage: the final hidden states [B, T, D] (HF's last_hidden_state). */
  lastHidden?: TensorData;
}

/** A session's KV cache at one stage: the slot of each of its rows, and how many positions they hold. */
export interface KvCache {
  slots: number[];
  length: number;
}

export interface StageOptions {
  /** Bytes of KV slots this stage allocates (--kv-budget-mb). */
  kvBudgetBytes?: number;
  /** Batch rows the stage graph was built with (its decode batch limit). */
  rows?: number;
}

export const DEFAULT_KV_BUDGET_BYTES = 2 * 1024 ** 3;

/** One run's rows: each batch row's slot and cached length, all with the same new-token count T. */
interface Row {
  slot: number;
  past: number;
}

/** One stage (a block range and its ORT session) that steps sequences through its blocks, keeping their KV in slots. */
export class Stage {
  readonly actDType: DType;
  /** The KV slots (decoders only). */
  readonly slots: KvSlots | null;
  readonly rows: number;

  constructor(
    readonly spec: ModelSpec,
    readonly range: BlockRange,
    readonly session: StageSession,
    dtype: string,
    opts: StageOptions = {},
  ) {
    // Activations (and KV) are float16 in fp16 stages, float32 otherwise (quantized weights included).
    this.actDType = dtype === 'float16' ? 'float16' : 'float32';
    this.rows = opts.rows ?? DEFAULT_SLOT_ROWS;
    const layers = Array.from({ length: range.last - range.first }, (_, i) => range.first + i);
    this.slots = spec.causal
      ? new KvSlots({ layers, heads: spec.heads, headDim: spec.headDim, maxLen: spec.maxPositions, dtype: this.actDType }, opts.kvBudgetBytes ?? DEFAULT_KV_BUDGET_BYTES, session.executionProvider === 'webgpu')
      : null;
  }

  get isFirst(): boolean {
    return this.range.first === 0;
  }

  get isLast(): boolean {
    return this.range.last === this.spec.blocks;
  }

  /** Host↔device bytes of the last run (0 on the CPU EP: there is no separate device). */
  get lastTransfer(): Transfer {
    return this.session.lastTransfer;
  }

  /** A cache with one slot per row, or null when too few slots are free. */
  openCache(batch: number): KvCache | null {
    if (!this.slots) return { slots: [], length: 0 };
    if (this.slots.capacity - this.slots.inUse < batch) return null;
    return { slots: Array.from({ length: batch }, () => this.slots!.acquire()!), length: 0 };
  }

  /** Like openCache, but every slot taken is a typed error (resource_exhausted → HTTP 429), never a wrong answer. */
  emptyCache(batch: number): KvCache {
    const c = this.openCache(batch);
    if (!c) throw slotsExhausted(this.slots!.capacity);
    return c;
  }

  /** Gives the cache's slots back (the session ended, was evicted, or its step failed). */
  closeCache(cache: KvCache): void {
    for (const s of cache.slots) this.slots?.release(s);
    cache.slots = [];
    cache.length = 0;
  }

  /** Position tables end at the model's context length: out-of-range ids are a request error, not an ORT crash. */
  private checkPositions(positionIds: TensorData): void {
    for (const p of positionIds.data as BigInt64Array) {
      if (p < 0n || p >= BigInt(this.spec.maxPositions)) {
        throw new StrataError('prompt_too_long', `position ${p} is outside the model's context of ${this.spec.maxPositions} tokens; shorten the prompt or lower max_tokens`);
      }
    }
  }

  /** A decoder's mask only says how long each row is: no padding (rows are ragged, each with its own length). */
  private checkCausalMask(mask: TensorData, rows: number, total: number): void {
    checkDims(mask, [rows, total], 'attention_mask', 'int64');
    if ((mask.data as BigInt64Array).some((v) => v !== 1n)) {
      throw new StrataError('attention_mask_unsupported', 'a decoder step\'s attention_mask must be all ones (past + new tokens): padding is not needed, rows keep their own lengths');
    }
    if (total > this.spec.maxPositions) {
      throw new StrataError('prompt_too_long', `the session would hold ${total} tokens, more than the model's context of ${this.spec.maxPositions}; shorten the prompt or lower max_tokens`);
    }
  }

  /** Runs one step of one session (any T; B rows, each in its own slot). Pass null as cache for encoders. */
  async step(input: StepInput, cache: KvCache | null): Promise<StepOutput> {
    const seq = input.positionIds.dims[1];
    if (cache && this.slots?.resident && seq > WEBGPU_MAX_PROMPT_CHUNK) return this.stepInChunks(input, cache, WEBGPU_MAX_PROMPT_CHUNK);
    return this.stepOnce(input, cache);
  }

  /**
   * A long prompt as several shorter steps through this stage (each writes its tokens into the slot, so the next
   * chunk attends to them): the outputs are the same as one step's. Used on WebGPU, whose GroupQueryAttention
   * computes prompts of 32 or more tokens wrongly in ORT 1.30 (measured: errors ~1e-2 from T = 32 on, any max_len,
   * first or later chunk; T <= 31 matches a JS reference to 6e-8).
   */
  private async stepInChunks(input: StepInput, cache: KvCache, chunk: number): Promise<StepOutput> {
    const [batch, seq] = input.positionIds.dims;
    const past = cache.length;
    this.checkCausalMask(input.attentionMask, batch, past + seq);
    const wanted = input.logitPositions ? Array.from(input.logitPositions.data as BigInt64Array, Number) : Array.from({ length: seq }, (_, i) => i);
    const hidden: TensorData[] = [];
    const lastHidden: TensorData[] = [];
    const logits = new Map<number, { t: TensorData; row: number }>(); // position → where its logits are
    for (let from = 0; from < seq; from += chunk) {
      const to = Math.min(seq, from + chunk);
      const mine = wanted.filter((p) => p >= from && p < to);
      const out = await this.stepOnce({
        inputIds: input.inputIds && cols(input.inputIds, from, to),
        hidden: input.hidden && cols(input.hidden, from, to),
        positionIds: cols(input.positionIds, from, to),
        attentionMask: cols(input.attentionMask, 0, past + to),
        logitPositions: { dtype: 'int64', dims: [Math.max(1, mine.length)], data: BigInt64Array.from(mine.length ? mine : [to - from - 1], (p) => BigInt(mine.length ? p - from : p)) },
      }, cache);
      if (out.hidden) hidden.push(out.hidden);
      if (out.lastHidden) lastHidden.push(out.lastHidden);
      mine.forEach((p, row) => logits.set(p, { t: out.logits!, row }));
    }
    if (!this.isLast) return { hidden: concatCols(hidden) };
    const first = logits.values().next().value!.t;
    const [, , vocab] = first.dims;
    const data = new Float32Array(batch * wanted.length * vocab);
    for (let b = 0; b < batch; b++) {
      wanted.forEach((p, r) => {
        const { t, row } = logits.get(p)!;
        const rows = t.dims[1];
        data.set((t.data as Float32Array).subarray((b * rows + row) * vocab, (b * rows + row + 1) * vocab), (b * wanted.length + r) * vocab);
      });
    }
    return { logits: { dtype: 'float32', dims: [batch, wanted.length, vocab], data }, lastHidden: concatCols(lastHidden) };
  }

  private async stepOnce(input: StepInput, cache: KvCache | null): Promise<StepOutput> {
    const [batch, seq] = input.positionIds.dims;
    this.checkPositions(input.positionIds);
    const feeds: Record<string, Feed> = { [IO.positionIds]: input.positionIds };
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
    if (this.isLast) {
      feeds[IO.logitPositions] = input.logitPositions ?? { dtype: 'int64', dims: [seq], data: BigInt64Array.from({ length: seq }, (_, i) => BigInt(i)) };
    }
    if (!this.spec.causal) {
      checkDims(input.attentionMask, [batch, seq], 'attention_mask', 'int64');
      feeds[IO.attentionMask] = input.attentionMask;
      const out = await this.session.run(feeds);
      return this.outputsOf(out);
    }
    if (!cache) throw new StrataError('stage_input_invalid', 'decoder stages need a KV cache');
    if (cache.slots.length !== batch) throw new StrataError('batch_input_invalid', `this session holds ${cache.slots.length} KV slot(s) but the step has ${batch} rows`);
    if (batch > this.rows) throw new StrataError('batch_input_invalid', `a step may have at most ${this.rows} rows here (--max-batch), got ${batch}`);
    this.checkCausalMask(input.attentionMask, batch, cache.length + seq);
    const out = await this.runSlots(feeds, cache.slots.map((slot) => ({ slot, past: cache.length })), seq);
    cache.length += seq;
    return this.outputsOf(out);
  }

  /**
   * One decode step (T = 1) of several sessions as ONE ORT run: row b attends over its own slot and length (ragged,
   * no padding, no repacking), and its new K/V lands in that slot in place.
   */
  async stepBatch(inputs: StepInput[], caches: KvCache[]): Promise<StepOutput[]> {
    const B = inputs.length;
    if (B > this.rows) throw new StrataError('batch_input_invalid', `a batch may have at most ${this.rows} sessions here (--max-batch), got ${B}`);
    for (const [b, input] of inputs.entries()) {
      const c = caches[b];
      if (input.positionIds.dims[0] !== 1 || input.positionIds.dims[1] !== 1 || c.slots.length !== 1) throw new StrataError('batch_input_invalid', 'only single-row decode steps (T = 1) can be batched');
      this.checkCausalMask(input.attentionMask, 1, c.length + 1);
      this.checkPositions(input.positionIds);
    }
    const feeds: Record<string, Feed> = {
      [IO.positionIds]: { dtype: 'int64', dims: [B, 1], data: BigInt64Array.from(inputs, (i) => (i.positionIds.data as BigInt64Array)[0]) },
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
    const out = this.outputsOf(await this.runSlots(feeds, caches.map((c) => ({ slot: c.slots[0], past: c.length })), 1));
    caches.forEach((c) => (c.length += 1));
    // Each session gets its own copy of its row, so results can travel (and be transferred) independently.
    const rowOf = (t: TensorData, b: number): TensorData => {
      const n = t.data.length / B;
      return { dtype: t.dtype, dims: [1, ...t.dims.slice(1)], data: t.data.slice(b * n, (b + 1) * n) as TensorData['data'] };
    };
    return inputs.map((_, b) => (this.isLast ? { logits: rowOf(out.logits!, b), lastHidden: rowOf(out.lastHidden!, b) } : { hidden: rowOf(out.hidden!, b) }));
  }

  /** Binds each row to its slot (idle rows to scratch), runs, and keeps device-resident presents as the slots'. */
  private async runSlots(feeds: Record<string, Feed>, rows: Row[], seq: number): Promise<Record<string, TensorData | DeviceTensor>> {
    const slots = this.slots!;
    const B = rows.length;
    // The graph ignores the mask of a decoder (GQA reads lengths from seqlens_k); it still declares the input.
    feeds[IO.attentionMask] = { dtype: 'int64', dims: [B, 1], data: new BigInt64Array(B).fill(1n) };
    feeds[SLOT_IO.seqlens] = { dtype: 'int32', dims: [B], data: Int32Array.from(rows, (r) => r.past + seq - 1) } as unknown as TensorData;
    const present: Record<string, TensorData> = {};
    for (const l of slots.geometry.layers) {
      for (let r = 0; r < this.rows; r++) {
        const kv = r < B ? slots.slot(l, rows[r].slot) : slots.idle(l, r);
        feeds[SLOT_IO.pastKey(l, r)] = kv.key;
        feeds[SLOT_IO.pastValue(l, r)] = kv.value;
        // Host buffers: the same tensor is past and preallocated present, so GQA writes the new K/V in place.
        if (!isDeviceTensor(kv.key) && !slots.resident) {
          present[SLOT_IO.presentKey(l, r)] = kv.key;
          present[SLOT_IO.presentValue(l, r)] = kv.value as TensorData;
        }
      }
    }
    const out = await this.session.run(feeds, present);
    if (slots.resident) {
      for (const l of slots.geometry.layers) {
        for (let r = 0; r < this.rows; r++) {
          const key = out[SLOT_IO.presentKey(l, r)];
          const value = out[SLOT_IO.presentValue(l, r)];
          if (!isDeviceTensor(key) || !isDeviceTensor(value)) throw new StrataError('stage_internal', `present KV of layer ${l} row ${r} came back to the host; expected it on the device`, 'internal');
          slots.storeDevice(l, r < B ? { slot: rows[r].slot } : { row: r }, key, value);
        }
      }
    }
    return out;
  }

  private outputsOf(out: Record<string, TensorData | DeviceTensor>): StepOutput {
    const host = (name: string) => out[name] as TensorData;
    return this.isLast ? { logits: host(IO.logits), lastHidden: host(IO.lastHidden) } : { hidden: host(IO.hiddenOut) };
  }

  async close(): Promise<void> {
    this.slots?.dispose();
    await this.session.release();
  }
}

/** Longest prompt chunk one WebGPU run takes (see Stage.stepInChunks). */
export const WEBGPU_MAX_PROMPT_CHUNK = 31;

/** Columns [from, to) of a [B, T, ...] tensor. */
function cols(t: TensorData, from: number, to: number): TensorData {
  const [B, T] = t.dims;
  const inner = elementCount(t.dims.slice(2));
  const out = new (t.data.constructor as new (n: number) => TensorData['data'])(B * (to - from) * inner);
  for (let b = 0; b < B; b++) out.set(t.data.subarray((b * T + from) * inner, (b * T + to) * inner) as never, b * (to - from) * inner);
  return { dtype: t.dtype, dims: [B, to - from, ...t.dims.slice(2)], data: out };
}

/** [B, T_i, ...] tensors joined along T. */
function concatCols(parts: TensorData[]): TensorData {
  const [B] = parts[0].dims;
  const inner = elementCount(parts[0].dims.slice(2));
  const T = parts.reduce((n, p) => n + p.dims[1], 0);
  const out = new (parts[0].data.constructor as new (n: number) => TensorData['data'])(B * T * inner);
  for (let b = 0, at = 0; b < B; b++) for (const p of parts) {
    const n = p.dims[1] * inner;
    out.set(p.data.subarray(b * n, (b + 1) * n) as never, at);
    at += n;
  }
  return { dtype: parts[0].dtype, dims: [B, T, ...parts[0].dims.slice(2)], data: out };
}

export function slotsExhausted(capacity: number): StrataError {
  return new StrataError('kv_slots_exhausted', `all ${capacity} KV slots of this stage are held by active sessions; retry shortly, raise --kv-budget-mb, or send fewer concurrent requests`, 'resource_exhausted');
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
