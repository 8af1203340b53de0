import type { PipelineStep, StepResult } from '../model/generation.ts';
import { formatProgress, stateLabel, type LoadProgress } from '../model/progress.ts';
import { loadFromWire } from '../proto/load-codec.ts';
import type { ClientSecurity, StageLink } from '../transport/link.ts';
import { connectStage } from '../transport/registry.ts';
import type { ServingPipeline } from './api/jobs/types.ts';

/** One worker as the coordinator last saw it: its load progress, or why it did not answer. */
export interface WorkerLoadView {
  address: string;
  /** "building 43 %", "loading 80 %", "serving", "failed: …", "idle", or "unreachable". */
  state: string;
  load: LoadProgress | null;
}

/**
 * Follows every worker's load progress (InfoReply.load) by polling, so /v1/pipeline and /health can say what each
 * stage is doing while the pipeline is not ready: building its graph, loading it, failed, or not answering.
 */
export class LoadBoard {
  private readonly links: StageLink[];
  private readonly views: WorkerLoadView[];
  private timer: NodeJS.Timeout | null = null;

  constructor(
    readonly addresses: string[],
    credentials: ClientSecurity | undefined,
    private readonly onChange: (index: number, view: WorkerLoadView) => void = () => {},
  ) {
    this.links = addresses.map((a) => connectStage(a, credentials));
    this.views = addresses.map((address) => ({ address, state: 'unreachable', load: null }));
  }

  /** Polls every `intervalMs` (and once now). */
  start(intervalMs = 500): this {
    this.poll(Math.min(intervalMs, 2_000));
    this.timer = setInterval(() => this.poll(Math.min(intervalMs, 2_000)), intervalMs);
    this.timer.unref();
    return this;
  }

  /** Asks every worker now (e.g. the moment the pipeline is configured, so no stale "loading" outlives it). */
  poll(timeoutMs = 2_000): Promise<void> {
    return Promise.all(
      this.links.map((link, i) =>
        link.info(timeoutMs).then(
          (info) => this.seen(i, loadFromWire(info.load)),
          () => this.seen(i, null),
        ),
      ),
    ).then(() => {});
  }

  private seen(i: number, load: LoadProgress | null): void {
    const view = { address: this.addresses[i], state: load ? stateLabel(load) : 'unreachable', load };
    this.views[i] = view;
    this.onChange(i, view);
  }

  get workers(): WorkerLoadView[] {
    return this.views;
  }

  /** Why the pipeline cannot serve yet, in one sentence per stage that is not serving (null when all serve). */
  reason(): string | null {
    const waiting = this.views
      .map((v, i) => ({ v, i }))
      .filter(({ v }) => v.state !== 'serving')
      .map(({ v, i }) => `stage ${i} (${v.address}) ${v.load ? formatProgress(v.load) : 'does not answer (starting, restarting or down)'}`);
    return waiting.length ? waiting.join('; ') : null;
  }

  close(): void {
    if (this.timer) clearInterval(this.timer);
    this.links.forEach((l) => l.close());
  }
}

/**
 * The pipeline the API and queue use before the workers have loaded: requests wait for it (they would queue anyway)
 * instead of the API staying down, so /health and /v1/pipeline can report the loading meanwhile.
 */
export class PendingPipeline<P extends ServingPipeline & { embed(ids: number[]): Promise<Float32Array> }> implements ServingPipeline {
  private current: P | null = null;
  private readonly ready: Promise<P>;
  private resolve!: (p: P) => void;

  constructor() {
    this.ready = new Promise((r) => (this.resolve = r));
  }

  set(p: P): void {
    this.current = p;
    this.resolve(p);
  }

  get pipeline(): P | null {
    return this.current;
  }

  private async get(): Promise<P> {
    return this.current ?? this.ready;
  }

  get decodeSteps(): number | undefined {
    return this.current?.decodeSteps;
  }

  async step(sessionId: string, input: PipelineStep): Promise<StepResult> {
    return (await this.get()).step(sessionId, input);
  }

  async end(sessionId: string): Promise<void> {
    return (await this.get()).end(sessionId);
  }

  async embed(ids: number[]): Promise<Float32Array> {
    return (await this.get()).embed(ids);
  }
}
