/**
 * Load progress of one stage: what a worker is doing between "configure" and "serving", in numbers a person and a
 * probe can read. The stage thread reports the graph build (checkpoint bytes read and written, tensor by tensor);
 * the worker's main thread reports the ORT load (it estimates bytes from its own resident-memory growth: ORT gives
 * no progress callback). The same record travels on the wire (InfoReply.load), on the worker's stdout (for
 * `strata up`'s supervisor) and into /v1/pipeline.
 */
export type LoadPhase = 'idle' | 'building' | 'loading' | 'serving' | 'failed';

export interface LoadProgress {
  phase: LoadPhase;
  /** The block range, e.g. "[0, 6)". */
  range: string;
  /** Bytes done / total in this phase (building: checkpoint bytes read; loading: weight bytes resident). */
  doneBytes: number;
  totalBytes: number;
  tensors: number;
  tensorsTotal: number;
  elapsedMs: number;
  bytesPerSec: number;
  /** null while the rate is unknown. */
  etaMs: number | null;
  /** building: the graph came from the disk cache (no build). */
  cached?: boolean;
  /** The stage graph's weight bytes (on the build's last event: what the load reads). */
  weightBytes?: number;
  /** failed: the error's message. */
  error?: string;
}

export const fraction = (p: Pick<LoadProgress, 'doneBytes' | 'totalBytes' | 'phase'>): number =>
  p.phase === 'serving' ? 1 : p.totalBytes > 0 ? Math.min(1, p.doneBytes / p.totalBytes) : 0;

const mb = (b: number) => (b / 2 ** 20).toFixed(b >= 100 * 2 ** 20 ? 0 : 1);
const secs = (ms: number) => (ms >= 100_000 ? `${Math.round(ms / 1000)} s` : `${(ms / 1000).toFixed(1)} s`);

/** One line: "building [0, 6): 43 % of 1190 MB (512 MB, 81/190 tensors), 85 MB/s, ETA 8.1 s". */
export function formatProgress(p: LoadProgress): string {
  if (p.phase === 'failed') return `failed ${p.range}: ${p.error ?? 'unknown error'}`;
  if (p.phase === 'serving') return `serving ${p.range}`;
  if (p.phase === 'idle') return 'idle (no block range yet)';
  if (p.cached) return `${p.phase} ${p.range}: cached graph, ${mb(p.totalBytes)} MB`;
  const pct = Math.floor(100 * fraction(p));
  const tensors = p.tensorsTotal ? `, ${p.tensors}/${p.tensorsTotal} tensors` : '';
  const rate = p.bytesPerSec > 0 ? `, ${mb(p.bytesPerSec)} MB/s` : '';
  const eta = p.etaMs !== null && p.doneBytes < p.totalBytes ? `, ETA ${secs(p.etaMs)}` : '';
  return `${p.phase} ${p.range}: ${pct} % of ${mb(p.totalBytes)} MB (${mb(p.doneBytes)} MB${tensors})${rate}${eta}, ${secs(p.elapsedMs)} elapsed`;
}

/** The short state /v1/pipeline shows: "building 43 %", "loading 80 %", "serving", "failed: …". */
export function stateLabel(p: LoadProgress): string {
  if (p.phase === 'failed') return `failed: ${p.error ?? 'unknown error'}`;
  if (p.phase === 'building' || p.phase === 'loading') return `${p.phase} ${Math.floor(100 * fraction(p))} %`;
  return p.phase;
}

/**
 * Counts bytes through one phase and emits a LoadProgress at most every `intervalMs` (and always at 0 and at the
 * end), with the rate and ETA from the bytes so far.
 */
export class ProgressMeter {
  private readonly t0 = Date.now();
  private lastEmit = 0;
  doneBytes = 0;
  tensors = 0;

  constructor(
    private readonly phase: LoadPhase,
    private readonly range: string,
    private readonly totalBytes: number,
    private readonly tensorsTotal: number,
    private readonly emit: (p: LoadProgress) => void,
    private readonly intervalMs = 250,
  ) {
    this.emit(this.snapshot());
  }

  snapshot(extra: Partial<LoadProgress> = {}): LoadProgress {
    const elapsedMs = Date.now() - this.t0;
    const bytesPerSec = elapsedMs > 0 ? (this.doneBytes * 1000) / elapsedMs : 0;
    const etaMs = bytesPerSec > 0 ? ((this.totalBytes - this.doneBytes) * 1000) / bytesPerSec : null;
    return {
      phase: this.phase, range: this.range, doneBytes: this.doneBytes, totalBytes: this.totalBytes, tensors: this.tensors,
      tensorsTotal: this.tensorsTotal, elapsedMs, bytesPerSec, etaMs, ...extra,
    };
  }

  /** `bytes` more done (and `tensors` more tensors). */
  advance(bytes: number, tensors = 0): void {
    this.doneBytes = Math.min(this.totalBytes, this.doneBytes + bytes);
    this.tensors = Math.min(this.tensorsTotal || Infinity, this.tensors + tensors);
    const now = Date.now();
    if (now - this.lastEmit >= this.intervalMs) {
      this.lastEmit = now;
      this.emit(this.snapshot());
    }
  }

  /** The phase is over: one last event at 100 %. */
  finish(extra: Partial<LoadProgress> = {}): LoadProgress {
    this.doneBytes = this.totalBytes;
    this.tensors = this.tensorsTotal;
    const p = this.snapshot({ etaMs: 0, ...extra });
    this.emit(p);
    return p;
  }
}
