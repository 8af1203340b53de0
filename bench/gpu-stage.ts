import { parseArgs } from 'node:util';
import { performance } from 'node:perf_hooks';
import { loadModelSpec, type ModelSpec } from '../model/config.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { activationDType, bytesPerWeight, parseStageDType, type StageDType } from '../model/dtype.ts';
import { parseDevice, type Transfer } from '../model/executor.ts';
import { slotBytes } from '../model/kv-slots.ts';
import { BYTES_PER_ELEMENT, type TensorData } from '../model/tensor.ts';
import { StrataError } from '../model/errors.ts';
import { ensureSyntheticModel, resolveShape, weightBytes } from './model.ts';
import { median } from './stats.ts';

/**
 * GPU figures for one BioMedLM-shaped stage (bench/gpu-stage.sh wraps this with the Vulkan checks):
 *
 *   node --import tsx bench/gpu-stage.ts [--device webgpu] [--blocks 16] [--dtype float16] [--hbm-gbps 4800]
 *
 * Writes a synthetic BioMedLM-shaped checkpoint (random weights, d_model 2560, 20 heads, vocab 28896, 1024
 * positions) of `--blocks` blocks (default 16: one stage of BioMedLM's 32 blocks in 2 stages) and runs it as ONE
 * stage (embedding lookup, the blocks, final norm and tied LM head) on `--device`. For each batch (1 and 8) it
 * prefills every session with `--prompt` tokens, then times `--steps` decode steps (after `--warmup`), and reports
 * ms per step, the host↔device bytes and KV bytes of a step (counted by the stage's executor, Stage.lastTransfer),
 * and the ratio to the weight-read floor: the bytes one decode step must read (every block weight, the LM head, one
 * embedding row) ÷ `--hbm-gbps` (default 4800 GB/s, an H200's HBM3e).
 */
export interface GpuStageOptions {
  blocks: number;
  dModel?: number;
  heads?: number;
  vocab?: number;
  device: string;
  dtype: StageDType;
  prompt: number;
  steps: number;
  warmup: number;
  batches: number[];
  hbmGbps: number;
  cacheDir?: string;
  json: boolean;
}

export const USAGE = `usage: bench/gpu-stage.sh [--device webgpu|cuda:N|cpu] [--blocks 16] [--dtype float16|float32|int8|int4]
       [--prompt 128] [--steps 32] [--warmup 4] [--batches 1,8] [--hbm-gbps 4800] [--cache-dir DIR] [--json]
       [--d-model D --heads H --vocab V]   (shrink the shape for a try-out on lavapipe)`;

const positiveInt = (name: string, v: string | undefined, dflt: number, min = 1): number => {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) throw new StrataError('bench_shape_invalid', `--${name} must be an integer ≥ ${min}, got "${v}"`);
  return n;
};

/** The command line → options, with typed errors for anything out of range. */
export function parseGpuStageArgs(argv: string[]): GpuStageOptions {
  const { values: v } = parseArgs({
    args: argv,
    strict: true,
    options: {
      blocks: { type: 'string' }, 'd-model': { type: 'string' }, heads: { type: 'string' }, vocab: { type: 'string' },
      device: { type: 'string' }, dtype: { type: 'string' }, prompt: { type: 'string' }, steps: { type: 'string' },
      warmup: { type: 'string' }, batches: { type: 'string' }, 'hbm-gbps': { type: 'string' }, 'cache-dir': { type: 'string' },
      json: { type: 'boolean' },
    },
  });
  const device = v.device ?? 'webgpu';
  parseDevice(device);
  const dtype = parseStageDType(v.dtype ?? 'float16', '--dtype');
  const batches = (v.batches ?? '1,8').split(',').map((b) => positiveInt('batches', b.trim(), 1));
  const hbmGbps = Number(v['hbm-gbps'] ?? 4800);
  if (!(hbmGbps > 0)) throw new StrataError('bench_shape_invalid', `--hbm-gbps must be a positive number of GB/s, got "${v['hbm-gbps']}"`);
  return {
    blocks: positiveInt('blocks', v.blocks, 16),
    dModel: v['d-model'] === undefined ? undefined : positiveInt('d-model', v['d-model'], 0),
    heads: v.heads === undefined ? undefined : positiveInt('heads', v.heads, 0),
    vocab: v.vocab === undefined ? undefined : positiveInt('vocab', v.vocab, 0),
    device,
    dtype,
    prompt: positiveInt('prompt', v.prompt, 128),
    steps: positiveInt('steps', v.steps, 32),
    warmup: positiveInt('warmup', v.warmup, 4, 0),
    batches,
    hbmGbps,
    cacheDir: v['cache-dir'],
    json: !!v.json,
  };
}

/**
 * Bytes one decode step reads from memory at least (float32 layout scaled to the stage dtype: int8/int4 count their
 * codes, scales and zero points, model/dtype.ts bytesPerWeight), and its time floor.
 */
export function weightFloor(spec: ModelSpec, dtype: StageDType, hbmGbps: number): { bytes: number; ms: number } {
  const bytes = (weightBytes(spec).readPerStep / 4) * bytesPerWeight(dtype);
  return { bytes, ms: (bytes / (hbmGbps * 1e9)) * 1e3 };
}

/**
 * KV bytes a decode step of `batch` sessions moves when the slots live in host memory (--device cuda:N; see the
 * README): every row binds its whole slot (n_positions, not just the session's length) as its past_* input, copied
 * up; the graph's idle rows bind one-position scratch buffers. Back comes only each session's new position (the
 * new_key/new_value outputs, which the runtime writes into the slot).
 */
export function hostKvBytesPerStep(spec: ModelSpec, layers: number, dtype: StageDType, batch: number, rows: number): { up: number; back: number } {
  const perPosition = 2 * layers * spec.heads * spec.headDim * BYTES_PER_ELEMENT[activationDType(dtype)];
  return { up: perPosition * (batch * spec.maxPositions + Math.max(0, rows - batch)), back: perPosition * batch };
}

export interface BatchResult {
  batch: number;
  prefillMs: number;
  msPerStep: number;
  msMin: number;
  tokPerS: number;
  /** One decode step's transfer (the largest seen over the timed steps). */
  hostToDevice: number;
  deviceToHost: number;
  kvBytes: number;
  ratioToFloor: number;
  /** Decode steps whose logits held NaN or Inf (should be 0). */
  nonFiniteSteps: number;
}

const i64 = (row: number[]): TensorData => ({ dtype: 'int64', dims: [1, row.length], data: BigInt64Array.from(row, BigInt) });
const argmax = (d: Float32Array, from: number, n: number): number => {
  let best = 0;
  for (let i = 1; i < n; i++) if (d[from + i] > d[from + best]) best = i;
  return best;
};

type Pipeline = Awaited<ReturnType<typeof LocalPipeline.load>>;

/** Prefills `batch` sessions, then times greedy decode steps of all of them as one stage run each. */
async function measureBatch(p: Pipeline, o: GpuStageOptions, batch: number, floorMs: number, seed: number): Promise<BatchResult> {
  const stage = p.stages[0];
  const spec = p.spec;
  let state = seed >>> 0 || 1;
  const rand = () => ((state ^= state << 13), (state ^= state >>> 17), (state ^= state << 5), (state >>> 0) % spec.vocab);
  const seqs = Array.from({ length: batch }, () => Array.from({ length: o.prompt }, rand));
  const caches = seqs.map(() => stage.emptyCache(1));
  try {
    const prefill: number[] = [];
    for (const [b, seq] of seqs.entries()) {
      const t0 = performance.now();
      const out = await stage.step({ inputIds: i64(seq), positionIds: i64(seq.map((_, j) => j)), attentionMask: i64(seq.map(() => 1)), logitPositions: { dtype: 'int64', dims: [1], data: BigInt64Array.of(BigInt(seq.length - 1)) } }, caches[b]);
      prefill.push(performance.now() - t0);
      seq.push(argmax(out.logits!.data as Float32Array, 0, spec.vocab));
    }
    const times: number[] = [];
    const worst: Transfer = { hostToDevice: 0, deviceToHost: 0, kvBytes: 0 };
    let nonFinite = 0;
    for (let s = 0; s < o.warmup + o.steps; s++) {
      const inputs = seqs.map((seq) => ({ inputIds: i64([seq.at(-1)!]), positionIds: i64([seq.length - 1]), attentionMask: i64(seq.map(() => 1)) }));
      const t0 = performance.now();
      const outs = batch === 1 ? [await stage.step(inputs[0], caches[0])] : await stage.stepBatch(inputs, caches);
      const dt = performance.now() - t0;
      if (s >= o.warmup) {
        times.push(dt);
        const t = stage.lastTransfer;
        worst.hostToDevice = Math.max(worst.hostToDevice, t.hostToDevice);
        worst.deviceToHost = Math.max(worst.deviceToHost, t.deviceToHost);
        worst.kvBytes = Math.max(worst.kvBytes, t.kvBytes);
      }
      outs.forEach((out, b) => seqs[b].push(argmax(out.logits!.data as Float32Array, 0, spec.vocab)));
      // A figure from a kernel that produced NaN/Inf would time the wrong thing: say so, loudly.
      if (!outs.every((out) => (out.logits!.data as Float32Array).every(Number.isFinite))) nonFinite++;
    }
    const ms = median(times);
    return { batch, prefillMs: median(prefill), msPerStep: ms, msMin: Math.min(...times), tokPerS: (batch * 1000) / ms, ...worst, ratioToFloor: ms / floorMs, nonFiniteSteps: nonFinite };
  } finally {
    caches.forEach((c) => stage.closeCache(c));
  }
}

export interface GpuStageReport {
  device: string;
  executionProvider: string;
  shape: { blocks: number; dModel: number; heads: number; vocab: number; maxPositions: number; dtype: string };
  weightBytesHeld: number;
  floor: { bytesPerStep: number; hbmGbps: number; ms: number };
  prompt: number;
  steps: number;
  buildMs: number;
  loadMs: number;
  /** The throwaway session's prefill and warm-up steps: shader compilation on WebGPU. */
  firstRunMs: number;
  batches: (BatchResult & { hostKv: { up: number; back: number } })[];
}

export async function runGpuStage(o: GpuStageOptions, log: (msg: string) => void): Promise<GpuStageReport> {
  const shape = resolveShape({ preset: 'biomedlm', blocks: o.blocks, dModel: o.dModel, heads: o.heads, vocab: o.vocab });
  const maxPositions = shape.maxPositions ?? 1024;
  if (o.prompt + 1 + o.warmup + o.steps > maxPositions) {
    throw new StrataError('prompt_too_long', `--prompt ${o.prompt} + --warmup ${o.warmup} + --steps ${o.steps} exceeds the model's ${maxPositions} positions`);
  }
  const t0 = performance.now();
  let last = 0;
  const { dir, built } = ensureSyntheticModel(shape, {
    cacheDir: o.cacheDir,
    onProgress: (done, total) => {
      if (performance.now() - last > 5000 || done === total) (last = performance.now(), log(`writing checkpoint: ${(done / 2 ** 30).toFixed(2)} / ${(total / 2 ** 30).toFixed(2)} GiB`));
    },
  });
  log(`${built ? 'wrote' : 'reusing'} synthetic checkpoint ${dir}`);
  const spec = loadModelSpec(dir);
  const rows = Math.max(...o.batches);
  // Budget for exactly `rows` slots: enough for the largest batch whatever the shape (slots are whole n_positions).
  const slot = slotBytes({ layers: Array.from({ length: spec.blocks }, (_, i) => i), heads: spec.heads, headDim: spec.headDim, maxLen: maxPositions, dtype: activationDType(o.dtype) });
  const buildStart = performance.now();
  const p = await LocalPipeline.load(dir, 1, { device: o.device, dtype: o.dtype, maxBatch: rows, kvBudgetBytes: rows * slot, cacheDir: o.cacheDir, onProgress: (m) => log(m) });
  const loadMs = performance.now() - buildStart;
  try {
    const floor = weightFloor(spec, o.dtype, o.hbmGbps);
    // A throwaway session first: the first runs of each shape compile its shaders (WebGPU) or allocate (CUDA), which
    // is load time, not decode time. Reported apart.
    log(`first run: prefill 1 × ${o.prompt} tokens and ${o.warmup} decode steps (shader compilation on WebGPU)`);
    const firstStart = performance.now();
    await measureBatch(p, { ...o, steps: 1 }, 1, floor.ms, 99);
    const firstRunMs = performance.now() - firstStart;
    const batches: GpuStageReport['batches'] = [];
    for (const b of o.batches) {
      log(`batch ${b}: prefill ${b} × ${o.prompt} tokens, then ${o.warmup} + ${o.steps} decode steps`);
      const r = await measureBatch(p, o, b, floor.ms, 1234 + b);
      batches.push({ ...r, hostKv: hostKvBytesPerStep(spec, spec.blocks, o.dtype, b, rows) });
    }
    return {
      device: o.device,
      executionProvider: p.stages[0].session.executionProvider,
      shape: { blocks: spec.blocks, dModel: spec.dModel, heads: spec.heads, vocab: spec.vocab, maxPositions, dtype: o.dtype },
      weightBytesHeld: p.prepared[0].paramBytes,
      floor: { bytesPerStep: floor.bytes, hbmGbps: o.hbmGbps, ms: floor.ms },
      prompt: o.prompt,
      steps: o.steps,
      buildMs: buildStart - t0,
      loadMs,
      firstRunMs,
      batches,
    };
  } finally {
    await p.close();
  }
}

const mb = (n: number) => `${(n / 1e6).toFixed(n < 1e5 ? 4 : 1)} MB`;

export function renderGpuStage(r: GpuStageReport): string {
  const s = r.shape;
  const lines = [
    `stage: ${s.blocks} blocks of a BioMedLM shape (d_model ${s.dModel}, ${s.heads} heads, vocab ${s.vocab}, ${s.maxPositions} positions), ${s.dtype}, on ${r.device} (${r.executionProvider} EP)`,
    `weights held ${mb(r.weightBytesHeld)}; read per decode step ${mb(r.floor.bytesPerStep)} → floor ${r.floor.ms.toPrecision(3)} ms at ${r.floor.hbmGbps} GB/s`,
    `prompt ${r.prompt} tokens, ${r.steps} timed decode steps; checkpoint ${(r.buildMs / 1e3).toFixed(1)} s, graph + session ${(r.loadMs / 1e3).toFixed(1)} s, first run ${(r.firstRunMs / 1e3).toFixed(1)} s`,
    '',
    '| batch | prefill ms/session | decode ms/step (p50) | min | tok/s | × floor | host→device B/step | device→host B/step | of them KV | KV per step if host-resident (cuda) |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ];
  for (const b of r.batches) {
    lines.push(`| ${b.batch} | ${b.prefillMs.toFixed(1)} | ${b.msPerStep.toFixed(2)} | ${b.msMin.toFixed(2)} | ${b.tokPerS.toFixed(1)} | ×${b.ratioToFloor.toFixed(2)} | ${b.hostToDevice} | ${b.deviceToHost} | ${b.kvBytes} | ${mb(b.hostKv.up)} up, ${mb(b.hostKv.back)} back |`);
  }
  for (const b of r.batches) if (b.nonFiniteSteps) lines.push(`WARNING: batch ${b.batch}: ${b.nonFiniteSteps} decode steps gave NaN/Inf logits; the timings are not of a working stage`);
  return lines.join('\n');
}

if (/gpu-stage\.(ts|mjs)$/.test(process.argv[1] ?? '')) { // .mjs: the bundle bench/gpu-pack.sh carries to a bare GPU host
  if (process.argv.includes('--help') || process.argv.includes('-h')) (process.stdout.write(`${USAGE}\n`), process.exit(0));
  try {
    const o = parseGpuStageArgs(process.argv.slice(2));
    const report = await runGpuStage(o, (m) => process.stderr.write(`${m}\n`));
    process.stdout.write(o.json ? `${JSON.stringify(report)}\n` : `${renderGpuStage(report)}\n`);
    // Dawn's threads can keep the process alive after the session is released. Exit 2: a stage gave NaN/Inf.
    process.exit(report.batches.some((b) => b.nonFiniteSteps) ? 2 : 0);
  } catch (e) {
    const err = e as StrataError;
    process.stderr.write(`${err.message}${err.code ? ` [${err.code}]` : ''}\n`);
    process.exit(1);
  }
}
