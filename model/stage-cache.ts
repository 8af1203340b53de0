import { existsSync, mkdirSync, renameSync, rmSync, statSync, writeFileSync, readFileSync } from 'node:fs';
import { availableParallelism, homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { loadModelSpec, type ModelSpec } from './config.ts';
import { Checkpoint } from './safetensors.ts';
import { allRefs, isLegacyBuffer, keyPrefix, stageWeights } from './layout.ts';
import { DEFAULT_SLOT_ROWS } from './graph/slot-attention.ts';
import { buildStageGraph, GRAPH_VERSION, type WeightDType } from './stage-graph.ts';
import { FileSink } from './onnx-builder.ts';
import { checkRange, rangeLabel, type BlockRange } from './range.ts';
import { isQuantized } from './dtype.ts';
import { isStrataError, StrataError } from './errors.ts';
import { parseDevice } from './executor.ts';
import { checkQuantKernels, quantScheme, schemeKey } from './quantize.ts';
import { QuantPool } from './quant-kernels.ts';
import { ProgressMeter, formatProgress, type LoadProgress } from './progress.ts';

export interface PreparedStage {
  spec: ModelSpec;
  range: BlockRange;
  dtype: WeightDType;
  /** Checkpoint identity: peers must agree on it before hidden states flow between them. */
  fingerprint: string;
  /** stage.onnx, with its weights in weights.bin beside it. */
  path: string;
  paramBytes: number;
  /** Whether this call built the graph (false: served from the disk cache). */
  built: boolean;
}

/**
 * Whether stage graphs use ORT's fused contrib kernels. They pass the same parity tests everywhere, but on the CPU
 * EP they measured no faster for decode (GPT-2-small: 25 vs 29 ms/step at 32 tokens of context) and slower over a
 * long KV cache (one block over 512 cached tokens: 10.5 vs 4.0 ms), so they default on for CUDA only.
 * STRATA_FUSED=1/0 overrides.
 */
export function defaultFused(device = 'cpu'): boolean {
  if (process.env.STRATA_FUSED === '1' || process.env.STRATA_FUSED === '0') return process.env.STRATA_FUSED === '1';
  return device.startsWith('cuda');
}

export const defaultCacheDir = (): string => process.env.STRATA_CACHE_DIR ?? join(homedir(), '.cache', 'strata');

export interface PrepareOptions {
  dtype?: WeightDType;
  fused?: boolean;
  device?: string;
  cacheDir?: string;
  rows?: number;
  quantBlockSize?: number;
  /** Threads an int8/int4 build quantizes on (default: this host's cores, at most 16; STRATA_QUANT_THREADS overrides). */
  threads?: number;
  onProgress?: (msg: string, load?: LoadProgress) => void;
}

/**
 * Returns the stage graph for `range` of the checkpoint in `modelDir`, building it on first use. Graphs are cached
 * on disk under (checkpoint fingerprint, range, dtype, graph version) and written atomically, so K workers sharing a
 * cache volume never see half a graph.
 */
export function prepareStage(
  modelDir: string,
  range: BlockRange,
  opts: PrepareOptions = {},
): PreparedStage {
  const dtype = opts.dtype ?? 'float32';
  const fused = opts.fused ?? defaultFused(opts.device);
  const spec = loadModelSpec(modelDir);
  // Decoder graphs have one attention row per batch row (KV slots, model/graph/slot-attention.ts): part of the key.
  const rows = spec.causal ? Math.max(1, opts.rows ?? DEFAULT_SLOT_ROWS) : 0;
  // KV slots resident on the device (WebGPU) are written in place by the graph; host slots take the new K/V as outputs.
  const kvInPlace = parseDevice(opts.device).kind === 'webgpu';
  checkRange(range, spec.blocks);
  // Quantized graphs: the scheme (bits, block, rounding) is part of the cache key, and a device without the kernels is refused before any work.
  const scheme = isQuantized(dtype) ? quantScheme(dtype, opts.quantBlockSize) : null;
  if (scheme) checkQuantKernels(parseDevice(opts.device).kind, scheme, dtype);
  const dtypeKey = scheme ? `${dtype}-${schemeKey(scheme)}` : dtype;
  const ck = Checkpoint.open(modelDir);
  try {
    const fingerprint = ck.fingerprint();
    const dir = join(opts.cacheDir ?? defaultCacheDir(), fingerprint, `${range.first}-${range.last}-${dtypeKey}${fused ? '-fused' : ''}${rows ? `-r${rows}${kvInPlace ? '-kvd' : ''}` : ''}-v${GRAPH_VERSION}`);
    const path = join(dir, 'stage.onnx');
    const cached = readCompleteEntry(dir);
    if (cached) {
      const done = new ProgressMeter('building', rangeLabel(range), cached.paramBytes, 0, () => {}).finish({ cached: true, weightBytes: cached.paramBytes });
      opts.onProgress?.(`stage graph ${rangeLabel(range)} (${dtype}) from the cache: ${dir}`, done);
      return { spec, range, dtype, fingerprint, path, paramBytes: cached.paramBytes, built: false };
    }
    if (existsSync(dir)) opts.onProgress?.(`stage cache ${dir} is incomplete or corrupt: rebuilding it`);
    opts.onProgress?.(`building stage graph for blocks ${rangeLabel(range)} (${dtype}) of ${modelDir}`);
    const unexpected = unusedTensors(spec, ck);
    if (unexpected.length) opts.onProgress?.(`warning: the checkpoint has ${unexpected.length} tensors a ${spec.modelType} model does not use (${unexpected.slice(0, 3).join(', ')}…); is config.json from the same checkpoint?`);
    if (scheme) checkQuantizable(spec, range, ck, dtype);
    const tmp = `${dir}.tmp-${process.pid}-${Date.now()}`;
    mkdirSync(tmp, { recursive: true });
    let model: Uint8Array, paramBytes: number;
    // Progress counts checkpoint bytes read: known up front from the headers, whatever the output dtype.
    const prefix = keyPrefix(spec, (k) => ck.has(k));
    const refs = [...new Map(allRefs(stageWeights(spec, range, prefix)).map((r) => [r.key, r])).values()];
    const total = refs.reduce((a, r) => a + (ck.info(r.key)?.length ?? 0), 0);
    const sink = new FileSink(join(tmp, 'weights.bin'), 'weights.bin', linkWeights(total));
    const meter = new ProgressMeter('building', rangeLabel(range), total, refs.length, (p) => opts.onProgress?.(formatProgress(p), p), 500);
    const quantPool = scheme ? QuantPool.create(quantThreads(opts.threads)) : null;
    try {
      // Each tensor counts once, whether it was read, linked, or located and then read (a dtype that needs converting).
      const seen = new Set<string>();
      const counted = <T>(k: string, v: T): T => (seen.has(k) || (seen.add(k), meter.advance(ck.info(k)?.length ?? 0, 1)), v);
      const source = {
        prefix,
        readFloat32: (k: string, s: number[]) => counted(k, ck.readFloat32(k, s)),
        readRaw: (k: string, s: number[]) => counted(k, ck.readRaw(k, s)),
        locate: (k: string, s: number[]) => counted(k, ck.locate(k, s)),
        readInto: (k: string, s: number[], from: number, into: Uint8Array) => counted(k, ck.readInto(k, s, from, into)),
      };
      ({ model, paramBytes } = buildStageGraph(spec, range, source, sink, { dtype, fused, rows, kvInPlace, quantBlockSize: scheme?.blockSize, quantPool }));
    } catch (e) {
      sink.close();
      rmSync(tmp, { recursive: true, force: true });
      throw e;
    } finally {
      void quantPool?.close();
    }
    sink.close();
    writeFileSync(join(tmp, 'stage.onnx'), model);
    // meta.json is the completion marker, written last, with the sizes a later start checks before trusting the entry.
    const files = { ...Object.fromEntries(CACHE_FILES.map((f) => [f, statSync(join(tmp, f)).size])), ...sink.links };
    writeFileSync(join(tmp, 'meta.json'), JSON.stringify({ fingerprint, range, dtype, ...(scheme ? { quant: scheme } : {}), paramBytes, modelDir, files, complete: true }));
    rmSync(dir, { recursive: true, force: true });
    renameSync(tmp, dir);
    meter.finish({ weightBytes: paramBytes });
    opts.onProgress?.(`stage graph ${rangeLabel(range)} ready: ${(paramBytes / 2 ** 20).toFixed(1)} MiB of weights`);
    return { spec, range, dtype, fingerprint, path, paramBytes, built: true };
  } finally {
    ck.close();
  }
}

/**
 * prepareStage, then `open` its graph (an ORT session). A cached graph that ONNX Runtime refuses (bytes changed on
 * disk at the same size, or written wrong by an earlier strata) is deleted and built once more, rather than failing
 * every start until someone deletes it by hand. A graph ORT refuses right after it was built is raised as it is.
 */
export async function prepareAndOpen<T>(
  modelDir: string,
  range: BlockRange,
  opts: PrepareOptions,
  open: (prepared: PreparedStage) => Promise<T>,
): Promise<{ prepared: PreparedStage; opened: T }> {
  const prepared = prepareStage(modelDir, range, opts);
  try {
    return { prepared, opened: await open(prepared) };
  } catch (e) {
    if (prepared.built || !isStrataError(e) || e.code !== 'stage_graph_invalid') throw e;
    const dir = dirname(prepared.path);
    opts.onProgress?.(`stage cache ${dir} did not load (${e.message.split(': ').pop()!.split(';')[0]}): rebuilding it`);
    rmSync(dir, { recursive: true, force: true });
    const rebuilt = prepareStage(modelDir, range, opts);
    return { prepared: rebuilt, opened: await open(rebuilt) };
  }
}

const CACHE_FILES = ['stage.onnx', 'weights.bin'] as const;

/**
 * Threads a quantized build uses: STRATA_QUANT_THREADS, else the caller's (a worker's share of the host), else every
 * core, by default at most QUANT_THREADS_MAX. The codes do not depend on it (model/quant-kernels.ts, QuantPool).
 */
export function quantThreads(threads?: number, env = process.env.STRATA_QUANT_THREADS): number {
  const n = env ? Number(env) : Math.min(threads || availableParallelism(), QUANT_THREADS_MAX);
  return Number.isInteger(n) && n >= 1 ? n : 1;
}

/**
 * Each helper thread is a V8 isolate (~8 MiB while a build runs), and 16 threads of int4's search (~450 M
 * weights/s each) already quantize faster than a disk reads F16: more would cost memory for nothing.
 */
const QUANT_THREADS_MAX = 16;

/**
 * Whether a stage of `bytes` checkpoint bytes hard-links the tensors it stores unchanged (onnx-builder.ts FileSink)
 * instead of copying them: from STRATA_LINK_MIN_MB (default 256 MiB) up, where the copy costs seconds to minutes
 * (BioMedLM's 5 GB stage: 30 s, the whole build). Smaller stages copy, as before, and keep their cache entry
 * independent of the checkpoint's files. STRATA_LINK_WEIGHTS=0 never links.
 */
export function linkWeights(bytes: number): boolean {
  return process.env.STRATA_LINK_WEIGHTS !== '0' && bytes >= Number(process.env.STRATA_LINK_MIN_MB ?? 256) * 2 ** 20;
}

/**
 * A cache entry is used only when its meta.json (written last) says it is complete and every file has the size it
 * recorded: a directory left by a killed build, a truncated copy or a hand-edited file is rebuilt, never loaded.
 */
function readCompleteEntry(dir: string): { paramBytes: number } | null {
  try {
    const meta = JSON.parse(readFileSync(join(dir, 'meta.json'), 'utf8'));
    if (meta.complete !== true || typeof meta.paramBytes !== 'number' || !meta.files) return null;
    // Every recorded file, the hard-linked checkpoint shards included, must be there at its size.
    for (const f of new Set([...CACHE_FILES, ...Object.keys(meta.files)])) if (statSync(join(dir, f)).size !== meta.files[f]) return null;
    return { paramBytes: meta.paramBytes };
  } catch {
    return null;
  }
}

/** int8/int4 read each matrix as float32 and quantize it: a checkpoint already stored in integers cannot be. */
function checkQuantizable(spec: ModelSpec, range: BlockRange, ck: Checkpoint, dtype: string): void {
  for (const ref of allRefs(stageWeights(spec, range, keyPrefix(spec, (k) => ck.has(k))))) {
    const info = ck.info(ref.key);
    if (info && !['F32', 'F16', 'BF16'].includes(info.dtype)) {
      throw new StrataError('quant_source_dtype_unsupported',
        `--dtype ${dtype} quantizes F32, F16 or BF16 weights, but tensor "${ref.key}" is ${info.dtype} (an already quantized or integer checkpoint?): point --model at the original floating-point checkpoint`);
    }
  }
}

/** Tensors that are neither weights of this model type nor known legacy buffers (a tied head may store its copy). */
function unusedTensors(spec: ModelSpec, ck: Checkpoint): string[] {
  const known = new Set(allRefs(stageWeights(spec, { first: 0, last: spec.blocks }, keyPrefix(spec, (k) => ck.has(k)))).map((r) => r.key));
  return ck.keys().filter((k) => !known.has(k) && !isLegacyBuffer(k) && !(spec.tiedHead && k === 'lm_head.weight'));
}
