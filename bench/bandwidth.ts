import { Worker } from 'node:worker_threads';

/**
 * Memory bandwidth of this machine, measured the way a decode step uses memory: streaming a buffer far larger
 * than any cache. `read`: memchr over the buffer (Buffer#indexOf of a byte that is not there: native, vectorised,
 * read-only). `copy`: memcpy (TypedArray#set) of a buffer into another, counted as read + write bytes. Each runs
 * on `threads` worker threads at once, each over its own slice; the best of `trials` counts (least disturbed by
 * the other tenants of a shared machine).
 */
export interface BandwidthResult {
  threads: number;
  bytes: number;
  /** Bytes read per second, read-only scan (best of trials). */
  readBytesPerSec: number;
  /** (read + written) bytes per second of a copy (best of trials). */
  copyBytesPerSec: number;
  readTrialsMs: number[];
  copyTrialsMs: number[];
}

const THREAD_CODE = `
const { parentPort, workerData } = require('node:worker_threads');
const { performance } = require('node:perf_hooks');
const { src, dst, offset, length } = workerData;
const a = Buffer.from(src, offset, length);
const b = Buffer.from(dst, offset, length);
a.fill(2); b.fill(3); // commit real pages: untouched pages all map the one zero page
const now = () => performance.timeOrigin + performance.now();
parentPort.on('message', (kind) => {
  const t0 = now();
  let found = -2;
  if (kind === 'read') found = a.indexOf(1);
  else b.set(a);
  const t1 = now();
  parentPort.postMessage({ t0, t1, found });
});
parentPort.postMessage('ready');
`;

/** Worker threads holding their slices between measurements, so repeated rounds do not re-allocate 1 GiB. */
export class BandwidthProbe {
  private constructor(
    readonly threads: number,
    readonly bytes: number,
    private readonly workers: Worker[],
  ) {}

  static async open(opts: { bytes?: number; threads: number }): Promise<BandwidthProbe> {
    const threads = Math.max(1, opts.threads);
    const slice = Math.floor((opts.bytes ?? 512 * 2 ** 20) / threads / 64) * 64;
    const src = new SharedArrayBuffer(slice * threads);
    const dst = new SharedArrayBuffer(slice * threads);
    const workers = Array.from({ length: threads }, (_, i) => new Worker(THREAD_CODE, { eval: true, workerData: { src, dst, offset: i * slice, length: slice } }));
    try {
      await Promise.all(workers.map((w) => new Promise<void>((resolve, reject) => {
        w.once('message', () => resolve());
        w.once('error', reject);
      })));
    } catch (e) {
      await Promise.all(workers.map((w) => w.terminate()));
      throw e;
    }
    const probe = new BandwidthProbe(threads, slice * threads, workers);
    await probe.round('read'); // warm-up (page tables, clocks)
    await probe.round('copy');
    return probe;
  }

  private async round(kind: 'read' | 'copy'): Promise<number> {
    const done = await Promise.all(this.workers.map((w) => new Promise<{ t0: number; t1: number; found: number }>((resolve) => {
      w.once('message', resolve);
      w.postMessage(kind);
    })));
    if (kind === 'read' && done.some((d) => d.found !== -1)) throw new Error('bandwidth probe: scan found a byte that is not there');
    return Math.max(...done.map((d) => d.t1)) - Math.min(...done.map((d) => d.t0));
  }

  async measure(trials = 5): Promise<BandwidthResult> {
    const readTrialsMs: number[] = [];
    const copyTrialsMs: number[] = [];
    for (let t = 0; t < trials; t++) {
      readTrialsMs.push(await this.round('read'));
      copyTrialsMs.push(await this.round('copy'));
    }
    return {
      threads: this.threads, bytes: this.bytes,
      readBytesPerSec: this.bytes / (Math.min(...readTrialsMs) / 1000),
      copyBytesPerSec: (2 * this.bytes) / (Math.min(...copyTrialsMs) / 1000),
      readTrialsMs, copyTrialsMs,
    };
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}

export async function measureBandwidth(opts: { bytes?: number; threads: number; trials?: number }): Promise<BandwidthResult> {
  const probe = await BandwidthProbe.open(opts);
  try {
    return await probe.measure(opts.trials ?? 5);
  } finally {
    await probe.close();
  }
}
