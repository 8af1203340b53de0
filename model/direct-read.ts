import { Worker } from 'node:worker_threads';
import { constants, openSync, readSync } from 'node:fs';

/**
 * Reads of checkpoint tensors that bypass the page cache (O_DIRECT) when the tensor is not in it already.
 *
 * Why: a quantized stage build reads every weight of its stage once. Through the page cache, a cold read made the
 * kernel fill fresh page-cache pages and copy them out, and on this project's VM (a Firecracker guest that hands freed
 * memory back to its host) that cost more CPU than the quantizing. GPT-J's two int8 stages built side by side from a
 * cold page cache, as two workers build them: 22.9–27.9 s each with 15–20 s of system time; with O_DIRECT 13.1–15.7 s
 * with ~2 s, and with the next chunk read ahead on a helper thread (DirectReadAhead) 13.9–14.1 s; int4 32.1–36.6 →
 * 22.9–26.1 s (2026-12-04, bench/RESULTS.md "Loading at size"). From a warm page cache O_DIRECT is slower (one stage: 4.3 → 6.8 s,
 * since it goes to the disk again), so each tensor is probed first: one-page buffered reads of two of its pages that
 * return at memory speed mean the tensor is cached, and it is read through the page cache as before (4.7 → 4.1 s).
 *
 * O_DIRECT wants the file offset, the length and the buffer address aligned to the device's block: reads go through a
 * bounce buffer inside a WebAssembly memory (its buffer starts on a page), over the aligned superset of the span,
 * and the wanted bytes are copied out. A file system that refuses O_DIRECT (tmpfs) is read buffered.
 * STRATA_DIRECT_IO=0: never; =1: always (no probe).
 */

const ALIGN = 4096;
const BOUNCE_BYTES = 16 << 20;
/** Reads shorter than this go through the page cache: the alignment would cost more than it saves. */
const MIN_DIRECT = 1 << 20;
/** One page: small enough that a cold probe sets off no readahead worth counting. */
const PROBE_BYTES = 4096;
/**
 * A one-page buffered read faster than this came from the page cache: on this VM page-cache hits took 3–16 µs (p10–p90,
 * a GPT-J stage's probes), reads of the disk 45–56 µs even where its host had them cached. The former 50 µs (with the
 * first page probed, below) took a sixth of a cold checkpoint's tensors for cached (2026-12-05, bench/RESULTS.md).
 */
const CACHED_PROBE_MS = 0.03;

let bounce: Uint8Array | null = null;

/** The block-aligned span around [at, at + length): where an O_DIRECT read of it starts, how long it is, what to skip. */
export function alignedSpan(at: number, length: number): { start: number; length: number; skip: number } {
  const start = at - (at % ALIGN);
  return { start, length: Math.ceil((length + at - start) / ALIGN) * ALIGN, skip: at - start };
}

export type DirectMode = 'auto' | 'always' | 'never';

export function directMode(env = process.env.STRATA_DIRECT_IO): DirectMode {
  return env === '0' ? 'never' : env === '1' ? 'always' : 'auto';
}

/** A second descriptor of `path` with O_DIRECT, or null where the platform or the file system has none. */
export function openDirect(path: string): number | null {
  if (!constants.O_DIRECT) return null;
  try {
    return openSync(path, constants.O_RDONLY | constants.O_DIRECT);
  } catch {
    return null; // EINVAL: the file system has no direct I/O
  }
}

/**
 * Whether a tensor of `length` bytes at `offset` is worth reading with O_DIRECT: by the mode, and in `auto` unless its
 * middle and last pages both come back through `fd` (buffered) at memory speed, i.e. the tensor is in the page cache.
 * Not its first page: that is often cached when nothing else of the tensor is, brought in by the kernel's readahead
 * behind the small tensors before it (read buffered; 8 MiB of readahead on this VM's disk), and it took a sixth of a
 * cold GPT-J checkpoint's tensors for cached. Two pages, since one alone still read fast for a few uncached tensors.
 */
export function worthDirect(fd: number, offset: number, length: number, mode = directMode()): boolean {
  if (mode === 'never' || length < MIN_DIRECT) return false;
  if (mode === 'always') return true;
  const probe = Buffer.allocUnsafe(PROBE_BYTES);
  for (const at of [offset + Math.floor(length / 2), offset + length - 1]) {
    const t = performance.now();
    readSync(fd, probe, 0, PROBE_BYTES, alignedSpan(at, 1).start); // the page (ALIGN = PROBE_BYTES) holding byte `at`
    if (performance.now() - t >= CACHED_PROBE_MS) return true;
  }
  return false;
}

/**
 * Fills `into` from the file at `offset`: through `dfd` (O_DIRECT) when given, else through `fd`. `bytes` are fewer
 * than asked only at the end of the file; `directFailed`: the device refused a direct read (the rest went buffered,
 * and the caller should stop using `dfd`).
 */
export function readSpan(dfd: number | null, fd: number, into: Uint8Array, offset: number): { bytes: number; directFailed: boolean } {
  if (dfd === null || into.byteLength < MIN_DIRECT) return { bytes: readBuffered(fd, into, offset), directFailed: false };
  bounce ??= new Uint8Array(new WebAssembly.Memory({ initial: BOUNCE_BYTES / 65536 + 1 }).buffer, 0, BOUNCE_BYTES);
  let done = 0;
  while (done < into.byteLength) {
    const at = offset + done;
    const { start, length, skip } = alignedSpan(at, into.byteLength - done);
    let n: number;
    try {
      n = readSync(dfd, bounce, 0, Math.min(length, BOUNCE_BYTES), start);
    } catch {
      return { bytes: done + readBuffered(fd, into.subarray(done), at), directFailed: true };
    }
    const use = Math.min(n - skip, into.byteLength - done);
    if (use <= 0) break;
    into.set(bounce.subarray(skip, skip + use), done);
    done += use;
  }
  return { bytes: done, directFailed: false };
}

function readBuffered(fd: number, into: Uint8Array, offset: number): number {
  let done = 0;
  while (done < into.byteLength) {
    const n = readSync(fd, into, done, Math.min(into.byteLength - done, 1 << 30), offset + done);
    if (n <= 0) break;
    done += n;
  }
  return done;
}

/**
 * Overlaps a direct tensor's next chunk with the work on this one. A quantizing build reads a tensor in order, a few
 * MiB at a time, and O_DIRECT has no kernel readahead: without this the disk waited on the search and the search on
 * the disk. A helper thread reads the next chunk into one of two shared, page-aligned slots while the caller
 * quantizes; the caller takes it when it asks for exactly that span, and reads itself otherwise.
 */
export class DirectReadAhead {
  private readonly worker: Worker;
  private readonly slots: Uint8Array[];
  /** Per slot: [state, bytes]; state 0 idle, 1 reading, 2 read, 3 failed. */
  private readonly ctl: Int32Array;
  private readonly spans: ({ path: string; start: number; length: number } | null)[] = [null, null];
  private next = 0;
  /** A read that never finished (a hung disk, a dead thread): the read-ahead is off from then on. */
  private broken = false;

  constructor() {
    const memory = new WebAssembly.Memory({ initial: (2 * BOUNCE_BYTES) / 65536, maximum: (2 * BOUNCE_BYTES) / 65536, shared: true });
    this.slots = [0, 1].map((s) => new Uint8Array(memory.buffer, s * BOUNCE_BYTES, BOUNCE_BYTES));
    this.ctl = new Int32Array(new SharedArrayBuffer(16));
    this.worker = new Worker(READ_AHEAD_THREAD, { eval: true, workerData: { buffer: memory.buffer, ctl: this.ctl, slotBytes: BOUNCE_BYTES } });
    this.worker.unref();
    // A thread that fails to start or dies: the builder reads for itself (settle's deadline covers a wait under way).
    this.worker.on('error', () => {
      this.broken = true;
    });
  }

  /**
   * The bytes [start, start + length) of `path` if a read of exactly that was scheduled and succeeded, else null. The
   * view is valid until the next schedule(), which may read into the same slot: copy it out first.
   */
  take(path: string, start: number, length: number): Uint8Array | null {
    if (this.broken) return null;
    for (let s = 0; s < 2; s++) {
      const span = this.spans[s];
      if (!span || span.path !== path || span.start !== start || span.length !== length) continue;
      this.spans[s] = null;
      if (!this.settle(s)) return null;
      const ok = Atomics.load(this.ctl, 2 * s) === 2 && Atomics.load(this.ctl, 2 * s + 1) >= length;
      Atomics.store(this.ctl, 2 * s, 0);
      return ok ? this.slots[s].subarray(0, length) : null;
    }
    return null;
  }

  /**
   * Reads [start, start + length) of `path` (aligned, at most a slot) through `fd`, its O_DIRECT descriptor (file
   * descriptors are the process's: the thread reads through the caller's), in the background, into the slot not
   * handed out last.
   */
  schedule(path: string, fd: number, start: number, length: number): void {
    if (this.broken || length > BOUNCE_BYTES || start % ALIGN !== 0) return;
    const s = this.next;
    this.next = 1 - s;
    if (!this.settle(s)) return; // a slot still being filled is not reused until it is done
    this.spans[s] = { path, start, length };
    Atomics.store(this.ctl, 2 * s, 1);
    this.worker.postMessage({ slot: s, fd, start, length });
  }

  /** Waits until slot `s` is not being read into; false (and the read-ahead off) when a read takes over a minute. */
  private settle(s: number): boolean {
    const deadline = performance.now() + 60_000;
    while (Atomics.load(this.ctl, 2 * s) === 1) {
      if (performance.now() > deadline) {
        this.broken = true;
        return false;
      }
      Atomics.wait(this.ctl, 2 * s, 1, 1000);
    }
    return true;
  }

  close(): void {
    void this.worker.terminate();
  }
}

/** The read-ahead thread: O_DIRECT reads into the shared slots, one message a read. */
const READ_AHEAD_THREAD = `
const { parentPort, workerData } = require('node:worker_threads');
const { readSync } = require('node:fs');
const { buffer, ctl, slotBytes } = workerData;
parentPort.on('message', ({ slot, fd, start, length }) => {
  try {
    const view = new Uint8Array(buffer, slot * slotBytes, slotBytes);
    let done = 0;
    while (done < length) {
      const n = readSync(fd, view, done, length - done, start + done);
      if (n <= 0) break;
      done += n;
      if (done % 4096 !== 0) break; // the end of the file
    }
    Atomics.store(ctl, 2 * slot + 1, done);
    Atomics.store(ctl, 2 * slot, 2);
  } catch {
    Atomics.store(ctl, 2 * slot, 3);
  }
  Atomics.notify(ctl, 2 * slot);
});
`;
