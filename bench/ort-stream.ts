import { existsSync, mkdirSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { StageSession } from '../model/executor.ts';
import { ElemType, FileSink, GraphBuilder } from '../model/onnx-builder.ts';
import { defaultCacheDir } from '../model/stage-cache.ts';

/**
 * ONNX Runtime's own weight-streaming rate: a chain of batch-1 MatMuls ([1, d] × [d, 4d], then × [4d, d], ...) over
 * weights far larger than any cache, run with the stage sessions' settings. It is the rate the decode step's big
 * matrix-vector products can reach on this machine, so a second (stricter) floor next to the memory-scan one. The
 * same probe over the model's own linear layers (their smaller matrices stream slower) separates what those layers
 * cost from what the rest of the decode step adds.
 */
export interface OrtStreamResult {
  threads: number;
  bytes: number;
  bytesPerSec: number;
  trialsMs: number[];
}

const D = 1024;
const LAYERS = 32; // 32 × 16 MiB = 512 MiB of float32 weights, like the bandwidth probe's buffer

/** The decode step's linear layers alone: per block q/k/v [d, 3d], output [d, d], MLP [d, inner] and [inner, d]; the LM head [vocab, d]. */
export interface LinearShapes {
  blocks: number;
  dModel: number;
  inner: number;
  vocab: number;
}

/** One probe graph: its file, its input width and the weight bytes one run reads. */
interface ProbeGraph {
  path: string;
  width: number;
  bytes: number;
}

/** Deterministic values of variance 1/rows: activations keep their scale down the chain (values that shrank into denormals would measure slow arithmetic, not memory). */
function filler() {
  let seed = 1;
  return (rows: number, n: number) => () => {
    const a = new Float32Array(n);
    const scale = Math.sqrt(12 / rows);
    for (let i = 0; i < n; i++) a[i] = ((((seed = (seed * 1103515245 + 12345) >>> 0) >>> 8) / 2 ** 24) - 0.5) * scale;
    return new Uint8Array(a.buffer);
  };
}

function writeGraph(dir: string, width: number, body: (g: GraphBuilder, x: string, fill: ReturnType<typeof filler>) => { y: string; outWidth: number }): string {
  const path = join(dir, 'model.onnx');
  if (existsSync(path)) return path;
  mkdirSync(dir, { recursive: true });
  const sink = new FileSink(join(dir, 'weights.bin.tmp'), 'weights.bin');
  const g = new GraphBuilder(sink);
  const { y, outWidth } = body(g, g.input('x', ElemType.FLOAT, [1, width]), filler());
  g.output(y, 'y', ElemType.FLOAT, [1, outWidth]);
  sink.close();
  renameSync(join(dir, 'weights.bin.tmp'), join(dir, 'weights.bin'));
  writeFileSync(path, g.encode('ort_stream_probe', { '': 17 }, {}));
  return path;
}

function chainGraph(cacheDir: string): ProbeGraph {
  const path = writeGraph(join(cacheDir, 'probes', `ort-stream-d${D}-l${LAYERS}-v2`), D, (g, x, fill) => {
    for (let l = 0; l < LAYERS; l++) {
      const dims = l % 2 === 0 ? [D, 4 * D] : [4 * D, D];
      x = g.o('MatMul', [x, g.weight(`w${l}`, ElemType.FLOAT, dims, fill(dims[0], 4 * D * D))]);
    }
    return { y: x, outWidth: D };
  });
  return { path, width: D, bytes: LAYERS * 4 * D * D * 4 };
}

/** The model's own linear layers at batch 1, as Gemms like the stage graphs' (a Slice keeps the chain's widths). */
function linearsGraph(cacheDir: string, s: LinearShapes): ProbeGraph {
  const { blocks, dModel: d, inner, vocab } = s;
  const path = writeGraph(join(cacheDir, 'probes', `ort-linears-b${blocks}-d${d}-i${inner}-v${vocab}-v1`), d, (g, x, fill) => {
    const gemm = (input: string, name: string, rows: number, cols: number) => g.o('Gemm', [input, g.weight(name, ElemType.FLOAT, [rows, cols], fill(rows, rows * cols))]);
    for (let b = 0; b < blocks; b++) {
      const qkv = gemm(x, `b${b}.qkv`, d, 3 * d);
      x = gemm(g.o('Slice', [qkv, g.constInt64([0]), g.constInt64([d]), g.constInt64([1])]), `b${b}.out`, d, d);
      x = gemm(gemm(x, `b${b}.up`, d, inner), `b${b}.down`, inner, d);
    }
    const head = g.o('Gemm', [x, g.weight('head', ElemType.FLOAT, [vocab, d], fill(d, vocab * d))], { transB: 1 });
    return { y: head, outWidth: vocab };
  });
  return { path, width: d, bytes: (blocks * (4 * d * d + 2 * d * inner) + vocab * d) * 4 };
}

/** A loaded probe session, kept open between interleaved rounds. */
export class OrtStreamProbe {
  private constructor(
    readonly threads: number,
    private readonly session: StageSession,
    private readonly graph: ProbeGraph,
  ) {}

  /** The MatMul chain over 512 MiB; given `linears`, the model's own linear layers instead. */
  static async open(threads: number, cacheDir = defaultCacheDir(), linears?: LinearShapes): Promise<OrtStreamProbe> {
    const graph = linears ? linearsGraph(cacheDir, linears) : chainGraph(cacheDir);
    const probe = new OrtStreamProbe(threads, await StageSession.create(graph.path, { threads }), graph);
    await probe.measure(1); // warm-up: pre-packing, first touch
    return probe;
  }

  async measure(trials = 5): Promise<OrtStreamResult> {
    const { bytes, width } = this.graph;
    const x = { dtype: 'float32' as const, dims: [1, width], data: new Float32Array(width).fill(0.5) };
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
