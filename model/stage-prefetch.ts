import { closeSync, openSync, readFileSync, readSync, statSync } from 'node:fs';
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
    model = onnx.ModelProto.decode(readFileSync(graphPath));
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
  return [[graphPath, 0, statSync(graphPath).size] as WeightSpan, ...spans.values()].sort((a, b) => a[0].localeCompare(b[0]) || a[1] - b[1]);
}

/**
 * Reads the spans once, file by file in offset order, 16 MiB at a time; returns the bytes read. A float graph's
 * session maps its weights instead of copying them (executor.ts, stagePrepack): reading them here first puts them in
 * the page cache at disk speed, so a stage reports serving with its weights in memory and its first request does not
 * page them in 4 KiB at a time.
 */
export function readSpans(spans: WeightSpan[]): number {
  const buf = Buffer.allocUnsafe(16 << 20);
  let bytes = 0;
  for (const file of new Set(spans.map((x) => x[0]))) {
    const fd = openSync(file, 'r');
    try {
      let end = 0; // spans may overlap (views of one weight): each byte once
      for (const [, offset, length] of spans.filter((x) => x[0] === file)) {
        for (let at = Math.max(offset, end); at < offset + length; ) {
          const n = readSync(fd, buf, 0, Math.min(buf.length, offset + length - at), at);
          if (n <= 0) break;
          at += n;
          bytes += n;
        }
        end = Math.max(end, offset + length);
      }
    } finally {
      closeSync(fd);
    }
  }
  return bytes;
}
