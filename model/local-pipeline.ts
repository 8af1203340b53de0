import { loadModelSpec, type ModelSpec } from './config.ts';
import { evenSplit, type BlockRange } from './range.ts';
import { prepareAndOpen, type PreparedStage } from './stage-cache.ts';
import type { SessionOptions } from './executor.ts';
import { openBatch1Graph } from './batch1-graph.ts';
import { openStageSession } from './stage-open.ts';
import { Stage, type KvCache } from './stage.ts';
import { DEFAULT_SLOT_ROWS } from './graph/slot-attention.ts';
import { embed, finishStep, greedyOnly, type PipelineStep, type StepResult, type Stepper } from './generation.ts';
import type { WeightDType } from './stage-graph.ts';
import { activationDType } from './dtype.ts';

export interface LocalPipelineOptions extends SessionOptions {
  dtype?: WeightDType;
  /** Per stage: bytes of KV slots (default 2 GiB; decoders only). */
  kvBudgetBytes?: number;
  /** Batch rows of each stage graph (decode batch limit). */
  maxBatch?: number;
  fused?: boolean;
  cacheDir?: string;
  /** int8/int4: weights per quantization block (default 32, q8_0's and q4_0's). */
  quantBlockSize?: number;
  onProgress?: (msg: string) => void;
}

/**
 * K stage graphs run one after another in this process, without gRPC: the reference path every distributed
 * configuration must agree with.
 */
export class LocalPipeline implements Stepper {
  private readonly caches = new Map<string, KvCache[]>();

  private constructor(
    readonly spec: ModelSpec,
    readonly stages: Stage[],
    readonly prepared: PreparedStage[],
  ) {}

  static async load(modelDir: string, split: number | BlockRange[], opts: LocalPipelineOptions = {}): Promise<LocalPipeline> {
    const spec = loadModelSpec(modelDir);
    const ranges = typeof split === 'number' ? evenSplit(spec.blocks, split) : split;
    const dtype = opts.dtype ?? 'float32';
    const rows = opts.maxBatch ?? DEFAULT_SLOT_ROWS;
    const prepare = { dtype, fused: opts.fused, device: opts.device, cacheDir: opts.cacheDir, rows, quantBlockSize: opts.quantBlockSize, threads: opts.threads, onProgress: opts.onProgress };
    const stages: Stage[] = [];
    const prepared: PreparedStage[] = [];
    for (const r of ranges) {
      const { prepared: p, opened } = await prepareAndOpen(modelDir, r, prepare, (p) => openStageSession(p.path, dtype, opts, opts.onProgress));
      const batch1 = await openBatch1Graph(modelDir, p, prepare, (p1, log) => openStageSession(p1.path, dtype, opts, log));
      prepared.push(p);
      stages.push(new Stage(spec, p.range, opened, activationDType(dtype), { kvBudgetBytes: opts.kvBudgetBytes, rows, batch1: batch1 ?? undefined }));
    }
    return new LocalPipeline(spec, stages, prepared);
  }

  async step(sessionId: string, input: PipelineStep): Promise<StepResult> {
    let caches = this.caches.get(sessionId);
    if (!caches && this.spec.causal) {
      const batch = input.positionIds.dims[0];
      caches = [];
      try {
        for (const s of this.stages) caches.push(s.emptyCache(batch));
      } catch (e) {
        caches.forEach((c, i) => this.stages[i].closeCache(c));
        throw e;
      }
      this.caches.set(sessionId, caches);
    }
    let hidden = undefined;
    const fetch = greedyOnly(input) ? 'greedy' : 'all';
    for (const [i, stage] of this.stages.entries()) {
      const out = await stage.step({ ...input, hidden }, caches ? caches[i] : null, fetch);
      if (stage.isLast) return finishStep(out, input);
      hidden = out.hidden;
    }
    throw new Error('unreachable: the pipeline has no last stage');
  }

  async end(sessionId: string): Promise<void> {
    this.caches.get(sessionId)?.forEach((c, i) => this.stages[i].closeCache(c));
    this.caches.delete(sessionId);
  }

  /** Mean-pooled last hidden state (the /v1/embeddings vector). */
  embed(ids: number[]): Promise<Float32Array> {
    return embed(this, ids);
  }

  async close(): Promise<void> {
    for (const s of this.stages) await s.close();
  }
}
