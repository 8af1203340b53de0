import type * as grpc from '@grpc/grpc-js';
import type { ModelSpec } from '../model/config.ts';
import { StrataError } from '../model/errors.ts';
import type { PipelineStep, StepResult, Stepper } from '../model/generation.ts';
import { rangeLabel, type BlockRange } from '../model/range.ts';
import type { WeightDType } from '../model/stage-graph.ts';
import { StageClient, type WireInfo, type WireTiming } from '../proto/client.ts';
import { resultFromWire, stepToWire } from '../proto/step-codec.ts';
import { planPartition } from './planner.ts';

export interface StageView {
  blocks: [number, number];
  address: string;
  pid?: number;
  healthy: boolean;
  device?: string;
}

export interface RemotePipelineOptions {
  spec: ModelSpec;
  /** The checkpoint the coordinator serves: every worker must report the same. */
  fingerprint: string;
  dtype?: WeightDType;
  /** Explicit ranges (one per address); default: the partition planner over the workers' reported capacities. */
  ranges?: BlockRange[];
  credentials?: grpc.ChannelCredentials;
  stepTimeoutMs?: number;
  /** Called with each stage's ORT run per step (metrics, bench timelines). */
  onTiming?: (stage: number, timing: WireTiming) => void;
  log?: (obj: object, msg: string) => void;
}

/**
 * The coordinator's view of K workers as one Stepper. It configures each worker with its block range and next hop
 * (last stage first, so every predecessor can handshake its successor), then sends token ids to stage 0 and gets
 * tokens or logits back from the chain. It never sees hidden states.
 */
export class RemotePipeline implements Stepper {
  private clients: StageClient[] = [];
  private infos: WireInfo[] = [];
  private ranges: BlockRange[] = [];
  private healthy: boolean[] = [];
  private monitor: NodeJS.Timeout | null = null;

  private constructor(
    private readonly addresses: string[],
    private readonly opts: RemotePipelineOptions,
  ) {}

  static async connect(addresses: string[], opts: RemotePipelineOptions): Promise<RemotePipeline> {
    if (addresses.length === 0) throw new StrataError('no_workers', 'no worker addresses given; pass --workers HOST:PORT,...', 'failed_precondition');
    const p = new RemotePipeline(addresses, opts);
    await p.configure();
    return p;
  }

  private async configure(): Promise<void> {
    const { spec, fingerprint } = this.opts;
    this.clients.forEach((c) => c.close());
    this.clients = this.addresses.map((a) => new StageClient(a, this.opts.credentials));
    this.infos = await Promise.all(this.clients.map((c) => c.info(30_000)));
    this.infos.forEach((info, i) => {
      if (info.identity.fingerprint !== fingerprint || info.identity.blocks !== spec.blocks) {
        throw new StrataError('checkpoint_mismatch', `worker ${this.addresses[i]} serves checkpoint ${info.identity.fingerprint} (${info.identity.blocks} blocks), the coordinator's model is ${fingerprint} (${spec.blocks} blocks); start every worker with the same --model`, 'failed_precondition');
      }
    });
    const dtype = this.opts.dtype ?? 'float32';
    this.ranges = this.opts.ranges ?? planPartition(spec, this.infos.map((info, i) => ({ id: this.addresses[i], memoryBytes: info.memory_bytes || Infinity, speed: info.speed || 1 })), { dtype }).stages.map((s) => s.range);
    if (this.ranges.length !== this.clients.length) {
      // The planner may leave out workers too small for any stage.
      throw new StrataError('plan_unusable', `the plan uses ${this.ranges.length} of ${this.clients.length} workers; give every worker enough memory`, 'failed_precondition');
    }
    for (let i = this.clients.length - 1; i >= 0; i--) {
      const r = this.ranges[i];
      this.opts.log?.({ stage: i, blocks: rangeLabel(r), address: this.addresses[i] }, 'configuring stage');
      await this.clients[i].configure({ first: r.first, last: r.last, dtype, next_address: this.addresses[i + 1] ?? '', fingerprint });
    }
    this.healthy = this.clients.map(() => true);
  }

  /** Polls grpc.health.v1 on every stage so /health and /v1/pipeline tell the truth. */
  startHealthMonitor(intervalMs = 2_000): void {
    this.monitor = setInterval(() => {
      this.clients.forEach((c, i) => c.checkHealth(Math.min(intervalMs, 2_000)).then((s) => (this.healthy[i] = s === 'SERVING'), () => (this.healthy[i] = false)));
    }, intervalMs);
    this.monitor.unref();
  }

  get isHealthy(): boolean {
    return this.healthy.length > 0 && this.healthy.every(Boolean);
  }

  describe(): { stages: StageView[] } {
    return {
      stages: this.ranges.map((r, i) => ({ blocks: [r.first, r.last], address: this.addresses[i], pid: this.infos[i]?.pid, healthy: this.healthy[i] ?? false, device: this.infos[i]?.device })),
    };
  }

  async step(sessionId: string, input: PipelineStep): Promise<StepResult> {
    const req = stepToWire(sessionId, { fingerprint: this.opts.fingerprint, first: 0 }, input);
    const reply = resultFromWire(await this.clients[0].step(req, this.opts.stepTimeoutMs ?? 120_000));
    reply.timings.forEach((t, i) => this.opts.onTiming?.(i, t));
    return reply;
  }

  async end(sessionId: string): Promise<void> {
    await this.clients[0]?.endSession(sessionId).catch(() => {});
  }

  close(): void {
    if (this.monitor) clearInterval(this.monitor);
    this.clients.forEach((c) => c.close());
  }
}
