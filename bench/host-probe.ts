import { spawnSync } from 'node:child_process';
import { statSync } from 'node:fs';
import { StrataError } from '../model/errors.ts';
import { readSpans, type WeightSpan } from '../model/stage-prefetch.ts';

/**
 * What the host itself does under a load, measured by `strata bench --suite load` beside the starts they bound: how
 * fast its disk reads a checkpoint or a cached stage (cold where the page cache can be dropped), and how fast it backs
 * memory touched for the first time.
 */

export interface ReadTiming {
  ms: number;
  bytes: number;
  mbPerSec: number;
  /** The page cache was dropped before reading (false: some of it may have come from memory). */
  cold: boolean;
}

/** sync + drop the page cache (root only); false when not allowed, and the reads that follow are warm. */
export function dropPageCache(): boolean {
  const r = spawnSync('sh', ['-c', 'sync && echo 3 > /proc/sys/vm/drop_caches'], { stdio: 'ignore' });
  return r.status === 0;
}

export interface NewMemoryRate {
  bytes: number;
  /** GB/s writing memory the process never touched before, and writing the same memory again. */
  firstTouchGbPerSec: number;
  againGbPerSec: number;
}

const NEW_MEMORY_SCRIPT = `const n = Number(process.argv[1]); const b = Buffer.alloc(n); const t = () => Number(process.hrtime.bigint()) / 1e9;
let t0 = t(); b.fill(1); const first = t() - t0; t0 = t(); b.fill(2); const again = t() - t0;
process.stdout.write(JSON.stringify({ first, again }));`;

/**
 * Writes `bytes` of new memory in a child process, then the same memory again. ORT packs a stage's weights (every
 * quantized one) into new memory while it loads it, so where a VM backs fresh pages slowly (a host fault per page:
 * 0.5–2 GB/s on these VMs, against 7–10 GB/s for memory already backed) a cache hit is bound by that rate, not by
 * the disk (bench/RESULTS.md, "What bounds the targets still missed"). A child, so the bench keeps none of it.
 */
export function newMemoryRate(bytes = 2 ** 29): NewMemoryRate {
  const r = spawnSync(process.execPath, ['-e', NEW_MEMORY_SCRIPT, String(bytes)], { encoding: 'utf8' });
  if (r.status !== 0) throw new StrataError('bench_memory_failed', `measuring new memory failed: ${r.stderr.trim() || `exit ${r.status}`}`);
  const { first, again } = JSON.parse(r.stdout) as { first: number; again: number };
  return { bytes, firstTouchGbPerSec: bytes / first / 1e9, againGbPerSec: bytes / again / 1e9 };
}

/** Reads the files once with `cat > /dev/null` (a child process: the read is the kernel's, not Node's). */
export function timedRead(files: string[], cold: boolean): ReadTiming {
  const dropped = cold ? dropPageCache() : false;
  const bytes = files.reduce((n, f) => n + statSync(f).size, 0);
  const t0 = performance.now();
  const r = spawnSync('sh', ['-c', 'cat "$@" > /dev/null', 'cat', ...files], { stdio: ['ignore', 'ignore', 'pipe'] });
  const ms = performance.now() - t0;
  if (r.status !== 0) throw new StrataError('bench_read_failed', `cat ${files.join(' ')} failed: ${r.stderr}`);
  return readTiming(ms, bytes, dropped);
}

/** Reads the spans once (the page cache dropped first when `cold`). */
export function timedSpans(spans: WeightSpan[], cold: boolean): ReadTiming {
  const dropped = cold ? dropPageCache() : false;
  const t0 = performance.now();
  const bytes = readSpans(spans);
  return readTiming(performance.now() - t0, bytes, dropped);
}

const readTiming = (ms: number, bytes: number, cold: boolean): ReadTiming => ({ ms, bytes, mbPerSec: bytes / 2 ** 20 / (ms / 1000), cold });
