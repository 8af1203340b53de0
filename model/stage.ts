import type { ModelSpec } from './config.ts';
import type { BlockRange } from './range.ts';
import { IO } from './graph/io.ts';
import { DEFAULT_SLOT_ROWS } from './graph/slot-attention.ts';
import type { StageSession, Transfer } from './executor.ts';
import { KvSlots } from './kv-slots.ts';
import type { DType } from './tensor.ts';
import { StrataError } from './errors.ts';
import { batchFeeds, checkCausalMask, checkDecodeBatch, checkDims, stepFeeds, type StepInput } from './stage-inputs.ts';
import { GREEDY_SKIPS, runInSlots, splitRows, stageOutputs, type StepOutput } from './slot-run.ts';
import { stepInChunks, WEBGPU_MAX_PROMPT_CHUNK } from './prompt-chunks.ts';

// A stage's jobs, one unit each: what it accepts (stage-inputs.ts), one run over KV slots and its rows
// (slot-run.ts), long prompts in chunks on WebGPU (prompt-chunks.ts); this file holds the Stage and its caches.
export type { StepInput } from './stage-inputs.ts';
export type { StepOutput } from './slot-run.ts';
export { checkTokenIds } from './stage-inputs.ts';
export { WEBGPU_MAX_PROMPT_CHUNK } from './prompt-chunks.ts';

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
  /** A one-row graph's session for the runs of one row (model/batch1-graph.ts); the stage releases it with its own. */
  batch1?: StageSession;
}

export const DEFAULT_KV_BUDGET_BYTES = 2 * 1024 ** 3;

/**
 * What a decoder's last stage fetches from its run: everything (logits, final hidden states, greedy tokens), or only
 * each row's greedy token (StepOutput.nextTokens), when that is all the step's caller will read.
 */
export type StageFetch = 'all' | 'greedy';

/** One stage (a block range and its ORT session) that steps sequences through its blocks, keeping their KV in slots. */
export class Stage {
  readonly actDType: DType;
  /** The KV slots (decoders only). */
  readonly slots: KvSlots | null;
  readonly rows: number;
  /**
   * What a greedy run leaves unfetched: a last stage's logits and final hidden states. Not on WebGPU: there
   * onnxruntime-node 1.30 binds a run given its outputs by name differently, and the KV presents it keeps on the
   * device failed to bind ("Tensor size mismatch" against the past they were fed as).
   */
  private readonly greedySkips: ReadonlySet<string> | undefined;
  /** The one-row graph's session, when the stage holds one (model/batch1-graph.ts). */
  readonly batch1: StageSession | null;

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
    this.batch1 = opts.batch1 ?? null;
    const layers = Array.from({ length: range.last - range.first }, (_, i) => range.first + i);
    this.slots = spec.causal
      ? new KvSlots({ layers, heads: spec.heads, headDim: spec.headDim, maxLen: spec.maxPositions, dtype: this.actDType }, opts.kvBudgetBytes ?? DEFAULT_KV_BUDGET_BYTES, session.executionProvider === 'webgpu')
      : null;
    this.greedySkips = this.isLast && !this.slots?.resident && session.outputNames.includes(IO.nextTokens) ? GREEDY_SKIPS : undefined;
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

  /** Runs one step of one session (any T; B rows, each in its own slot). Pass null as cache for encoders. */
  async step(input: StepInput, cache: KvCache | null, fetch: StageFetch = 'all'): Promise<StepOutput> {
    const seq = input.positionIds.dims[1];
    if (cache && this.slots?.resident && seq > WEBGPU_MAX_PROMPT_CHUNK) {
      // Chunks gather their logits rows: fetched whole here, whatever the caller would read.
      return stepInChunks(input, cache, WEBGPU_MAX_PROMPT_CHUNK, { isLast: this.isLast, maxPositions: this.spec.maxPositions }, (i, c) => this.stepOnce(i, c, 'all'));
    }
    return this.stepOnce(input, cache, fetch);
  }

  /** The session (and its graph's rows) that runs a batch of this many rows: the one-row graph's for one, if held. */
  private graphFor(batch: number): [StageSession, number] {
    return batch === 1 && this.batch1 ? [this.batch1, 1] : [this.session, this.rows];
  }

  /** The outputs a run leaves unfetched. */
  private skips(fetch: StageFetch): ReadonlySet<string> | undefined {
    return fetch === 'greedy' ? this.greedySkips : undefined;
  }

  private async stepOnce(input: StepInput, cache: KvCache | null, fetch: StageFetch): Promise<StepOutput> {
    const [batch, seq] = input.positionIds.dims;
    const feeds = stepFeeds(this, input);
    if (!this.spec.causal) {
      checkDims(input.attentionMask, [batch, seq], 'attention_mask', 'int64');
      feeds[IO.attentionMask] = input.attentionMask;
      return stageOutputs(await this.session.run(feeds), this.isLast);
    }
    if (!cache) throw new StrataError('stage_input_invalid', 'decoder stages need a KV cache');
    if (cache.slots.length !== batch) throw new StrataError('batch_input_invalid', `this session holds ${cache.slots.length} KV slot(s) but the step has ${batch} rows`);
    if (batch > this.rows) throw new StrataError('batch_input_invalid', `a step may have at most ${this.rows} rows here (--max-batch), got ${batch}`);
    checkCausalMask(input.attentionMask, batch, cache.length + seq, this.spec.maxPositions);
    const [session, rows] = this.graphFor(batch);
    const out = await runInSlots(session, this.slots!, rows, feeds, cache.slots.map((slot) => ({ slot, past: cache.length })), seq, this.skips(fetch));
    cache.length += seq;
    return stageOutputs(out, this.isLast);
  }

  /**
   * One decode step (T = 1) of several sessions as ONE ORT run: row b attends over its own slot and length (ragged,
   * no padding, no repacking), and its new K/V lands in that slot in place.
   */
  async stepBatch(inputs: StepInput[], caches: KvCache[], fetch: StageFetch = 'all'): Promise<StepOutput[]> {
    checkDecodeBatch(inputs, caches, this.rows, this.spec.maxPositions);
    const feeds = batchFeeds(this, inputs);
    const [session, rows] = this.graphFor(inputs.length);
    const out = stageOutputs(await runInSlots(session, this.slots!, rows, feeds, caches.map((c) => ({ slot: c.slots[0], past: c.length })), 1, this.skips(fetch)), this.isLast);
    caches.forEach((c) => (c.length += 1));
    return splitRows(out, inputs.length, this.isLast);
  }

  async close(): Promise<void> {
    this.slots?.dispose();
    await this.batch1?.release();
    await this.session.release();
  }
}

export function slotsExhausted(capacity: number): StrataError {
  return new StrataError('kv_slots_exhausted', `all ${capacity} KV slots of this stage are held by active sessions; retry shortly, raise --kv-budget-mb, or send fewer concurrent requests`, 'resource_exhausted');
}
