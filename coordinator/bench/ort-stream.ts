import { existsSync, mkdirSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { StageSession } from '../../model/executor.ts';
import { ElemType, FileSink, GraphBuilder } from '../../model/onnx-builder.ts';
import { defaultCacheDir } from '../../model/stage-cache.ts';

/**
 * ONNX Runtime's own weight-streaming rate: a chain of batch-1 MatMuls ([1, d] × [d, 4d], then × [4d, d], ...) over
 * weights far larger than any cache, run with the stage sessions' settings. It is the rate the decode step's big
 * matrix-vector products can reach on this machine, so a second (stricter) floor next to the memory-scan one.
 */
export interface OrtStreamResult {
  threads: number;
  bytes: number;
  bytesPerSec: number;
  trialsMs: number[];
}

const D = 1024;
const LAYERS = 32; // 32 × 16 MiB = 512 MiB of float32 weights, like the bandwidth probe's buffer

function ensureGraph(cacheDir: string): string {
  const dir = join(cacheDir, 'probes', `ort-stream-d${D}-l${LAYERS}-v2`);
  const path = join(dir, 'model.onnx');
  if (existsSync(path)) return path;
  mkdirSync(dir, { recursive: true });
  const sink = new FileSink(join(dir, 'weights.bin.tmp'), 'weights.bin');
  const g = new GraphBuilder(sink);
  let x = g.input('x', ElemType.FLOAT, [1, D]);
  let seed = 1;
  const fill = (rows: number, n: number) => () => {
    // Deterministic values of variance 1/rows: activations keep their scale down the chain (values that shrank
    // into denormals would measure slow arithmetic, not memory).
    const a = new Float32Array(n);
    const scale = Math.sqrt(12 / rows);
    for (let i = 0; i < n; i++) a[i] = ((((seed = (seed * 1103515245 + 12345) >>> 0) >>> 8) / 2 ** 24) - 0.5) * scale;
    return new Uint8Array(a.buffer);
  };
  for (let l = 0; l < LAYERS; l++) {
    const dims = l % 2 === 0 ? [D, 4 * D] : [4 * D, D];
    x = g.o('MatMul', [x, g.weight(`w${l}`, ElemType.FLOAT, dims, fill(dims[0], 4 * D * D))]);
  }
  g.output(x, 'y', ElemType.FLOAT, [1, D]);
  sink.close();
  renameSync(join(dir, 'weights.bin.tmp'), join(dir, 'weights.bin'));
  writeFileSync(path, g.encode('ort_stream_probe', { '': 17 }, {}));
  return path;
}

/** A loaded probe session, kept open between interleaved rounds. */
export class OrtStreamProbe {
  private constructor(
    readonly threads: number,
    private readonly session: StageSession,
  ) {}

  static async open(threads: number, cacheDir = defaultCacheDir()): Promise<OrtStreamProbe> {
    const probe = new OrtStreamProbe(threads, await StageSession.create(ensureGraph(cacheDir), { threads }));
    await probe.measure(1); // warm-up: pre-packing, first touch
    return probe;
  }

  async measure(trials = 5): Promise<OrtStreamResult> {
    const bytes = LAYERS * 4 * D * D * 4;
    const x = { dtype: 'float32' as const, dims: [1, D], data: new Float32Array(D).fill(0.5) };
    const trialsMs: number[] = [];
    for (let t = 0; t < trials; t++) {
      const t0 = performance.now();
      await this.session.run({ x });
      trialsMs.push(performance.now() - t0);
    }
    return { threads: this.threads, bytes, bytesPerSec: bytes / (Math.min(...trialsMs) / 1000), trialsMs };
  }

  async close(): Promise<void> {
    await this.session.release();
  }
}
