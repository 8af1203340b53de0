import * as ort from 'onnxruntime-node';
import type { TensorData } from './tensor.ts';
import { StrataError } from './errors.ts';

export interface SessionOptions {
  /** ORT intra-op threads; pick so K workers on one host do not oversubscribe its cores. */
  threads?: number;
  device?: 'cpu' | `cuda:${number}`;
}

const toOrt = (t: TensorData) => new ort.Tensor(t.dtype, t.data, t.dims);
const fromOrt = (t: ort.Tensor): TensorData => ({ dtype: t.type as TensorData['dtype'], dims: [...t.dims], data: t.data as TensorData['data'] });

/**
 * One ORT session over one stage graph. `run` is a synchronous native call under the hood: callers that serve
 * sockets must host this in a worker thread (worker/), the CLI's in-process path may call it directly.
 */
export class StageSession {
  private constructor(
    private readonly session: ort.InferenceSession,
    readonly executionProvider: string,
  ) {}

  static async create(path: string, opts: SessionOptions = {}): Promise<StageSession> {
    const base: ort.InferenceSession.SessionOptions = {
      graphOptimizationLevel: 'all',
      intraOpNumThreads: opts.threads ?? 0,
      interOpNumThreads: 1,
      executionMode: 'sequential',
      // Idle intra-op threads must not spin: K stages share the host's cores, and a spinning idle stage steals them
      // from the stage that has work (measured: K=4 × 2 threads went from 60-166 to 18-33 ms/token).
      extra: { session: { intra_op: { allow_spinning: '0' }, inter_op: { allow_spinning: '0' } } },
    };
    const device = opts.device ?? 'cpu';
    if (device.startsWith('cuda')) {
      const deviceId = Number(device.split(':')[1] ?? 0);
      try {
        return new StageSession(await ort.InferenceSession.create(path, { ...base, executionProviders: [{ name: 'cuda', deviceId }] }), 'cuda');
      } catch (e) {
        // Never silently: the operator asked for a GPU and is not getting one.
        console.error(`[strata] WARNING: CUDA execution provider unavailable (${(e as Error).message.split('\n')[0]}); FALLING BACK TO CPU. Install onnxruntime-node with ONNXRUNTIME_NODE_INSTALL=cuda12 on a CUDA 12 host.`);
      }
    }
    try {
      return new StageSession(await ort.InferenceSession.create(path, { ...base, executionProviders: ['cpu'] }), 'cpu');
    } catch (e) {
      throw new StrataError('stage_graph_invalid', `ONNX Runtime could not load ${path}: ${(e as Error).message}; delete the stage cache directory and retry`, 'internal');
    }
  }

  get inputNames(): readonly string[] {
    return this.session.inputNames;
  }

  /**
   * Runs the graph. `preallocated` outputs (e.g. KV caches, whose shapes the caller knows) are written by ORT straight
   * into those JS buffers: letting the binding hand back large outputs costs far more (measured: 3 MB of present
   * KV took 4-7 ms to come back, against ~1 ms to compute).
   */
  async run(feeds: Record<string, TensorData>, preallocated: Record<string, TensorData> = {}): Promise<Record<string, TensorData>> {
    const ortFeeds: Record<string, ort.Tensor> = {};
    for (const [k, v] of Object.entries(feeds)) ortFeeds[k] = toOrt(v);
    const fetches: Record<string, ort.Tensor | null> = {};
    for (const name of this.session.outputNames) fetches[name] = preallocated[name] ? toOrt(preallocated[name]) : null;
    const out = await this.session.run(ortFeeds, fetches as ort.InferenceSession.FetchesType);
    const result: Record<string, TensorData> = {};
    for (const [k, v] of Object.entries(out)) result[k] = preallocated[k] ?? fromOrt(v);
    return result;
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}
