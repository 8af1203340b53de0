import { readFileSync } from 'node:fs';
import { freemem } from 'node:os';
import type { ModelSpec } from './config.ts';
import { bytesPerWeight, type StageDType } from './dtype.ts';
import { StrataError } from './errors.ts';
import { MAX_SLOTS, slotBytes } from './kv-slots.ts';
import { stageParamCount, stageWeights, keyPrefix } from './layout.ts';
import { rangeLabel, type BlockRange } from './range.ts';
import { DEFAULT_PREFILL_CHUNK } from './generation.ts';
import { DEFAULT_SLOT_ROWS } from './graph/slot-attention.ts';

/**
 * What a worker process holds for one stage, by part. Measured on this project's CPU workers (onnxruntime-node
 * 1.30): an idle worker (Node, the stage thread, ORT's library) is ≈175 MB; a loaded float32 stage adds 1.11× its
 * weight bytes (ORT keeps the external weights plus small prepacked/arena extras); KV slots are allocated once at
 * configure time up to the KV budget (pages touched as sessions grow: a full worker holds all of it); activations peak
 * in a full-context prefill, with every session's next step queued. `strata bench --suite load --full-load` measures
 * that worst case against this estimate.
 */
export interface StageMemory {
  weights: number;
  kv: number;
  activations: number;
  runtime: number;
  /** A small stage's one-row graph for batch 1 (model/batch1-graph.ts): its weights again, with ORT's extra; else 0. */
  batch1Graph: number;
  total: number;
}

export const RUNTIME_BASE_BYTES = 200 * 2 ** 20;
/**
 * ORT's CPU arena over the activations' peak: it extends in regions that double (its default power-of-two strategy),
 * so it can hold twice what a run needs. With this factor the estimate came within ±10 % of every worker's peak RSS
 * at the planner's worst case (`strata bench --suite load --full-load`, 2026-12-02; README "Loading at size").
 */
export const ARENA_GROWTH = 2;
/**
 * ORT's extra over the weight bytes of a loaded stage, by dtype. Float stages: the arena and prepacked copies of small
 * tensors (a loaded float32 stage held 1.11× its weights). Quantized stages: MatMulNBits' packed copy, which adds its
 * own per-block sums, while ORT keeps the original scales mapped too, plus the largest matrix's transient while it is
 * packed. Measured with /proc/self/smaps and VmHWM after ORT loaded a GPT-J stage (2026-12-03): int8 3.41 GB packed
 * + 0.34 GB scales for 3.18 GB of weights, VmHWM ×1.23–1.36; int4 [24, 28) 748 MB packed + 136 MB scales and zero
 * points for 649 MB, VmHWM ×1.43–1.61. With 0.1 for int8 the planner fell 5–9 % short of two GPT-J workers' peaks
 * at its own worst case (README, "The planner against its own worst case"). int8 with a zero point per block
 * (2026-12-06) stores 1.156 bytes a weight for the same packed copy: a lower ratio, so 0.25 stays on the safe side;
 * in blocks of 64 (STRATA_INT8_BLOCK) GPT-J's stages peaked at ×1.14 / ×1.27 of their weights after load.
 */
export const WEIGHT_OVERHEAD: Record<StageDType, number> = { float32: 0.1, float16: 0.1, int8: 0.25, int4: 0.45 };

export interface StageMemoryOptions {
  /** The worker's KV budget (--kv-budget-mb); decoders only. */
  kvBudgetBytes: number;
  /** Batch rows of the stage graph (--max-batch; default DEFAULT_SLOT_ROWS). */
  rows?: number;
  /** The worker's device kind (default cpu). */
  deviceKind?: string;
}

/** The KV slots a decoder stage allocates for a budget (each holds one session at the model's full context); 0 for encoders. */
export function stageKvSlots(spec: ModelSpec, range: BlockRange, dtype: StageDType, kvBudgetBytes: number): { slots: number; slotBytes: number } {
  if (!spec.causal) return { slots: 0, slotBytes: 0 };
  const layers = Array.from({ length: range.last - range.first }, (_, i) => range.first + i);
  const one = slotBytes({ layers, heads: spec.heads, headDim: spec.headDim, maxLen: spec.maxPositions, dtype: dtype === 'float16' ? 'float16' : 'float32' });
  return { slots: Math.min(MAX_SLOTS, Math.max(1, Math.floor(kvBudgetBytes / one))), slotBytes: one };
}

/** A stage's weight bytes in `dtype` as the planner counts them, before any graph is built. */
const plannedWeightBytes = (spec: ModelSpec, range: BlockRange, dtype: StageDType): number =>
  stageParamCount(stageWeights(spec, range, keyPrefix(spec, () => true))) * bytesPerWeight(dtype);

/**
 * Which decoder stages also hold a one-row graph for batch 1 (model/batch1-graph.ts), decided here from the planner's
 * weight figure so that the memory model and the loaders agree. STRATA_BATCH1_GRAPH: unset or `auto`, a CPU stage of
 * at most BATCH1_GRAPH_MAX_BYTES of weights; `on`, every CPU stage of more than one row; `off`, none. Host slots only:
 * a WebGPU graph has no If (its rows run GroupQueryAttention).
 */
export const BATCH1_GRAPH_MAX_BYTES = 256 * 2 ** 20;

export function batch1GraphUsed(rows: number, deviceKind: string, weightBytes: number, env = process.env.STRATA_BATCH1_GRAPH): boolean {
  if (rows <= 1 || deviceKind !== 'cpu' || env === 'off') return false;
  return env === 'on' || weightBytes <= BATCH1_GRAPH_MAX_BYTES;
}

export const holdsBatch1Graph = (spec: ModelSpec, range: BlockRange, dtype: StageDType, rows: number, deviceKind: string): boolean =>
  spec.causal && batch1GraphUsed(rows, deviceKind, plannedWeightBytes(spec, range, dtype));

export function stageMemory(spec: ModelSpec, range: BlockRange, dtype: StageDType, o: StageMemoryOptions): StageMemory {
  const weights = plannedWeightBytes(spec, range, dtype);
  const act = dtype === 'float16' ? 2 : 4;
  const { slots, slotBytes: one } = stageKvSlots(spec, range, dtype, o.kvBudgetBytes);
  const kv = slots * one;
  // A full-context forward of one sequence (T = n_positions in one run, as /v1/embeddings or a scoring request runs):
  // - a block's widest intermediates (q, k, v, MLP inner, residual) twice (inputs and outputs alive together) and the
  //   attention scores of one layer;
  // - decoders: every layer's new key and value for all T positions, graph outputs alive together until the run ends
  //   (the runtime writes them into the slot afterwards, model/slot-run.ts): 2 × layers × T × H × hd;
  // both held in ORT's arena, which grows in powers of two (ARENA_GROWTH).
  // Plus the steps waiting for the stage thread: one per session at most (a slot each), a prefill chunk's hidden
  // states each, on the wire and decoded (51 sessions filling a 1-block BioMedLM stage's slots held 0.3 GiB of them).
  const T = spec.maxPositions, D = spec.dModel;
  const blockPeak = T * (4 * D + spec.inner) * act * 2 + spec.heads * T * T * 4;
  const newKv = spec.causal ? 2 * (range.last - range.first) * T * spec.heads * spec.headDim * act : 0;
  const queued = slots * Math.min(DEFAULT_PREFILL_CHUNK, T) * D * act * 2;
  const activations = ARENA_GROWTH * (blockPeak + newKv) + queued;
  const runtime = RUNTIME_BASE_BYTES + weights * WEIGHT_OVERHEAD[dtype];
  const batch1 = holdsBatch1Graph(spec, range, dtype, o.rows ?? DEFAULT_SLOT_ROWS, o.deviceKind ?? 'cpu') ? weights * (1 + WEIGHT_OVERHEAD[dtype]) : 0;
  return { weights, kv, activations, runtime, batch1Graph: batch1, total: weights + kv + activations + runtime + batch1 };
}

const fmt = (b: number) => (b >= 2 ** 30 ? `${(b / 2 ** 30).toFixed(2)} GiB` : `${(b / 2 ** 20).toFixed(0)} MiB`);

/** "weights 12.10 GiB (float32) + KV cache 2.00 GiB + activations 812 MiB + runtime 1.41 GiB" */
export const describeMemory = (m: StageMemory, dtype: StageDType): string =>
  `weights ${fmt(m.weights)} (${dtype}) + KV cache ${fmt(m.kv)} + activations ${fmt(m.activations)} + runtime ${fmt(m.runtime)}${m.batch1Graph ? ` + one-row graph ${fmt(m.batch1Graph)}` : ''}`;

/** Memory a new stage may use on this host now: MemAvailable (Linux), else os.freemem(). */
export function availableMemory(): number {
  try {
    const m = /MemAvailable:\s+(\d+) kB/.exec(readFileSync('/proc/meminfo', 'utf8'));
    if (m) return Number(m[1]) * 1024;
  } catch {
    /* not Linux */
  }
  return freemem();
}

/** --memory-limit-mb / STRATA_MEMORY_LIMIT_MB as bytes, or undefined when unset. */
export function memoryLimitFromFlag(mb: string | undefined): number | undefined {
  if (mb === undefined || mb === '') return undefined;
  const n = Number(mb);
  if (!(n > 0) || !Number.isFinite(n)) throw new StrataError('plan_bad_size', `--memory-limit-mb / STRATA_MEMORY_LIMIT_MB "${mb}" is not a positive number of MiB`);
  return n * 2 ** 20;
}

/**
 * Refuses a stage that would not fit `limitBytes`, before anything is loaded, with the numbers and the ways out.
 * `where` names the worker and where its limit came from.
 */
export function checkStageFits(spec: ModelSpec, range: BlockRange, dtype: StageDType, o: StageMemoryOptions & { limitBytes: number; where: string; stages?: number }): StageMemory {
  const m = stageMemory(spec, range, dtype, o);
  if (m.total <= o.limitBytes) return m;
  const smaller = (['int8', 'int4'] as const).filter((d) => bytesPerWeight(d) < bytesPerWeight(dtype)).map((d) => `--dtype ${d} (about ${fmt(stageMemory(spec, range, d, o).total)})`);
  const fixes = [
    `use more workers${o.stages ? ` (--workers ${o.stages + 1} or more)` : ''} so each holds fewer blocks`,
    ...smaller,
    m.kv > m.weights / 4 ? `a smaller --kv-budget-mb (the KV cache takes ${fmt(m.kv)})` : null,
    m.batch1Graph ? `STRATA_BATCH1_GRAPH=off (no one-row graph: ${fmt(m.batch1Graph)} less, batch 1 a little slower)` : null,
    'or give the worker more memory (--memory-limit-mb / STRATA_MEMORY_LIMIT_MB)',
  ].filter(Boolean);
  throw new StrataError(
    'memory_limit_exceeded',
    `stage ${rangeLabel(range)} of ${spec.family} needs about ${fmt(m.total)} — ${describeMemory(m, dtype)} — but ${o.where} has ${fmt(o.limitBytes)}; ` +
      `it was not loaded (it would be killed by the OOM killer). To fix: ${fixes.join(', ')}.`,
  );
}

/**
 * float16 on the CPU execution provider: ORT has no float16 kernels for these layers on x86, so it inserts casts and
 * keeps float32 copies of the weights at load — measured 2.7× the float16 weight bytes (more than float32's 1.1×),
 * and no faster. Refused rather than double the memory silently.
 */
export function checkDtypeOnDevice(dtype: StageDType, deviceKind: string): void {
  if (dtype === 'float16' && deviceKind === 'cpu' && process.env.STRATA_ALLOW_CPU_FLOAT16 !== '1') {
    throw new StrataError(
      'float16_on_cpu',
      '--dtype float16 on a CPU device: ONNX Runtime\'s CPU execution provider computes these layers in float32 and keeps float32 copies of the float16 weights, so the stage would take more memory than float32 (measured 2.7× its float16 bytes) and run no faster. ' +
        'Use --dtype float32 on a CPU (same numbers, less memory), --dtype int8 or int4 (weight-only quantized: about 29 % / 16 % of float32), or --device cuda:N for real float16',
    );
  }
}
