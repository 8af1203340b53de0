import { constants, openSync, readSync } from 'node:fs';

/**
 * Reads of checkpoint tensors that bypass the page cache (O_DIRECT) when the tensor is not in it already.
 *
 * Why: a quantized stage build reads every weight of its stage once. Through the page cache, a cold read made the
 * kernel fill fresh page-cache pages and copy them out, and on this project's VM (a Firecracker guest that hands freed
 * memory back to its host) that cost more CPU than the quantizing. GPT-J's two int8 stages built side by side from a
 * cold page cache, as two workers build them: 22.9–27.9 s each with 15–20 s of system time; with O_DIRECT 13.1–15.7 s
 * with ~2 s (2026-12-04, README "Loading at size"). From a warm page cache O_DIRECT is slower (one stage: 4.3 → 6.8 s,
 * since it goes to the disk again), so each tensor is probed first: a one-page buffered read of its first bytes that
 * returns at memory speed means the tensor is cached, and it is read through the page cache as before (4.7 → 4.1 s).
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
/** A one-page buffered read faster than this came from the page cache (a disk read takes ≥ 0.08 ms). */
const CACHED_PROBE_MS = 0.05;

let bounce: Uint8Array | null = null;

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
 * Whether a tensor of `length` bytes at `offset` is worth reading with O_DIRECT: by the mode, and in `auto` when its
 * first page does not come back through `fd` (buffered) at memory speed, i.e. the tensor is not in the page cache.
 */
export function worthDirect(fd: number, offset: number, length: number, mode = directMode()): boolean {
  if (mode === 'never' || length < MIN_DIRECT) return false;
  if (mode === 'always') return true;
  const probe = Buffer.allocUnsafe(PROBE_BYTES);
  const t = performance.now();
  readSync(fd, probe, 0, PROBE_BYTES, offset);
  return performance.now() - t >= CACHED_PROBE_MS;
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
    const start = at - (at % ALIGN);
    const skip = at - start;
    const want = Math.min(into.byteLength - done + skip, BOUNCE_BYTES);
    let n: number;
    try {
      n = readSync(dfd, bounce, 0, Math.ceil(want / ALIGN) * ALIGN, start);
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
