import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { loadModelSpec, type ModelSpec } from '../model/config.ts';
import { parseStageDType, type StageDType } from '../model/dtype.ts';
import { StrataError } from '../model/errors.ts';
import { stageKvSlots, stageMemory } from '../model/memory.ts';
import type { LoadProgress } from '../model/progress.ts';
import { rangeLabel, type BlockRange } from '../model/range.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { defaultCacheDir } from '../model/stage-cache.ts';
import { embed, generate } from '../model/generation.ts';
import { stageWeightSpans, type WeightSpan } from '../model/stage-prefetch.ts';
import { RemotePipeline } from '../coordinator/remote-pipeline.ts';
import { ensureShardedCheckpoint, type CkptDType } from './load-checkpoint.ts';
import { resolveShape, type ShapeFlags } from './model.ts';
import { machineInfo } from './pipeline.ts';
import type { Progress } from './progress.ts';
import { runRecovery, type RecoveryReport } from './load-recover.ts';
import { procStatusBytes } from './cpu.ts';
import { dropPageCache, newMemoryRate, timedRead, timedSpans, type NewMemoryRate, type ReadTiming } from './host-probe.ts';

/**
 * `strata bench --suite load`: how long a full-size checkpoint takes to serve, and what it holds in memory.
 * It writes a synthetic checkpoint of the preset at its real size (sharded safetensors, F32 or F16), then measures:
 * reading it once from disk (cat, page cache dropped when this process may), the first start with an empty stage
 * cache (graph build + ORT load, per stage, from the workers' own load events), a start from the cache against
 * reading each stage's cached files once, peak RSS per worker (VmHWM) against the stage's weight bytes and the
 * planner's estimate, batch-1 decode tokens/s, and with `--recover`, a worker killed mid-generation and restarted
 * by the supervisor at its address.
 */
export interface LoadBenchOptions extends ShapeFlags {
  workers: number;
  threadsPerWorker?: number;
  /** The stage dtype (--dtype); the checkpoint's own is ckptDtype. */
  dtype?: string;
  ckptDtype?: string;
  /** Full size by default: the preset's blocks are replaced by the real model's unless --blocks is given. */
  shardMb?: number;
  promptTokens: number;
  newTokens: number;
  maxBatch: number;
  kvBudgetMb?: number;
  recover?: boolean;
  /** Fill every KV slot and run a full-context forward after the cache-hit start: the planner's worst case, measured. */
  fullLoad?: boolean;
  /** Keep the written checkpoint (default: kept; --delete-checkpoint removes it at the end). */
  deleteCheckpoint?: boolean;
  cacheDir?: string;
  seed: number;
  /** Drop the page cache before each timed read and start (default true; needs root, else the reads are warm). */
  dropCaches?: boolean;
}

/** Worker processes under a supervisor (bin/bench-load.ts): a worker killed is restarted at its address. */
export interface LoadCluster {
  addresses: string[];
  /** The current pid of worker i (a new one after a restart). */
  pid(i: number): number;
  onLoad(listener: (i: number, p: LoadProgress) => void): void;
  stop(): Promise<void>;
}
export type LoadLauncher = (modelDir: string, k: number, args: string[]) => Promise<LoadCluster>;

/** The real models' block counts: the presets keep a few blocks for the quick suites. */
const FULL_BLOCKS: Record<string, number> = { 'gpt-j': 28, biomedlm: 32 };

export interface StageLoad {
  blocks: [number, number];
  /** Configure → build done (or cache checked), build done → serving, and the sum, in ms (the worker's events as seen here). */
  buildMs: number;
  loadMs: number;
  totalMs: number;
  cached: boolean;
  /** Weight bytes of the stage graph (in the stage dtype). */
  weightBytes: number;
  /** VmHWM of the worker after the load (and after decode, first start only). */
  peakRssBytes: number;
  /** The planner's estimate (model/memory.ts) for this stage and the worker's KV budget. */
  plannedBytes: number;
  plannedVsPeakRss: number;
  peakRssVsWeights: number;
}

export interface StartReport {
  /** Launch of the processes → every stage serving (includes starting Node and the worker's modules, ≈2 s). */
  ms: number;
  /** The slowest stage's configure → serving (build + ORT load, or cache check + load): what the bounds compare. */
  stageMs: number;
  stages: StageLoad[];
}

export interface LoadBenchReport {
  suite: 'load';
  startedAt: string;
  machine: ReturnType<typeof machineInfo>;
  model: { preset: string; family: string; blocks: number; dModel: number; params: number; dir: string; ckptDtype: CkptDType; shards: number; bytes: number; writeMs: number | null };
  dtype: StageDType;
  workers: number;
  threadsPerWorker: number;
  kvBudgetMb: number;
  rawRead: ReadTiming;
  /** How fast this host backs memory touched for the first time: what a quantized stage's ORT load writes into. */
  newMemory: NewMemoryRate;
  firstStart: StartReport & { vsRawRead: number };
  /**
   * vsCachedRead: a stage's start over reading its own weights alone; vsAllCachedReads: the slowest stage over reading
   * every stage's weights one after another (the workers share one disk here, so that is the floor for all of them).
   */
  cacheHit: { ms: number; stageMs: number; vsAllCachedReads: number; stages: (StageLoad & { cachedRead: ReadTiming; vsCachedRead: number })[] };
  decode: { promptTokens: number; newTokens: number; tokPerSec: number; ttftMs: number };
  recover: RecoveryReport | null;
  fullLoad: FullLoadReport | null;
  /** The issue's bounds: first start ≤ ×2 raw read, cache hit ≤ ×1.5 its stage's read, planner within 10 %. */
  bounds: { firstStartX: number; cacheHitX: number; plannerTolerance: number };
}

export const vmHwm = (pid: number): number => procStatusBytes(pid, 'VmHWM');

/** Per worker: when its stage's load began, when the build ended (weightBytes known), when it served. */
class LoadWatch {
  readonly t: { begin?: number; built?: number; serving?: number; cached?: boolean; weightBytes?: number; failed?: string }[];
  constructor(k: number, private readonly progress: Progress) {
    this.t = Array.from({ length: k }, () => ({}));
  }
  on = (i: number, p: LoadProgress): void => {
    const s = this.t[i];
    const now = performance.now();
    if (p.phase === 'building') {
      s.begin ??= now;
      if (p.weightBytes !== undefined) {
        s.built = now;
        s.cached = !!p.cached;
        s.weightBytes = p.weightBytes;
      }
    } else if (p.phase === 'serving') {
      s.serving ??= now;
    } else if (p.phase === 'failed') s.failed = p.error;
    if (p.phase !== 'loading' || Math.random() < 0.2) this.progress.phase(`  stage ${i}: ${p.phase} ${p.range} ${p.totalBytes ? `${Math.floor((100 * p.doneBytes) / p.totalBytes)} %` : ''}${p.cached ? ' (cached graph)' : ''}`);
  };
  reset(): void {
    this.t.forEach((s) => Object.keys(s).forEach((k) => delete (s as Record<string, unknown>)[k]));
  }
}

async function start(model: { dir: string; spec: ModelSpec; fingerprint: string }, dtype: StageDType, args: string[], k: number, launch: LoadLauncher, progress: Progress, kvBudgetBytes: number, recover?: RemoteOptsHook) {
  const watch = new LoadWatch(k, progress);
  const t0 = performance.now();
  const cluster = await launch(model.dir, k, args);
  cluster.onLoad((i, p) => watch.on(i, p));
  let pipeline: RemotePipeline;
  try {
    pipeline = await RemotePipeline.connect(cluster.addresses, { spec: model.spec, fingerprint: model.fingerprint, dtype, ...recover?.() });
  } catch (e) {
    await cluster.stop();
    throw e;
  }
  const ms = performance.now() - t0;
  const stages: StageLoad[] = pipeline.describe().stages.map((v, i) => {
    const s = watch.t[i];
    const range: BlockRange = { first: v.blocks[0], last: v.blocks[1] };
    const planned = stageMemory(model.spec, range, dtype, { kvBudgetBytes }).total;
    const peak = vmHwm(cluster.pid(i));
    const weightBytes = s.weightBytes ?? NaN;
    return {
      blocks: v.blocks, buildMs: (s.built ?? NaN) - (s.begin ?? NaN), loadMs: (s.serving ?? NaN) - (s.built ?? NaN), totalMs: (s.serving ?? NaN) - (s.begin ?? NaN),
      cached: !!s.cached, weightBytes, peakRssBytes: peak, plannedBytes: planned, plannedVsPeakRss: planned / peak, peakRssVsWeights: peak / weightBytes,
    };
  });
  return { cluster, pipeline, report: { ms, stageMs: Math.max(...stages.map((x) => x.totalMs)), stages } satisfies StartReport };
}
type RemoteOptsHook = () => Partial<Parameters<typeof RemotePipeline.connect>[1]>;

/** A synthetic prompt of `n` token ids, the same for the same seed. */
const promptIds = (seed: number, n: number, vocab: number): number[] => Array.from({ length: n }, (_, i) => (seed * 7919 + i * 104729) % vocab);

/**
 * The first request after a start: its time to first token (a stage whose weights were not in memory would page them
 * in here), then batch-1 decode as tokens after the first over the time since the first.
 */
async function decodeRate(pipeline: RemotePipeline, vocab: number, promptTokens: number, newTokens: number, seed: number): Promise<{ tokPerSec: number; ttftMs: number }> {
  const prompt = promptIds(seed, promptTokens, vocab);
  const t0 = performance.now();
  let first = 0;
  let last = 0;
  await generate(pipeline, prompt, { maxNewTokens: newTokens, eosTokenId: null, onToken: (_id, i) => void (i === 0 ? (first = performance.now()) : (last = performance.now())) });
  return { tokPerSec: ((newTokens - 1) * 1000) / (last - first), ttftMs: first - t0 };
}

export async function runLoadBench(o: LoadBenchOptions, launch: LoadLauncher, progress: Progress): Promise<LoadBenchReport> {
  const startedAt = new Date().toISOString();
  const preset = o.preset ?? 'gpt2-small';
  const shape = resolveShape({ ...o, blocks: o.blocks ?? FULL_BLOCKS[preset] });
  const ckptDtype = (o.ckptDtype ?? 'f32').toUpperCase() as CkptDType;
  if (ckptDtype !== 'F32' && ckptDtype !== 'F16') throw new StrataError('bench_flag_invalid', `--ckpt-dtype must be f32 or f16, got "${o.ckptDtype}"`);
  const dtype = parseStageDType(o.dtype ?? 'float32');
  // As `strata up` gives them: each worker its share of the cores (its ORT threads, and its quantizer's).
  const threads = o.threadsPerWorker ?? Math.max(1, Math.floor(availableParallelism() / o.workers));
  const kvBudgetMb = o.kvBudgetMb ?? 1024;
  const root = o.cacheDir ?? defaultCacheDir();

  // 1. The checkpoint, tensor by tensor.
  const t0 = performance.now();
  let bar: ReturnType<Progress['bar']> | null = null;
  const ckpt = ensureShardedCheckpoint(shape, ckptDtype, {
    cacheDir: root, shardBytes: (o.shardMb ?? 3500) * 2 ** 20,
    onProgress: (done, all) => {
      if (!bar) {
        progress.phase(`writing a ${preset} checkpoint (${shape.blocks} blocks, ${(all / 2 ** 30).toFixed(2)} GiB of ${ckptDtype}, sharded)`);
        bar = progress.bar('checkpoint', Math.round(all / 2 ** 20), 'MiB');
      }
      bar.update(Math.round(done / 2 ** 20));
    },
  });
  (bar as ReturnType<Progress['bar']> | null)?.stop();
  const writeMs = ckpt.built ? performance.now() - t0 : null;
  progress.phase(`${ckpt.built ? `checkpoint written in ${(writeMs! / 1000).toFixed(1)} s` : 'checkpoint (already written)'}: ${ckpt.dir}, ${ckpt.shards.length} shards, ${(ckpt.bytes / 2 ** 30).toFixed(2)} GiB`);
  const spec = loadModelSpec(ckpt.dir);
  const ck = Checkpoint.open(ckpt.dir);
  const fingerprint = ck.fingerprint();
  const params = ck.keys().reduce((n, k) => n + ck.info(k)!.shape.reduce((a, b) => a * b, 1), 0);
  ck.close();
  const model = { dir: ckpt.dir, spec, fingerprint };

  // 2. Reading it once.
  const cold = o.dropCaches !== false;
  const rawRead = timedRead(ckpt.shards, cold);
  progress.phase(`raw read (${rawRead.cold ? 'cold' : 'warm: could not drop the page cache'}): ${(rawRead.ms / 1000).toFixed(1)} s, ${rawRead.mbPerSec.toFixed(0)} MB/s`);

  // 3. First start, empty stage cache (a directory of its own, removed at the end).
  const stageCache = mkdtempSync(join(root, 'load-bench-'));
  const args = ['--threads', String(threads), '--cache-dir', stageCache, '--max-batch', String(o.maxBatch), '--kv-budget-mb', String(kvBudgetMb)];
  const kvBudgetBytes = kvBudgetMb * 2 ** 20;
  try {
    if (cold) dropPageCache();
    progress.phase(`first start: ${o.workers} workers, --dtype ${dtype}, no stage cache`);
    const first = await start(model, dtype, args, o.workers, launch, progress, kvBudgetBytes);
    let decode: { tokPerSec: number; ttftMs: number };
    try {
      progress.phase(`first start: serving after ${(first.report.ms / 1000).toFixed(1)} s; decoding ${o.newTokens} tokens (1 request)`);
      decode = await decodeRate(first.pipeline, spec.vocab, o.promptTokens, o.newTokens, o.seed);
      first.report.stages.forEach((s, i) => (s.peakRssBytes = vmHwm(first.cluster.pid(i))));
      first.report.stages.forEach((s) => ((s.plannedVsPeakRss = s.plannedBytes / s.peakRssBytes), (s.peakRssVsWeights = s.peakRssBytes / s.weightBytes)));
    } finally {
      first.pipeline.close();
      await first.cluster.stop();
    }

    // 4. Each stage's cached files read once (cold), then a start from that cache (cold).
    const reads = first.report.stages.map((s) => timedSpans(cachedSpans(stageCache, fingerprint, s.blocks), cold));
    const newMemory = newMemoryRate();
    progress.phase(`new memory: ${newMemory.firstTouchGbPerSec.toFixed(2)} GB/s on first touch, ${newMemory.againGbPerSec.toFixed(2)} GB/s again`);
    if (cold) dropPageCache();
    progress.phase('cache-hit start');
    const recoveries: number[] = [];
    const hit = await start(model, dtype, args, o.workers, launch, progress, kvBudgetBytes, () => ({
      recoveryTimeoutMs: 600_000, replaceGraceMs: 600_000, onRecovery: (ms: number) => void recoveries.push(ms),
      // A full-context forward of a big stage on one thread takes minutes: not a hung worker.
      ...(o.fullLoad ? { stepTimeoutMs: 3_600_000 } : {}),
    }));
    let recover: RecoveryReport | null = null;
    let full: FullLoadReport | null = null;
    try {
      // One short request, so the peak RSS below is a serving worker's (a float stage's weights are mapped on first use).
      await decodeRate(hit.pipeline, spec.vocab, o.promptTokens, 4, o.seed);
      hit.report.stages.forEach((s, i) => {
        s.peakRssBytes = vmHwm(hit.cluster.pid(i));
        s.plannedVsPeakRss = s.plannedBytes / s.peakRssBytes;
        s.peakRssVsWeights = s.peakRssBytes / s.weightBytes;
      });
      if (o.fullLoad) full = await fullLoad(hit.pipeline, hit.cluster, hit.report.stages, spec, dtype, kvBudgetBytes, o.seed, progress);
      if (o.recover) recover = await runRecovery({ pipeline: hit.pipeline, cluster: hit.cluster, vocab: spec.vocab, recoveries, progress, newTokens: o.newTokens, seed: o.seed });
    } finally {
      hit.pipeline.close();
      await hit.cluster.stop();
    }
    return {
      suite: 'load', startedAt, machine: machineInfo(),
      model: { preset, family: shape.family, blocks: shape.blocks, dModel: shape.dModel, params, dir: ckpt.dir, ckptDtype, shards: ckpt.shards.length, bytes: ckpt.bytes, writeMs },
      dtype, workers: o.workers, threadsPerWorker: threads, kvBudgetMb, rawRead, newMemory,
      firstStart: { ...first.report, vsRawRead: first.report.stageMs / rawRead.ms },
      cacheHit: { ms: hit.report.ms, stageMs: hit.report.stageMs, vsAllCachedReads: hit.report.stageMs / reads.reduce((n, x) => n + x.ms, 0), stages: hit.report.stages.map((s, i) => ({ ...s, cachedRead: reads[i], vsCachedRead: s.totalMs / reads[i].ms })) },
      decode: { promptTokens: o.promptTokens, newTokens: o.newTokens, ...decode },
      recover, fullLoad: full, bounds: { firstStartX: 2, cacheHitX: 1.5, plannerTolerance: 0.1 },
    };
  } finally {
    rmSync(stageCache, { recursive: true, force: true });
    if (o.deleteCheckpoint) rmSync(ckpt.dir, { recursive: true, force: true });
  }
}

/** What a start from the cache must read of stage `blocks`: its graph and its weights' spans (model/stage-prefetch.ts). */
function cachedSpans(cache: string, fingerprint: string, blocks: [number, number]): WeightSpan[] {
  const dir = join(cache, fingerprint);
  const entry = readdirSync(dir).find((d) => d.startsWith(`${blocks[0]}-${blocks[1]}-`) && !d.includes('.tmp-'));
  if (!entry) throw new StrataError('bench_cache_missing', `no cached stage ${rangeLabel({ first: blocks[0], last: blocks[1] })} under ${dir}`);
  return stageWeightSpans(join(dir, entry, 'stage.onnx'));
}

export interface FullLoadReport {
  /** Concurrent sessions: every KV slot of the stage with the fewest. */
  sessions: number;
  promptTokens: number;
  ms: number;
  stages: { blocks: [number, number]; kvSlots: number; peakRssBytes: number; plannedBytes: number; plannedVsPeakRss: number }[];
}

/**
 * The planner's worst case (model/memory.ts), made real: as many concurrent sessions as the stages have KV slots,
 * each with a prompt one short of the model's context (every slot's pages written), then a one-shot forward over the
 * whole context (the widest activations: every block at T = n_positions, as /v1/embeddings runs it). Each worker's
 * VmHWM after that is what the planner's estimate must match; a short request's RSS (the starts above) leaves most
 * of what it reserves untouched.
 */
async function fullLoad(pipeline: RemotePipeline, cluster: LoadCluster, stages: StageLoad[], spec: ModelSpec, dtype: StageDType, kvBudgetBytes: number, seed: number, progress: Progress): Promise<FullLoadReport> {
  const slots = stages.map((x) => stageKvSlots(spec, { first: x.blocks[0], last: x.blocks[1] }, dtype, kvBudgetBytes).slots);
  const sessions = Math.max(1, Math.min(...slots));
  const promptTokens = spec.maxPositions - 1;
  const t0 = performance.now();
  progress.phase(`full load: ${sessions} concurrent sessions of ${promptTokens} prompt tokens (every KV slot filled), then a ${spec.maxPositions}-token one-shot forward`);
  await Promise.all(Array.from({ length: sessions }, (_, k) => generate(pipeline, promptIds(seed + k, promptTokens, spec.vocab), { maxNewTokens: 1, eosTokenId: null })));
  await embed(pipeline, promptIds(seed + sessions, spec.maxPositions, spec.vocab));
  const ms = performance.now() - t0;
  progress.phase(`full load done in ${(ms / 1000).toFixed(1)} s`);
  return {
    sessions, promptTokens, ms,
    stages: stages.map((x, i) => {
      const peakRssBytes = vmHwm(cluster.pid(i));
      return { blocks: x.blocks, kvSlots: slots[i], peakRssBytes, plannedBytes: x.plannedBytes, plannedVsPeakRss: x.plannedBytes / peakRssBytes };
    }),
  };
}

const gib = (b: number) => `${(b / 2 ** 30).toFixed(2)} GiB`;
const s = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

export function renderLoadReport(r: LoadBenchReport, outDir: string): string {
  const m = r.model;
  const lines = [
    `strata bench --suite load: ${m.preset} (${m.blocks} blocks, ${(m.params / 1e9).toFixed(2)} B params), ${m.ckptDtype} checkpoint in ${m.shards} shards (${gib(m.bytes)}), --dtype ${r.dtype}, ${r.workers} workers × ${r.threadsPerWorker} threads`,
    `raw read: ${s(r.rawRead.ms)} (${r.rawRead.mbPerSec.toFixed(0)} MB/s, ${r.rawRead.cold ? 'cold page cache' : 'warm: page cache not dropped'})`,
    `first start (no cache): stages serving ${s(r.firstStart.stageMs)} after configure = ×${r.firstStart.vsRawRead.toFixed(2)} of the raw read (bound ×${r.bounds.firstStartX}); ${s(r.firstStart.ms)} from process launch`,
    ...r.firstStart.stages.map((x) => `  stage [${x.blocks.join(', ')}): build ${s(x.buildMs)} + ORT load ${s(x.loadMs)}; weights ${gib(x.weightBytes)}, peak RSS ${gib(x.peakRssBytes)} (×${x.peakRssVsWeights.toFixed(2)} of weights), planner's worst case ${gib(x.plannedBytes)} (×${x.plannedVsPeakRss.toFixed(2)} of this peak; --full-load measures it)`),
    `cache-hit start: stages serving ${s(r.cacheHit.stageMs)} after configure = ×${r.cacheHit.vsAllCachedReads.toFixed(2)} of reading every stage's cached weights once (one disk); ${s(r.cacheHit.ms)} from process launch`,
    `  new memory on this host: ${r.newMemory.firstTouchGbPerSec.toFixed(2)} GB/s on first touch, ${r.newMemory.againGbPerSec.toFixed(2)} GB/s again (ORT's load packs the stage's weights into new memory)`,
    ...r.cacheHit.stages.map((x) => `  stage [${x.blocks.join(', ')}): ${s(x.totalMs)} vs reading its cached graph ${s(x.cachedRead.ms)} (${gib(x.cachedRead.bytes)}, ${x.cachedRead.cold ? 'cold' : 'warm'}) = ×${x.vsCachedRead.toFixed(2)} (bound ×${r.bounds.cacheHitX}); peak RSS ${gib(x.peakRssBytes)}, planner's worst case ×${x.plannedVsPeakRss.toFixed(2)} of it`),
    `first request after the first start: first token after ${s(r.decode.ttftMs)}, then ${r.decode.tokPerSec.toFixed(2)} tok/s decode (1 request, ${r.decode.promptTokens}-token prompt, ${r.decode.newTokens} new tokens)`,
  ];
  if (r.fullLoad) {
    const f = r.fullLoad;
    lines.push(`full load (${f.sessions} sessions × ${f.promptTokens} prompt tokens filling the KV slots, then a full-context forward; ${s(f.ms)}): each worker's peak RSS against the planner (bound ±${r.bounds.plannerTolerance * 100} %)`);
    lines.push(...f.stages.map((x) => `  stage [${x.blocks.join(', ')}): ${x.kvSlots} KV slots; peak RSS ${gib(x.peakRssBytes)}, planner ${gib(x.plannedBytes)} = ×${x.plannedVsPeakRss.toFixed(2)}`));
  }
  if (r.recover) {
    const x = r.recover;
    lines.push(`recovery: worker ${x.killed} killed (SIGKILL) after ${x.killedAfterTokens} tokens; serving again after ${s(x.toServingMs)} (restart + cache-hit load; pipeline broken ${s(x.pipelineRecoveredMs)}); ${x.identical}/${x.requests} requests identical to the fault-free run${x.diverged.length ? ` (differ: ${x.diverged.map((d) => `request ${d.request} from token ${d.at}`).join(', ')})` : ''}; a second fault-free run: ${x.faultFreeRepeatIdentical}/${x.requests} identical to the first`);
  }
  lines.push(`report: ${join(outDir, 'bench.json')}`);
  return lines.join('\n');
}
