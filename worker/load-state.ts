import { formatProgress, ProgressMeter, type LoadProgress } from '../model/progress.ts';

const IDLE: LoadProgress = { phase: 'idle', range: '', doneBytes: 0, totalBytes: 0, tensors: 0, tensorsTotal: 0, elapsedMs: 0, bytesPerSec: 0, etaMs: null };

/**
 * What this worker is doing with its block range, for Info (the coordinator's /v1/pipeline), the logs and the
 * supervisor of `strata up`. The stage thread reports the build; once it ends, the ORT load starts, which reports
 * nothing itself: its progress is estimated from this process's resident-memory growth against the weight bytes
 * (ORT reads the external weights into memory), sampled every `sampleMs`.
 */
export class StageLoadState {
  current: LoadProgress = IDLE;
  private loadMeter: ProgressMeter | null = null;
  private sampler: NodeJS.Timeout | null = null;

  constructor(
    private readonly onChange: (p: LoadProgress) => void,
    private readonly sampleMs = 500,
    private readonly rss = () => process.memoryUsage.rss(),
  ) {}

  private set(p: LoadProgress): void {
    this.current = p;
    this.onChange(p);
  }

  /** A progress event from the stage thread's build (or its cache hit); its last one starts the load. */
  building(p: LoadProgress): void {
    this.stopSampler();
    this.set(p);
    // Only the build's last event carries weightBytes (the graph is written): the load starts then.
    if (p.phase === 'building' && p.weightBytes !== undefined) this.startLoading(p.range, p.weightBytes);
  }

  private startLoading(range: string, weightBytes: number): void {
    const rss0 = this.rss();
    const meter = new ProgressMeter('loading', range, weightBytes, 0, (p) => this.set(p), 0);
    this.loadMeter = meter;
    this.sampler = setInterval(() => {
      // Never 100 % from an estimate: only the load's completion says so.
      const grown = Math.min(weightBytes * 0.99, Math.max(0, this.rss() - rss0));
      // Memory falls when ORT frees what it packed a weight from: the estimate keeps its highest point.
      meter.advance(Math.max(0, grown - meter.doneBytes));
      this.set(meter.snapshot());
    }, this.sampleMs);
    this.sampler.unref();
  }

  private stopSampler(): void {
    if (this.sampler) clearInterval(this.sampler);
    this.sampler = null;
    this.loadMeter = null;
  }

  serving(range: string): void {
    const loaded = this.loadMeter?.snapshot();
    this.stopSampler();
    this.set({ ...IDLE, phase: 'serving', range, totalBytes: loaded?.totalBytes ?? 0, doneBytes: loaded?.totalBytes ?? 0, elapsedMs: loaded?.elapsedMs ?? 0 });
  }

  failed(range: string, error: string): void {
    this.stopSampler();
    this.set({ ...this.current, phase: 'failed', range: range || this.current.range, error, etaMs: null });
  }

  describe(): string {
    return formatProgress(this.current);
  }

  close(): void {
    this.stopSampler();
  }
}
