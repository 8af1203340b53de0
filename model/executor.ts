import { availableParallelism } from 'node:os';
import * as ort from 'onnxruntime-node';
import type { TensorData } from './tensor.ts';
import { StrataError } from './errors.ts';
import { isQuantized } from './dtype.ts';
import type { ImageWrite } from './packed-image.ts';

/** `cpu`, `cuda:N` (CUDA EP, device N) or `webgpu[:N]` (ORT's bundled WebGPU EP, Dawn; device context N). */
export type Device = 'cpu' | `cuda:${number}` | 'webgpu' | `webgpu:${number}`;

export interface ParsedDevice {
  kind: 'cpu' | 'cuda' | 'webgpu';
  id: number;
}

/** Reads a --device flag; anything else is a typed error naming the accepted forms. */
export function parseDevice(device: string | undefined): ParsedDevice {
  const m = /^(cpu|cuda|webgpu)(?::(\d+))?$/.exec(device ?? 'cpu');
  if (!m || (m[1] === 'cpu' && m[2] !== undefined)) throw new StrataError('device_invalid', `device "${device}" is not one of cpu, cuda:N, webgpu, webgpu:N`);
  return { kind: m[1] as ParsedDevice['kind'], id: Number(m[2] ?? 0) };
}

export interface SessionOptions {
  /** ORT intra-op threads; pick so K workers on one host do not oversubscribe its cores. */
  threads?: number;
  device?: Device | string;
  /**
   * Whether ORT prepacks weights when the session is created (default true; see stagePrepack). Without it ORT maps
   * the external weights instead of copying them into packed buffers.
   */
  prepack?: boolean;
  /** Also write the stage's packed image while creating the session (model/packed-image.ts; CPU, quantized stages). */
  image?: ImageWrite;
}

/**
 * Prepacking per stage dtype: on for every dtype. Without it (measured on a 5 GB BioMedLM float32 stage) ORT creates
 * the session in 0.3 s instead of 15 s warm / 33 s cold, but MLAS then runs a batch-1 Gemm by another kernel than a
 * batched one, so a session replayed alone after a worker fault no longer reproduces the logprobs it had in a batch
 * bit for bit (test/logprobs.test.ts) — and that identity is a contract. Quantized graphs need it anyway:
 * MatMulNBits without its packed layout decoded 28× slower. STRATA_ORT_PREPACK=0 trades the identity for the start
 * time of a float stage, for an operator who wants that.
 */
export const stagePrepack = (dtype: string): boolean => isQuantized(dtype) || process.env.STRATA_ORT_PREPACK !== '0';

/**
 * A tensor that lives in device memory (a WebGPU buffer). Never read on the host: onnxruntime-node's getData() on a
 * gpu-buffer tensor aborted the process (NOTES, 2026-11-29). Feed it back to a run; dispose it when replaced.
 */
export interface DeviceTensor {
  readonly device: true;
  readonly dims: readonly number[];
  readonly ort: ort.Tensor;
}

export type Feed = TensorData | DeviceTensor;
export const isDeviceTensor = (t: Feed | undefined): t is DeviceTensor => !!t && (t as DeviceTensor).device === true;

/** Bytes that crossed between host and device memory, counted per run from the tensors actually fed and fetched. */
export interface Transfer {
  hostToDevice: number;
  deviceToHost: number;
  /** Of those, bytes of KV cache (past_ and present_ tensors). */
  kvBytes: number;
}

/**
 * ORT tensors of long-lived buffers (KV slot views, scratch), made once: a run binds hundreds of them (layers × rows ×
 * key/value), and wrapping each anew every run cost milliseconds per step. Keyed by the TensorData object, whose
 * data and dims must then not change (KvSlots hands out the same objects while a slot's layout holds).
 */
const wrapped = new WeakMap<TensorData, ort.Tensor>();
const toOrt = (t: TensorData, keep = false): ort.Tensor => {
  if (!keep) return new ort.Tensor(t.dtype, t.data, t.dims);
  let o = wrapped.get(t);
  if (!o) wrapped.set(t, (o = new ort.Tensor(t.dtype, t.data, t.dims)));
  return o;
};
const fromOrt = (t: ort.Tensor): TensorData => ({ dtype: t.type as TensorData['dtype'], dims: [...t.dims], data: t.data as TensorData['data'] });
/** KV tensors by name: slot inputs (past_*), in-place outputs (present_*, WebGPU) and host slots' new K/V (new_*). */
const kvNames = new Map<string, boolean>(); // the answer per name: a run asks for ~200 names, the same every run
const isKv = (name: string): boolean => {
  let kv = kvNames.get(name);
  if (kv === undefined) kvNames.set(name, (kv = name.startsWith('past_') || name.startsWith('present_') || name.startsWith('new_key_') || name.startsWith('new_value_')));
  return kv;
};

/**
 * Whether a stage's ORT intra-op threads spin between a run's parallel sections rather than sleep and be woken for
 * each of its hundreds of nodes. A/B in one process (GPT-2-small, 2 threads, 2026-12-02, ms per decode step): int8
 * batch 1 12.1 → 10.0 and 11.2 → 9.6, fp32 batch 1 20.2 → 18.4, int8 batch 8 22.4 → 19.9, fp32 batch 8 39.1 → 36.7.
 * The spin ends with the run (force_spinning_stop): left spinning, an idle stage held a core the next stage needed
 * (2 stages in one process: 9 → 16 ms per token; it was 18-33 → 60-166 ms at 4 stages × 2 threads, which is why
 * spinning was off before). Spinning assumes the run's threads have their cores: by default a stage spins when its
 * threads fit the host's; STRATA_ORT_SPIN=0|1 decides (strata up sets 0 when its workers' threads exceed the cores).
 */
export function ortSpin(threads: number | undefined, env = process.env.STRATA_ORT_SPIN): boolean {
  if (env === '0' || env === '1') return env === '1';
  return (threads || availableParallelism()) <= availableParallelism();
}

/** The WebGPU EP options onnxruntime-node takes (its WebGpuExecutionProviderOption), as strings. */
const CACHE_MODES = ['disabled', 'lazyRelease', 'simple', 'bucket'] as const;
const WEBGPU_OPTIONS: Record<string, readonly string[]> = {
  validationMode: ['disabled', 'wgpuOnly', 'basic', 'full'],
  storageBufferCacheMode: CACHE_MODES,
  uniformBufferCacheMode: CACHE_MODES,
  queryResolveBufferCacheMode: CACHE_MODES,
  defaultBufferCacheMode: CACHE_MODES,
};

/**
 * Storage buffers are cached by exact size ('simple') rather than ORT's default size buckets, which keep at most 10
 * buffers of 8 MiB and fewer above: every decode step's present K/V is a fresh slot-sized buffer per row and layer
 * (256 at batch 8 for 16 BioMedLM layers), so with buckets nearly all were created and destroyed each step. On an
 * H200, BioMedLM-shaped 16-block float16 stage (bench/gpu-stage.sh, 2026-12-04): batch 8 213 → 36.4 ms per step,
 * batch 1 50.7 → 33.3. The exact sizes stay few: decode has one size per batch and WebGPU prefill runs in chunks of
 * at most WEBGPU_MAX_PROMPT_CHUNK tokens, so the cache does not grow with prompt lengths.
 */
const WEBGPU_DEFAULTS: Record<string, string> = { storageBufferCacheMode: 'simple' };

/**
 * The WebGPU EP's options: WEBGPU_DEFAULTS over ORT's own, overridden by STRATA_WEBGPU_OPTIONS (JSON, e.g.
 * '{"storageBufferCacheMode":"simple"}'); an unknown key or value is a typed error, not a silently ignored knob.
 */
export function webgpuOptions(env = process.env.STRATA_WEBGPU_OPTIONS): Record<string, string> {
  const opts: Record<string, string> = { ...WEBGPU_DEFAULTS };
  if (!env) return opts;
  let given: unknown;
  try {
    given = JSON.parse(env);
  } catch {
    throw new StrataError('device_invalid', `STRATA_WEBGPU_OPTIONS is not JSON: ${env}`);
  }
  for (const [k, v] of Object.entries(given as Record<string, unknown>)) {
    if (!WEBGPU_OPTIONS[k]?.includes(v as string)) {
      throw new StrataError('device_invalid', `STRATA_WEBGPU_OPTIONS: ${k}=${JSON.stringify(v)} is not one of ${Object.entries(WEBGPU_OPTIONS).map(([o, vs]) => `${o} (${vs.join('|')})`).join(', ')}`);
    }
    opts[k] = v as string;
  }
  return opts;
}

/** The WebGPU EP as ORT's session options name it, with webgpuOptions(). */
export const webgpuProvider = (): ort.InferenceSession.ExecutionProviderConfig => ({ name: 'webgpu', ...webgpuOptions() }) as ort.InferenceSession.ExecutionProviderConfig;

/**
 * One ORT session over one stage graph. `run` is a synchronous native call under the hood: callers that serve
 * sockets must host this in a worker thread (worker/), the CLI's in-process path may call it directly.
 */
export class StageSession {
  /** Totals since creation (the worker's metrics read them). */
  readonly transferred: Transfer = { hostToDevice: 0, deviceToHost: 0, kvBytes: 0 };
  /** The last run's transfer. */
  lastTransfer: Transfer = { hostToDevice: 0, deviceToHost: 0, kvBytes: 0 };

  private constructor(
    private readonly session: ort.InferenceSession,
    readonly executionProvider: 'cpu' | 'cuda' | 'webgpu',
    private readonly resident: ReadonlySet<string>,
  ) {}

  static async create(path: string | Uint8Array, opts: SessionOptions = {}): Promise<StageSession> {
    const base: ort.InferenceSession.SessionOptions = {
      graphOptimizationLevel: 'all',
      intraOpNumThreads: opts.threads ?? 0,
      interOpNumThreads: 1,
      executionMode: 'sequential',
      // force_spinning_stop: threads that spun during a run stop when it ends, so an idle stage never holds a core.
      extra: { session: { force_spinning_stop: '1', intra_op: { allow_spinning: ortSpin(opts.threads) ? '1' : '0' }, inter_op: { allow_spinning: '0' }, ...(opts.prepack === false ? { disable_prepacking: '1' } : {}), ...opts.image?.sessionConfig } },
      ...(opts.image ? { optimizedModelFilePath: opts.image.optimizedModelFilePath } : {}),
    };
    const device = parseDevice(opts.device);
    if (device.kind === 'webgpu' && device.id !== 0) {
      // The WebGPU EP's deviceId names a WebGPU context, not an adapter: ids other than 0 need a device handed in from
      // outside, which onnxruntime-node cannot do. Say so rather than run on another GPU than the one asked for.
      throw new StrataError('device_unavailable', `webgpu:${device.id}: onnxruntime-node's WebGPU EP always uses the default adapter; start one worker per GPU and pick its GPU through the Vulkan environment (e.g. MESA_VK_DEVICE_SELECT, VK_DRIVER_FILES), with --device webgpu`);
    }
    const providers: ort.InferenceSession.ExecutionProviderConfig[] = device.kind === 'cuda' ? [{ name: 'cuda', deviceId: device.id }] : device.kind === 'webgpu' ? [webgpuProvider()] : ['cpu'];
    // Warnings (unused initializers, shape ops kept on the CPU by the WebGPU EP) are expected: log errors only.
    const sessionOpts: ort.InferenceSession.SessionOptions = { ...base, executionProviders: providers, logSeverityLevel: 3 };
    // STRATA_ORT_PROFILE=PREFIX: ORT's per-node profile (JSON, chrome://tracing) of every run, written when the session ends.
    if (process.env.STRATA_ORT_PROFILE) Object.assign(sessionOpts, { enableProfiling: true, profileFilePrefix: process.env.STRATA_ORT_PROFILE });
    if (device.kind === 'webgpu') {
      // Resident outputs stay in GPU memory; everything the host reads comes back as CPU data in the same run.
      sessionOpts.preferredOutputLocation = 'cpu';
    }
    let session: ort.InferenceSession;
    try {
      session = await ort.InferenceSession.create(path as string, sessionOpts);
    } catch (e) {
      const why = (e as Error).message.split('\n')[0];
      if (device.kind === 'cpu') {
        throw new StrataError('stage_graph_invalid', `ONNX Runtime could not load ${typeof path === 'string' ? path : 'the stage graph'}: ${why}; delete the stage cache directory and retry`, 'internal');
      }
      // Never a silent fallback: the operator asked for this device and is not getting it.
      const fix = device.kind === 'cuda'
        ? 'install onnxruntime-node with ONNXRUNTIME_NODE_INSTALL=cuda12 on a CUDA 12 host, or pass --device cpu'
        : 'install a Vulkan driver (on a host without a GPU: mesa-vulkan-drivers from bookworm-backports, see .ci/lavapipe.sh; on NVIDIA: libvulkan1 and the driver ICD, VK_DRIVER_FILES), set XDG_RUNTIME_DIR, or pass --device cpu';
      throw new StrataError('device_unavailable', `the ${device.kind} execution provider could not start on device ${device.id} (${why}); ${fix}`);
    }
    // On WebGPU the KV outputs (present_*) stay in GPU memory and come back as DeviceTensors to feed the next run
    // (onnxruntime-node has device tensors for this EP only); everything else comes back as CPU data.
    const resident = new Set(device.kind === 'webgpu' ? session.outputNames.filter((n) => n.startsWith('present_')) : []);
    if (resident.size) {
      const loc: Record<string, ort.Tensor.DataLocation> = {};
      for (const name of session.outputNames) loc[name] = resident.has(name) ? 'gpu-buffer' : 'cpu';
      await session.release();
      session = await ort.InferenceSession.create(path as string, { ...sessionOpts, preferredOutputLocation: loc });
    }
    return new StageSession(session, device.kind, resident);
  }

  get inputNames(): readonly string[] {
    return this.session.inputNames;
  }

  get outputNames(): readonly string[] {
    return this.session.outputNames;
  }

  get onDevice(): boolean {
    return this.executionProvider !== 'cpu';
  }

  /**
   * Runs the graph. Resident outputs come back as DeviceTensors, the rest as host tensors. Outputs named in `skip`
   * are not fetched (ORT computes only what the rest needs, and copies nothing out for them).
   */
  async run(feeds: Record<string, Feed>, skip?: ReadonlySet<string>): Promise<Record<string, TensorData | DeviceTensor>> {
    const t: Transfer = { hostToDevice: 0, deviceToHost: 0, kvBytes: 0 };
    const ortFeeds: Record<string, ort.Tensor> = {};
    for (const [k, v] of Object.entries(feeds)) {
      if (isDeviceTensor(v)) {
        ortFeeds[k] = v.ort;
        continue;
      }
      ortFeeds[k] = toOrt(v, isKv(k));
      if (this.onDevice) {
        t.hostToDevice += v.data.byteLength;
        if (isKv(k)) t.kvBytes += v.data.byteLength;
      }
    }
    const out = skip?.size ? await this.session.run(ortFeeds, this.session.outputNames.filter((n) => !skip.has(n))) : await this.session.run(ortFeeds);
    const result: Record<string, TensorData | DeviceTensor> = {};
    for (const [k, v] of Object.entries(out)) {
      if (this.resident.has(k) && v.location === 'gpu-buffer') {
        result[k] = { device: true, dims: [...v.dims], ort: v };
        continue;
      }
      const host = fromOrt(v);
      result[k] = host;
      if (this.onDevice) {
        t.deviceToHost += host.data.byteLength;
        if (isKv(k)) t.kvBytes += host.data.byteLength;
      }
    }
    this.lastTransfer = t;
    this.transferred.hostToDevice += t.hostToDevice;
    this.transferred.deviceToHost += t.deviceToHost;
    this.transferred.kvBytes += t.kvBytes;
    return result;
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}
