import { QUANT_KERNELS_WASM } from './quant-kernels.wasm.ts';
import { Worker } from 'node:worker_threads';

/**
 * The quantizer's inner loops in WebAssembly SIMD (model/quant-kernels.wat): the same codes, scales and zero points as
 * the JavaScript loops in quantize.ts, bit for bit (test/quant-kernels.test.ts), several times faster. An int8 build
 * of GPT-J's F16 checkpoint was those loops at ~80 M weights/s on one core, most of a stage's build, and int4's
 * search ran at ~3 M/s (16 minutes a stage); V8 has no SIMD for JavaScript, and a native addon would need a compiler
 * on every install, so the loops are hand-written WebAssembly. STRATA_QUANT_SIMD=0 runs the JavaScript loops instead.
 */
interface Kernels {
  q8(src: number, width: number, blocks: number, blockSize: number, codes: number, scales: number, zeros: number): void;
  q4(src: number, width: number, blocks: number, blockSize: number, codes: number, scales: number, zeros: number, tmp: number): void;
  t32(src: number, rows: number, n: number, dst: number, k: number): void;
}

interface Instance {
  module: WebAssembly.Module;
  /** Shared: QuantPool's helper threads run the same kernels over it. */
  memory: WebAssembly.Memory;
  kernels: Kernels;
}

let loaded: Instance | null | undefined;

/** The instance, made on first use; null where it cannot run (no WebAssembly SIMD or threads), or when switched off. */
function instance(): Instance | null {
  if (loaded === undefined) {
    try {
      if (process.env.STRATA_QUANT_SIMD === '0') throw new Error('off');
      const module = new WebAssembly.Module(Buffer.from(QUANT_KERNELS_WASM, 'base64'));
      const memory = new WebAssembly.Memory({ initial: 1, maximum: MAX_PAGES, shared: true });
      loaded = { module, memory, kernels: new WebAssembly.Instance(module, { env: { memory } }).exports as unknown as Kernels };
    } catch {
      loaded = null;
    }
  }
  return loaded;
}

/** The memory's bound, as the .wat declares it (1 GiB; a chunk and its outputs take tens of MiB). */
const MAX_PAGES = 16384;

/** Grows the kernels' memory to at least `bytes` (take views of it after: a grown shared memory has a new buffer). */
function reserve(memory: WebAssembly.Memory, bytes: number): void {
  const have = memory.buffer.byteLength;
  if (have < bytes) memory.grow(Math.ceil((bytes - have) / 65536));
}

type KernelName = Exclude<keyof Kernels, 't32'>; // the transpose runs on the builder's thread only
const KERNEL_IDS: Record<KernelName, number> = { q8: 0, q4: 1 };

/** One kernel call on this thread. */
const call = (inst: Instance, kernel: KernelName, args: number[]): void => (inst.kernels[kernel] as (...a: number[]) => void)(...args);

/**
 * Helper threads that run the kernels on other blocks of the same chunk, over the same shared memory: a stage's build
 * then quantizes on as many cores as the worker was given (int4's search: ~440–490 M weights/s per core on an AMD
 * EPYC host, so a GPT-J stage of 3 G weights builds in ~10 s on one). The builder is synchronous, so a call blocks in
 * Atomics.wait until its helpers are done; each helper blocks the same way until it is given a part. Blocks are
 * independent, so the codes, scales and zero points are the same whatever the number of threads. close() ends the
 * helpers.
 */
export class QuantPool {
  private readonly helpers: Worker[] = [];
  /** Per helper, 16 int32: [job, done, kernel, 8 arguments, failed]. */
  private readonly control: Int32Array;
  private job = 0;

  private constructor(private readonly inst: Instance, helpers: number) {
    this.control = new Int32Array(new SharedArrayBuffer(helpers * 64));
    for (let at = 0; at < helpers; at++) {
      const w = new Worker(HELPER, { eval: true, workerData: { module: inst.module, memory: inst.memory, control: this.control.buffer, at } });
      w.unref();
      this.helpers.push(w);
    }
  }

  /** A pool of `threads` threads in all (this one and threads − 1 helpers); null for one thread, or without the kernels. */
  static create(threads: number): QuantPool | null {
    const inst = instance();
    return inst && threads > 1 ? new QuantPool(inst, Math.floor(threads) - 1) : null;
  }

  get threads(): number {
    return this.helpers.length + 1;
  }

  /**
   * `kernel` over its blocks (argument `blocksAt`), split into runs of whole quads of blocks across the threads: part p
   * moves each argument on by its first block × `perBlock` (bytes per block of src, codes, scales, zeros; 0 for the
   * rest) and its `tmp` (argument `tmpAt`) on by p × tmpBytes.
   */
  run(kernel: KernelName, args: number[], perBlock: number[], blocksAt: number, tmpAt = -1, tmpBytes = 0): void {
    const blocks = args[blocksAt];
    const share = Math.ceil(blocks / this.threads / 4) * 4;
    const part = (p: number): number[] | null => {
      const first = p * share;
      if (first >= blocks) return null;
      return args.map((a, i) => (i === blocksAt ? Math.min(share, blocks - first) : i === tmpAt ? a + p * tmpBytes : a + first * perBlock[i]));
    };
    const job = ++this.job;
    const posted: number[] = [];
    const control = (h: number) => this.control.subarray(h * 16, h * 16 + 16);
    this.helpers.forEach((_, h) => {
      const a = part(h + 1);
      if (!a) return;
      const c = control(h);
      c[2] = KERNEL_IDS[kernel];
      c.set(a, 3);
      Atomics.store(c, 0, job);
      Atomics.notify(c, 0);
      posted.push(h);
    });
    call(this.inst, kernel, part(0)!);
    for (const h of posted) {
      const c = control(h);
      for (let done = Atomics.load(c, 1); done !== job; done = Atomics.load(c, 1)) {
        // A part is a few MiB of weights (well under a second): a minute without an answer is a helper that died.
        if (Atomics.wait(c, 1, done, 60_000) === 'timed-out') throw new Error(`quantizer helper thread ${h} did not answer in 60 s`);
      }
      if (c[11]) throw new Error(`quantizer helper thread ${h} failed on ${kernel}`);
    }
  }

  async close(): Promise<void> {
    await Promise.all(this.helpers.map((w) => w.terminate()));
  }
}

/** A helper's loop (CommonJS, eval'd: it needs no loader): wait for a part, run it, say done. */
const HELPER = `
const { workerData } = require('node:worker_threads');
const { module, memory, control, at } = workerData;
const k = new WebAssembly.Instance(module, { env: { memory } }).exports;
const kernels = [k.q8, k.q4];
const c = new Int32Array(control, at * 64, 16);
for (let seen = 0; ; ) {
  Atomics.wait(c, 0, seen);
  seen = Atomics.load(c, 0);
  try {
    kernels[c[2]](c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10]);
    c[11] = 0;
  } catch {
    c[11] = 1;
  }
  Atomics.store(c, 1, seen);
  Atomics.notify(c, 1);
}`;

/** Runs `kernel` over its blocks on the pool's threads, or on this one (QuantPool.run's arguments). */
function runKernel(inst: Instance, pool: QuantPool | null | undefined, kernel: KernelName, args: number[], perBlock: number[], blocksAt: number, tmpAt = -1, tmpBytes = 0): void {
  if (pool) pool.run(kernel, args, perBlock, blocksAt, tmpAt, tmpBytes);
  else call(inst, kernel, args);
}

/**
 * Transposes Conv1D matrices (model/graph/linear.ts) with the kernels' 4 × 4 SIMD tiles, in a memory of its own: the
 * largest transpose (BioMedLM's 2560 × 10240 float32, 105 MB) stays with the build that made it, not with the
 * process, as the kernels' own memory would (a WebAssembly memory never shrinks).
 */
export class Transposer {
  private constructor(private readonly memory: WebAssembly.Memory, private readonly kernels: Kernels) {}

  /** Null where the kernels cannot run. */
  static create(): Transposer | null {
    const inst = instance();
    if (!inst) return null;
    const memory = new WebAssembly.Memory({ initial: 1, maximum: MAX_PAGES, shared: true });
    return new Transposer(memory, new WebAssembly.Instance(inst.module, { env: { memory } }).exports as unknown as Kernels);
  }

  /**
   * The transpose [n, k] of a stored [k, n] matrix of 32-bit values (its bits), built a band of `rowsPerBand` stored
   * rows at a time as `read(from, into)` fills each band: a view of this transposer's memory, valid until its next
   * call. Null where the tiles do not fit (n, k or rowsPerBand not a multiple of 4, or beyond the memory's bound).
   */
  transpose(read: (from: number, into: Uint8Array) => void, n: number, k: number, rowsPerBand: number): Uint8Array | null {
    const bandBytes = rowsPerBand * n * 4;
    if (n % 4 !== 0 || k % 4 !== 0 || rowsPerBand % 4 !== 0 || rowsPerBand < 4 || bandBytes + n * k * 4 > MAX_PAGES * 65536) return null;
    reserve(this.memory, bandBytes + n * k * 4);
    const heap = new Uint8Array(this.memory.buffer);
    for (let k0 = 0; k0 < k; k0 += rowsPerBand) {
      const rows = Math.min(rowsPerBand, k - k0);
      read(k0 * n * 4, heap.subarray(0, rows * n * 4));
      this.kernels.t32(0, rows, n, bandBytes + k0 * 4, k);
    }
    return heap.subarray(bandBytes, bandBytes + n * k * 4);
  }
}

/** Weights quantized per call: whole rows, about this many bytes of them. */
const CHUNK_BYTES = 4 << 20;

/** A matrix's int8 codes, produced a chunk of rows at a time; scales and zero points complete after the last. */
export interface Int8Stream {
  /**
   * The codes [n·k] in row order, a few MiB at a time. Each piece is a view of the kernels' memory that the next
   * piece overwrites: write or copy it before asking for the next. One stream at a time (the kernels are one instance).
   */
  codes(): Iterable<Uint8Array>;
  /** [n·k / blockSize] float32 scales: asked for after the last piece of the codes. */
  scales(): Float32Array;
  /** [n·k / blockSize] zero points, a byte each: asked for after the last piece of the codes. */
  zeroPoints(): Uint8Array;
}

/**
 * int8 quantization (each block's own zero point, quantizeRows's) of a row-major [n, k] matrix of binary16 bits
 * (width 2) or float32 (width 4), whose stored bytes `read(from, into)` fills `into` with from byte `from` on: from a
 * file, only a few MiB of the matrix is ever in memory. Null where the kernels cannot take it: a partial block at a
 * row's end (k not a multiple of the block), or no kernels; the caller's JavaScript loop does it then.
 */
export function int8Stream(read: (from: number, into: Uint8Array) => void, width: 2 | 4, n: number, k: number, blockSize: number, out?: { scales: Float32Array; zeroPoints: Uint8Array }, pool?: QuantPool | null): Int8Stream | null {
  const inst = instance();
  if (!inst || k % blockSize !== 0 || blockSize % 16 !== 0) return null;
  const scales = out?.scales ?? new Float32Array((n * k) / blockSize);
  const zeroPoints = out?.zeroPoints ?? new Uint8Array((n * k) / blockSize);
  let done = false;
  return {
    *codes() {
      const rows = Math.max(1, Math.floor(CHUNK_BYTES / (k * width)));
      const codesAt = rows * k * width;
      const scalesAt = codesAt + rows * k;
      const zerosAt = scalesAt + ((rows * k) / blockSize) * 4;
      reserve(inst.memory, zerosAt + (rows * k) / blockSize);
      const heap = new Uint8Array(inst.memory.buffer);
      for (let r = 0; r < n; r += rows) {
        const m = Math.min(rows, n - r);
        const blocks = (m * k) / blockSize;
        read(r * k * width, heap.subarray(0, m * k * width));
        runKernel(inst, pool, 'q8', [0, width, blocks, blockSize, codesAt, scalesAt, zerosAt], [blockSize * width, 0, 0, 0, blockSize, 4, 1], 2);
        scales.set(new Float32Array(heap.buffer, scalesAt, blocks), (r * k) / blockSize);
        zeroPoints.set(heap.subarray(zerosAt, zerosAt + blocks), (r * k) / blockSize);
        yield heap.subarray(codesAt, codesAt + m * k);
      }
      done = true;
    },
    scales: () => afterLastPiece('int8Stream', done, scales),
    zeroPoints: () => afterLastPiece('int8Stream', done, zeroPoints),
  };
}

/** A stream's scales or zero points, which are complete only once its last piece of codes was taken. */
function afterLastPiece<T>(stream: string, done: boolean, part: T): T {
  if (!done) throw new Error(`${stream}: scales and zero points asked for before the last piece of the codes`);
  return part;
}

/** int8Stream over a matrix in memory, into `data` [n·k], `scales` and `zeroPoints`; false where the kernels cannot take it. */
export function quantizeInt8Blocks(w: Uint16Array | Float32Array, n: number, k: number, blockSize: number, data: Uint8Array, scales: Float32Array, zeroPoints: Uint8Array, pool?: QuantPool | null): boolean {
  const bytes = new Uint8Array(w.buffer, w.byteOffset, w.byteLength);
  const stream = int8Stream((from, into) => into.set(bytes.subarray(from, from + into.byteLength)), w.BYTES_PER_ELEMENT as 2 | 4, n, k, blockSize, { scales, zeroPoints }, pool);
  if (!stream) return false;
  drain(stream.codes(), data);
  return true;
}

/** A matrix's int4 codes, two a byte, produced a chunk of rows at a time; scales and zero points complete after the last. */
export interface Int4Stream {
  /** [n, kBlocks, blockSize / 2] bytes, low nibble first, in row order; each piece is overwritten by the next. */
  codes(): Iterable<Uint8Array>;
  /** [n·kBlocks] float32: asked for after the last piece of the codes. */
  scales(): Float32Array;
  /** [n, ceil(kBlocks / 2)] zero points, two a byte: asked for after the last piece of the codes. */
  zeroPoints(): Uint8Array;
}

/**
 * int4 (quantizeRows's asymmetric search, q4Block) of a row-major [n, k] matrix of binary16 bits (width 2, widened
 * exactly as they are loaded) or float32 (width 4), read in pieces as int8Stream reads it: the kernel searches four
 * blocks at once, one per float32 lane, and packs the codes; JavaScript packs the zero points. Null where the kernels
 * cannot take it (a partial block, no kernels).
 */
export function int4Stream(read: (from: number, into: Uint8Array) => void, width: 2 | 4, n: number, k: number, blockSize: number, out?: { scales: Float32Array; zeroPoints: Uint8Array }, pool?: QuantPool | null): Int4Stream | null {
  const inst = instance();
  if (!inst || k % blockSize !== 0 || blockSize % 16 !== 0) return null;
  const kBlocks = k / blockSize;
  const blob = blockSize / 2;
  const zpBytes = Math.ceil(kBlocks / 2);
  const scales = out?.scales ?? new Float32Array(n * kBlocks);
  const zeroPoints = out?.zeroPoints ?? new Uint8Array(n * zpBytes);
  let done = false;
  return {
    *codes() {
      const rows = Math.max(1, Math.floor(CHUNK_BYTES / (k * 4)));
      const codesAt = rows * k * width;
      const scalesAt = codesAt + (rows * k) / 2;
      const zerosAt = scalesAt + rows * kBlocks * 4;
      const tmpAt = Math.ceil((zerosAt + rows * kBlocks) / 16) * 16;
      const tmpBytes = blockSize * 16; // per thread
      reserve(inst.memory, tmpAt + tmpBytes * (pool?.threads ?? 1));
      const heap = new Uint8Array(inst.memory.buffer);
      for (let r = 0; r < n; r += rows) {
        const m = Math.min(rows, n - r);
        read(r * k * width, heap.subarray(0, m * k * width));
        runKernel(inst, pool, 'q4', [0, width, m * kBlocks, blockSize, codesAt, scalesAt, zerosAt, tmpAt], [blockSize * width, 0, 0, 0, blob, 4, 1, 0], 2, 7, tmpBytes);
        scales.set(new Float32Array(heap.buffer, scalesAt, m * kBlocks), r * kBlocks);
        for (let j = 0; j < m * kBlocks; j++) {
          const b = j % kBlocks;
          zeroPoints[(r + Math.floor(j / kBlocks)) * zpBytes + (b >> 1)] |= heap[zerosAt + j] << ((b & 1) * 4);
        }
        yield heap.subarray(codesAt, codesAt + (m * k) / 2);
      }
      done = true;
    },
    scales: () => afterLastPiece('int4Stream', done, scales),
    zeroPoints: () => afterLastPiece('int4Stream', done, zeroPoints),
  };
}

/** int4Stream over a float32 matrix in memory, into `data`, `scales` and `zeroPoints`; false where the kernels cannot take it. */
export function quantizeInt4Blocks(w: Float32Array, n: number, k: number, blockSize: number, data: Uint8Array, scales: Float32Array, zeroPoints: Uint8Array, pool?: QuantPool | null): boolean {
  const bytes = new Uint8Array(w.buffer, w.byteOffset, w.byteLength);
  const stream = int4Stream((from, into) => into.set(bytes.subarray(from, from + into.byteLength)), 4, n, k, blockSize, { scales, zeroPoints }, pool);
  if (!stream) return false;
  drain(stream.codes(), data);
  return true;
}

/** A stream's pieces copied into `data`, one after another. */
export function drain(pieces: Iterable<Uint8Array>, data: Uint8Array): void {
  let at = 0;
  for (const piece of pieces) {
    data.set(piece, at);
    at += piece.byteLength;
  }
}
