// Where a quantized batch-1 step's time goes: the stage graph as built, against a copy of it whose `MatMulNBits`
// nodes are swapped for a trivial op of the same output shape. The difference is what the linear layers take inside
// the step, which `strata bench --suite quant` sets against llama.cpp's whole step at the same width: where the
// linear layers alone take longer, no change to the rest of the graph can close the gap (README, "What bounds batch 1").
import { spawnSync } from 'node:child_process';
import { linkSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { onnx } from '../model/onnx-builder.ts';
import { StrataError } from '../model/errors.ts';
import type { StageDType } from '../model/dtype.ts';
import { median } from './stats.ts';

type Graph = NonNullable<ReturnType<typeof onnx.ModelProto.decode>['graph']>;
type Node = Graph['node'] extends (infer N)[] | null | undefined ? N : never;

/**
 * Writes `<stage dir>-no-linears/`: the stage graph with each MatMulNBits(A, …) → Y replaced by
 * MatMul(Slice(A, its first feature), ones[1, N]) → Y, so every later node sees the shape it saw (values change:
 * timing only), and its quantized token lookup by a plain one (plainGather). The weight files are hard links (ORT refuses links that leave the graph's folder). Returns the copy's
 * graph path; the caller removes its folder.
 */
export function writeWithoutLinears(graphPath: string): { graph: string; swapped: number } {
  const src = dirname(graphPath);
  const dst = `${src}-no-linears`;
  rmSync(dst, { recursive: true, force: true });
  mkdirSync(dst);
  // Regular files only: a packed image's folder (model/packed-image.ts) is not the stage graph's.
  for (const f of readdirSync(src, { withFileTypes: true })) {
    if (f.isFile() && f.name !== basename(graphPath)) linkSync(join(src, f.name), join(dst, f.name));
  }
  const model = onnx.ModelProto.decode(readFileSync(graphPath));
  const swapped = swapLinears(model.graph!);
  const graph = join(dst, basename(graphPath));
  writeFileSync(graph, onnx.ModelProto.encode(model).finish());
  return { graph, swapped };
}

function swapLinears(g: Graph): number {
  const T = onnx.TensorProto.DataType;
  const initializers = (g.initializer ??= []);
  const int64 = (name: string, v: number) => initializers.push(onnx.TensorProto.create({ name, dataType: T.INT64, dims: [1], int64Data: [v] }));
  int64('nolin.start', 0);
  int64('nolin.end', 1);
  int64('nolin.axis', -1);
  const ones = new Set<number>();
  let n = 0;
  g.node = (g.node ?? []).flatMap((node) => {
    if (node.opType === 'GatherBlockQuantized') return plainGather(node);
    if (node.opType !== 'MatMulNBits') return [node];
    const N = Number(node.attribute?.find((a) => a.name === 'N')?.i);
    if (!ones.has(N)) {
      ones.add(N);
      initializers.push(onnx.TensorProto.create({ name: `nolin.ones.${N}`, dataType: T.FLOAT, dims: [1, N], rawData: new Uint8Array(new Float32Array(N).fill(1e-3).buffer) }));
    }
    const col = `nolin.col.${n++}`;
    return [
      onnx.NodeProto.create({ opType: 'Slice', input: [node.input![0], 'nolin.start', 'nolin.end', 'nolin.axis'], output: [col] }),
      onnx.NodeProto.create({ opType: 'MatMul', input: [col, `nolin.ones.${N}`], output: node.output }),
    ];
  });
  return n;
}

/**
 * GatherBlockQuantized(rows, ids, …) → Cast(Gather(rows, ids)), its bytes twice at 4 bits: the same output shape, at
 * about its cost in the stage graph (~25 µs a token in ORT's profile). Left in place without the tied LM head's
 * MatMulNBits reading the same table, ORT's profile put it at 229 µs a call (ORT 1.30, GPT-2-small at int4).
 */
function plainGather(node: Node): Node[] {
  const bits = Number(node.attribute?.find((a) => a.name === 'bits')?.i ?? 4);
  const [rows, ids] = node.input!;
  const out = node.output![0];
  const gathered = `${out}.nolin.rows`;
  const nodes = [onnx.NodeProto.create({ opType: 'Gather', input: [rows, ids], output: [gathered], attribute: [{ name: 'axis', type: onnx.AttributeProto.AttributeType.INT, i: 0 }] })];
  if (bits === 8) return [...nodes, onnx.NodeProto.create({ opType: 'Cast', input: [gathered], output: [out], attribute: [{ name: 'to', type: onnx.AttributeProto.AttributeType.INT, i: onnx.TensorProto.DataType.FLOAT }] })];
  const half = `${out}.nolin.half`;
  return [
    ...nodes,
    onnx.NodeProto.create({ opType: 'Cast', input: [gathered], output: [half], attribute: [{ name: 'to', type: onnx.AttributeProto.AttributeType.INT, i: onnx.TensorProto.DataType.FLOAT }] }),
    onnx.NodeProto.create({ opType: 'Concat', input: [half, half], output: [out], attribute: [{ name: 'axis', type: onnx.AttributeProto.AttributeType.INT, i: -1 }] }),
  ];
}

export interface LinearShare {
  dtype: StageDType;
  /** Median ms of a batch-1 decode step of the one-row stage graph, and of its copy without linear layers. */
  stepMs: number;
  withoutLinearsMs: number;
  /** stepMs − withoutLinearsMs: the linear layers' time inside the step. */
  linearsMs: number;
  /** Given `altBlock`: the same one-row step with the weights in blocks of that size, in the same rounds. */
  alt?: { blockSize: number; stepMs: number };
  samples: { stepMs: number[]; withoutLinearsMs: number[]; altStepMs?: number[] };
}

const CHILD = join(dirname(fileURLToPath(import.meta.url)), 'linear-share-child.ts');

/** Runs bench/linear-share-child.ts in a process of its own (ORT's runs block the event loop they run on). */
export function measureLinearShare(model: string, dtype: StageDType, threads: number, rounds: number, cacheDir?: string, altBlock?: number): LinearShare {
  const r = spawnSync(process.execPath, ['--import', 'tsx', CHILD, JSON.stringify({ model, dtype, threads, rounds, steps: 24, cacheDir, altBlock })], { encoding: 'utf8', maxBuffer: 16 << 20 });
  const line = r.stdout.trim().split('\n').at(-1) ?? '';
  if (r.status !== 0 || !line.startsWith('{')) throw new StrataError('bench_flag_invalid', `the linear-share child failed: ${r.stderr.slice(-2000)}`);
  const samples = JSON.parse(line) as LinearShare['samples'];
  const [stepMs, withoutLinearsMs] = [median(samples.stepMs), median(samples.withoutLinearsMs)];
  const alt = altBlock && samples.altStepMs ? { blockSize: altBlock, stepMs: median(samples.altStepMs) } : undefined;
  return { dtype, stepMs, withoutLinearsMs, linearsMs: stepMs - withoutLinearsMs, ...(alt ? { alt } : {}), samples };
}
