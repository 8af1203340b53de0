import { createHash } from 'node:crypto';
import { closeSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, renameSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { createRequire } from 'node:module';
import { basename, dirname, join } from 'node:path';
import { isQuantized } from './dtype.ts';
import { onnx } from './onnx-builder.ts';

/**
 * A quantized stage's packed image (STRATA_PACKED_IMAGE=1, packedImageUsed): ONNX Runtime's own optimised copy of the
 * stage graph with every MatMulNBits weight in MLAS's packed layout, saved next to the stage graph the first time a
 * CPU worker loads it (`save_external_prepacked_constant_initializers`), and loaded instead of it afterwards. ORT then
 * maps the packed weights from the file instead of keeping a packed copy of each in fresh memory: a GPT-J int8 stage
 * [20, 28) (2.0 GB, page cache warm) loaded in 3.1–3.3 s instead of 5.4–6.9 s, with 53–176 MB of anonymous memory
 * instead of 2.27 GB (bench/RESULTS.md, "Loading at size"). The logits are bit for bit those of the stage graph (the same
 * packed bytes; test/packed-image.test.ts).
 *
 * Two flaws of ORT 1.30's saved image are repaired before it is used (measured 2026-12-04; without the repair the
 * image computed NaN logits, or did not load at all):
 * - packed weights written at offsets that are not 64-byte aligned: MLAS finds the parts of a packed weight (codes,
 *   block sums, scales) by aligning addresses, so a misaligned blob is read at the wrong places. Each such blob is
 *   copied to an aligned offset at the end of the image's data file.
 * - the constants of an `If` branch listed twice in its subgraph ("initializer name is not unique"): dropped once.
 *
 * The packed layout depends on the CPU's instruction set (MLAS picks its kernels at run time) and on ORT's version, so
 * an image is keyed by both (`hostKey`): a stage cache shared by unlike hosts keeps one image per kind of host.
 * Float stages keep loading their stage graph: ORT still packs float weights while loading such an image (README).
 */

/** Files of a finished image, in its directory. */
const IMAGE_GRAPH = 'stage.onnx';
const IMAGE_DATA = 'image.bin';
const IMAGE_META = 'image.json';
/** MLAS aligns a packed weight's parts to 64 bytes (a cache line); a page-aligned mapping plus this offset keeps them. */
const BLOB_ALIGN = 64;

/** A packed weight's place in the image's data file, from its external-data entry "<kernel>+<hash>|<offset>;<length>;<flag>". */
export function prepackedSpan(value: string): { key: string; offset: number; length: number; flag: string } {
  const [key, span] = value.split('|');
  const [offset, length, flag] = span.split(';');
  return { key, offset: Number(offset), length: Number(length), flag };
}

/**
 * Whether stages of this dtype on this device load through a packed image: only with STRATA_PACKED_IMAGE=1. It is a
 * trade, measured on GPT-J int4 (2 workers, README): a restart on a warm page cache serves sooner (kill -9 → serving
 * 6.3 s instead of 9.2 s) and ORT's load needs little anonymous memory, but the first start writes the image (ORT's
 * load 18.6–21.7 s instead of 10.7 s), a cold cache hit reads more (ORT still packs each weight once to find its
 * blob, reading the codes, and then the blobs: 8.9 s instead of 6.7 s), and the image takes ~2.2× the stage's
 * weights on disk (ORT copies every initializer into it). So it stays off by default.
 */
export function packedImageUsed(dtype: string, deviceKind: string, env = process.env.STRATA_PACKED_IMAGE): boolean {
  return env === '1' && deviceKind === 'cpu' && isQuantized(dtype);
}

let cachedHostKey: string | null = null;

/** ORT's version and the CPU features MLAS dispatches on: what makes a packed layout valid on this host. */
export function hostKey(): string {
  if (cachedHostKey) return cachedHostKey;
  const require = createRequire(import.meta.url);
  const ortVersion = (require('onnxruntime-node/package.json') as { version: string }).version;
  let flags = '';
  try {
    const line = readFileSync('/proc/cpuinfo', 'utf8').split('\n').find((l) => l.startsWith('flags')) ?? '';
    flags = line.split(':')[1]?.trim().split(/\s+/).filter((f) => /^(avx|amx|fma|f16c|sse4|ssse3|bmi)/.test(f)).sort().join(' ') ?? '';
  } catch {
    // not Linux: the architecture alone, below
  }
  cachedHostKey = createHash('sha256').update(`${ortVersion}|${process.arch}|${flags}`).digest('hex').slice(0, 12);
  return cachedHostKey;
}

/** The image directory of a stage graph on this kind of host. */
export const imageDir = (stageGraph: string): string => join(dirname(stageGraph), `image-${hostKey()}`);

/** The finished image's graph for this stage graph, or null when there is none (or it is incomplete). */
export function readyImage(stageGraph: string): string | null {
  const dir = imageDir(stageGraph);
  try {
    const meta = JSON.parse(readFileSync(join(dir, IMAGE_META), 'utf8')) as { files?: Record<string, number> };
    if (!meta.files) return null;
    for (const [f, size] of Object.entries(meta.files)) if (statSync(join(dir, f)).size !== size) return null;
    return join(dir, IMAGE_GRAPH);
  } catch {
    return null;
  }
}

/** Removes a stage graph's image for this host (one that failed to load is written again on the next load). */
export function discardImage(stageGraph: string): void {
  rmSync(imageDir(stageGraph), { recursive: true, force: true });
}

/** Where ORT writes the raw image while it creates a session from the stage graph, and the session options that do it. */
export interface ImageWrite {
  stageGraph: string;
  tmp: string;
  optimizedModelFilePath: string;
  sessionConfig: Record<string, string>;
}

export function imageWrite(stageGraph: string): ImageWrite {
  removeStaleWrites(stageGraph);
  const tmp = `${imageDir(stageGraph)}.tmp-${process.pid}-${Date.now()}`;
  mkdirSync(tmp, { recursive: true });
  return {
    stageGraph,
    tmp,
    optimizedModelFilePath: join(tmp, IMAGE_GRAPH),
    sessionConfig: {
      save_external_prepacked_constant_initializers: '1',
      optimized_model_external_initializers_file_name: IMAGE_DATA,
      // every initializer in the data file: the graph itself stays small, whatever the stage's size
      optimized_model_external_initializers_min_size_in_bytes: '64',
    },
  };
}

/**
 * Repairs the raw image ORT wrote (the two flaws above) and moves it into place, atomically: a worker that dies
 * half way leaves a tmp directory, never a half image. Returns the bytes copied to realign packed weights.
 */
export function finishImage(w: ImageWrite): number {
  const graphPath = join(w.tmp, IMAGE_GRAPH);
  const dataPath = join(w.tmp, IMAGE_DATA);
  const model = onnx.ModelProto.decode(readFileSync(graphPath));
  const fd = openSync(dataPath, 'r+');
  let copied = 0;
  try {
    let end = statSync(dataPath).size;
    const buf = Buffer.allocUnsafe(16 << 20);
    const move = (offset: number, length: number): number => {
      const to = Math.ceil(end / BLOB_ALIGN) * BLOB_ALIGN;
      for (let done = 0; done < length; ) {
        const n = readSync(fd, buf, 0, Math.min(buf.length, length - done), offset + done);
        if (n <= 0) throw new Error(`${dataPath} ends inside a packed weight`);
        writeSync(fd, buf, 0, n, to + done);
        done += n;
      }
      end = to + length;
      copied += length;
      return to;
    };
    type Graph = NonNullable<ReturnType<typeof onnx.ModelProto.decode>['graph']>;
    const repair = (g: Graph): void => {
      // A repeated constant is kept once, and only if both copies are the same tensor (ORT wrote them twice).
      const seen = new Map<string, string>();
      g.initializer = (g.initializer ?? []).filter((t) => {
        const length = t.externalData?.find((e) => e.key === 'length')?.value ?? '';
        const sig = `${t.dataType}|${(t.dims ?? []).join('x')}|${length}|${Buffer.from(t.rawData ?? []).toString('base64')}`;
        const first = seen.get(t.name!);
        if (first === undefined) return Boolean(seen.set(t.name!, sig));
        if (first !== sig) throw new Error(`the image has two different initializers named ${t.name}`);
        return false;
      });
      for (const t of g.initializer) {
        for (const e of t.externalData ?? []) {
          if (e.key === 'location' && e.value !== IMAGE_DATA) throw new Error(`initializer ${t.name} is stored in ${e.value}, not in ${IMAGE_DATA}`);
          if (!e.key!.startsWith('prepacked')) continue;
          const { key, offset, length, flag } = prepackedSpan(e.value!);
          if (offset % BLOB_ALIGN !== 0) e.value = `${key}|${move(offset, length)};${length};${flag}`;
        }
      }
      for (const n of g.node ?? []) for (const a of n.attribute ?? []) if (a.g) repair(a.g as Graph);
    };
    repair(model.graph!);
  } finally {
    closeSync(fd);
  }
  writeFileSync(graphPath, onnx.ModelProto.encode(model).finish());
  const files = Object.fromEntries([IMAGE_GRAPH, IMAGE_DATA].map((f) => [f, statSync(join(w.tmp, f)).size]));
  writeFileSync(join(w.tmp, IMAGE_META), JSON.stringify({ hostKey: hostKey(), files }));
  const dir = imageDir(w.stageGraph);
  rmSync(dir, { recursive: true, force: true });
  renameSync(w.tmp, dir);
  return copied;
}

/** Raw images of writers that died half way (an OOM kill while loading): gigabytes each, of no use to anyone. */
function removeStaleWrites(stageGraph: string): void {
  const prefix = `${basename(imageDir(stageGraph))}.tmp-`;
  let names: string[] = [];
  try {
    names = readdirSync(dirname(stageGraph)).filter((n) => n.startsWith(prefix));
  } catch {
    return;
  }
  for (const name of names) {
    const pid = Number(name.slice(prefix.length).split('-')[0]);
    if (pid === process.pid || alive(pid)) continue;
    rmSync(join(dirname(stageGraph), name), { recursive: true, force: true });
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Drops a raw image that will not be finished (the session failed, or the repair did). */
export function abandonImage(w: ImageWrite): void {
  rmSync(w.tmp, { recursive: true, force: true });
}
