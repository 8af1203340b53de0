import * as fs from 'node:fs';
import { Worker } from 'node:worker_threads';
import { dirname, join } from 'node:path';
import { onnx } from './onnx-builder.ts';
import { StrataError } from './errors.ts';
import { prepackedSpan } from './packed-image.ts';

/** One stretch of a file a stage graph's weights occupy: [file, offset, length]. */
export type WeightSpan = [string, number, number];

/**
 * Every byte range a stage graph reads: stage.onnx itself and each initializer's external data (in weights.bin, or in
 * a checkpoint shard the cache entry hard-links), in file and offset order.
 */
export function stageWeightSpans(graphPath: string): WeightSpan[] {
  const dir = dirname(graphPath);
  let model: ReturnType<typeof onnx.ModelProto.decode>;
  try {
    model = onnx.ModelProto.decode(fs.readFileSync(graphPath));
  } catch (e) {
    // The same error ONNX Runtime gives a graph it cannot parse: a cached one is then rebuilt (prepareAndOpen).
    throw new StrataError('stage_graph_invalid', `${graphPath} is not an ONNX model (${(e as Error).message}); delete the stage cache directory and retry`, 'internal');
  }
  const spans = new Map<string, WeightSpan>();
  for (const init of model.graph?.initializer ?? []) {
    const kv: Record<string, string> = Object.fromEntries((init.externalData ?? []).map((e) => [e.key, e.value]));
    if (kv.location) spans.set(`${kv.location}:${kv.offset}`, [join(dir, kv.location), Number(kv.offset), Number(kv.length)]);
    // A packed image (model/packed-image.ts) also holds each packed weight.
    for (const [k, v] of Object.entries(kv)) {
      if (!k.startsWith('prepacked') || !kv.location) continue;
      const { offset, length } = prepackedSpan(v);
      spans.set(`${kv.location}:${offset}`, [join(dir, kv.location), offset, length]);
    }
  }
  return [[graphPath, 0, fs.statSync(graphPath).size] as WeightSpan, ...spans.values()].sort((a, b) => a[0].localeCompare(b[0]) || a[1] - b[1]);
}

/**
 * The read: the spans once, file by file in offset order, `chunk` bytes at a time; the bytes read. Plain JavaScript
 * source, because readSpansInBackground runs it in an eval'd worker, which cannot import this TypeScript module;
 * readSpans runs the same source here.
 */
const READ_LOOP = `(spans, chunk, fs) => {
  const buf = Buffer.allocUnsafe(chunk);
  let bytes = 0;
  for (const file of new Set(spans.map((x) => x[0]))) {
    const fd = fs.openSync(file, 'r');
    try {
      let end = 0; // spans may overlap (views of one weight): each byte once
      for (const [, offset, length] of spans.filter((x) => x[0] === file)) {
        for (let at = Math.max(offset, end); at < offset + length; ) {
          const n = fs.readSync(fd, buf, 0, Math.min(chunk, offset + length - at), at);
          if (n <= 0) break;
          at += n;
          bytes += n;
        }
        end = Math.max(end, offset + length);
      }
    } finally {
      fs.closeSync(fd);
    }
  }
  return bytes;
}`;
const readLoop = (0, eval)(READ_LOOP) as (spans: WeightSpan[], chunk: number, fs: typeof import('node:fs')) => number;

/**
 * Reads the spans once, in order, 16 MiB at a time; returns the bytes read. A float graph's session maps its weights
 * instead of copying them (executor.ts, stagePrepack): reading them here first puts them in the page cache at disk
 * speed, so a stage reports serving with its weights in memory and its first request does not page them in 4 KiB at
 * a time.
 */
export function readSpans(spans: WeightSpan[]): number {
  return readLoop(spans, 16 << 20, fs);
}

/** Read size of the background read: small, so the copy out of the page cache stays in the CPU's caches. */
const BACKGROUND_CHUNK = 1 << 20;

/**
 * readSpans on a thread of its own, so that it runs while this thread is blocked in ONNX Runtime's session creation:
 * a quantized stage's load is its read plus ORT packing every weight, and reading ahead of ORT's packing overlaps the
 * two instead of putting one after the other (a cold GPT-J int8 cache hit on 2 workers: 3.6–3.9 s against 4.9–6.3 s
 * read first). Resolves with the bytes read; a read that fails only loses the overlap (ORT then reads those pages
 * itself and reports what is wrong with them), so it resolves with 0 rather than rejects.
 */
export function readSpansInBackground(spans: WeightSpan[]): Promise<number> {
  return new Promise((resolve) => {
    const worker = new Worker(`
const { parentPort, workerData } = require('node:worker_threads');
let bytes = 0;
try {
  bytes = (${READ_LOOP})(workerData.spans, workerData.chunk, require('node:fs'));
} catch {}
parentPort.postMessage(bytes);`, { eval: true, workerData: { spans, chunk: BACKGROUND_CHUNK } });
    worker.once('message', resolve);
    worker.once('error', () => resolve(0));
    worker.once('exit', () => resolve(0)); // after 'message', a no-op
  });
}
