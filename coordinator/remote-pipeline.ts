import { randomUUID } from 'node:crypto';
import { isRecoverable, StrataError } from '../model/errors.ts';
import { embed, type PipelineStep, type StepResult, type Stepper } from '../model/generation.ts';
import type { BlockRange } from '../model/range.ts';
import type { WireStepReply, WireTiming } from '../proto/messages.ts';
import { resultFromWire, stepToWire } from '../proto/step-codec.ts';
import { DecodeScheduler } from './decode-scheduler.ts';
import { HealthMonitor } from './health-monitor.ts';
import { Recovery, type RecoveryOptions } from './recovery.ts';
import { ReplayLog, type SessionLog } from './replay-log.ts';
import { ResultsSubscription } from './results-subscription.ts';
import { configureStages, NO_STAGES, type ConfigureOptions, type StageSet } from './stage-set.ts';

// A type alias (not an interface) so it is assignable to the API's open-ended stage records.
export type StageView = {
  blocks: [number, number];
  address: string;
  pid?: number;
  healthy: boolean;
  device?: string;
};

export interface RemotePipelineOptions extends ConfigureOptions, Omit<RecoveryOptions, 'addresses'> {
  /** Explicit ranges (one per address); default: the partition planner over the workers' reported capacities. */
  ranges?: BlockRange[];
  stepTimeoutMs?: number;
  /** How long a request waits for the pipeline to be whole again after a fault before failing. */
  recoveryTimeoutMs?: number;
  /** Called with each stage's ORT run per step (metrics, bench timelines). */
  onTiming?: (stage: number, timing: WireTiming) => void;
  /** Called after each recovery: how long the pipeline was broken, and the new plan. */
  onRecovery?: (ms: number, stages: StageView[]) => void;
  log?: (obj: object, msg: string) => void;
}

/**
 * The coordinator's view of K workers as one Stepper. It configures every worker with its block range and next hop
 * (stage-set.ts), then sends token ids to stage 0 and gets tokens or logits back from the chain, decode steps in
 * groups (decode-scheduler.ts). It never sees hidden states.
 *
 * It keeps every live session's token-level inputs (replay-log.ts), so when a stage dies mid-request it re-plans
 * onto the workers that answer (recovery.ts: a restarted worker at its old address, a spare, or fewer stages),
 * replays each affected session's tokens to rebuild the lost KV caches, and carries on: greedy output is the same as
 * without the fault.
 */
export class RemotePipeline implements Stepper {
  private stages: StageSet = NO_STAGES;
  private readonly health = new HealthMonitor();
  private readonly sessions: ReplayLog;
  private readonly recovery: Recovery;
  private readonly decodes: DecodeScheduler;
  /** Replies straight from the last stage, errors from the stage that passed a step on (re-subscribed whenever the pipeline is reconfigured). */
  private results: ResultsSubscription | null = null;
  private readonly subscriber = `coordinator-${randomUUID()}`;
  /** Bumped by every (re)configuration; a failure seen under an older generation needs no new recovery. */
  private generation = 0;

  private constructor(
    addresses: string[],
    private readonly opts: RemotePipelineOptions,
  ) {
    this.sessions = new ReplayLog(opts.spec.causal);
    this.recovery = new Recovery(
      {
        generation: () => this.generation,
        activeCount: () => this.stages.addresses.length,
        markDown: () => this.health.markAllDown(),
        reconfigure: (live, ranges) => this.configure(live, ranges),
        recovered: (ms) => this.opts.onRecovery?.(ms, this.describe().stages),
      },
      { ...opts, addresses },
    );
    this.decodes = new DecodeScheduler({
      fingerprint: opts.fingerprint,
      stepTimeoutMs: opts.stepTimeoutMs ?? 60_000,
      links: () => this.stages.links,
      subscription: () => this.subscription(),
      received: (reply) => this.received(reply),
    });
  }

  static async connect(addresses: string[], opts: RemotePipelineOptions): Promise<RemotePipeline> {
    if (addresses.length === 0) throw new StrataError('no_workers', 'no worker addresses given; pass --workers HOST:PORT,...', 'failed_precondition');
    const p = new RemotePipeline(addresses, opts);
    await p.configure(addresses, opts.ranges);
    return p;
  }

  private async configure(addresses: string[], fixedRanges?: BlockRange[]): Promise<void> {
    const stages = await configureStages(addresses, this.opts, fixedRanges);
    this.stages.links.forEach((c) => c.close());
    this.stages = stages;
    this.health.reset(stages.links);
    this.generation++;
    this.subscribeResults();
  }

  /** (Re)subscribes to every stage's Results; until all confirm, decode replies come back through the chain. */
  private subscribeResults(): void {
    this.results?.close();
    try {
      this.results = new ResultsSubscription(this.stages.links, this.subscriber);
    } catch {
      this.results = null; // a link closed meanwhile: the chain carries the replies
    }
  }

  /** The subscription for the next decode group: a broken one (the last stage restarted, say) is renewed first. */
  private subscription(): ResultsSubscription | null {
    if (this.results?.closed && this.stages.links.length) this.subscribeResults();
    return this.results;
  }

  /** Polls every stage's health so /health and /v1/pipeline tell the truth, and grows back to full size. */
  startHealthMonitor(intervalMs = 2_000): void {
    this.health.start(intervalMs, () => {
      if (this.recovery.shrunk && !this.recovery.inProgress) void this.recovery.regrow();
    });
  }

  get isHealthy(): boolean {
    return !this.recovery.inProgress && this.health.allHealthy;
  }

  get recoveries(): number {
    return this.recovery.recoveries;
  }

  /** Decode results that came straight from the last stage (the rest came back through the chain). */
  get directReplies(): number {
    return this.decodes.directReplies;
  }

  describe(): { stages: StageView[] } {
    const { ranges, addresses, infos } = this.stages;
    return {
      stages: ranges.map((r, i) => ({ blocks: [r.first, r.last], address: addresses[i], pid: infos[i]?.pid, healthy: this.health.isHealthy(i), device: infos[i]?.device })),
    };
  }

  async step(sessionId: string, input: PipelineStep): Promise<StepResult> {
    const log = this.sessions.open(sessionId);
    const deadline = Date.now() + (this.opts.recoveryTimeoutMs ?? 60_000);
    let replayNeeded = false;
    for (;;) {
      const generation = this.generation;
      try {
        // A replay can itself meet a fault (another worker dies meanwhile): it is retried like the step.
        if (replayNeeded) await this.replay(log);
        replayNeeded = false;
        const result = await this.send(log.wireId, input);
        this.sessions.record(log, input);
        return result;
      } catch (e) {
        if (!isRecoverable(e) || Date.now() > deadline) throw e;
        this.opts.log?.({ session: sessionId, err: (e as Error).message }, 'step failed; recovering the pipeline');
        await this.recovery.recover(generation, deadline);
        replayNeeded = true;
      }
    }
  }

  private async send(wireId: string, input: PipelineStep): Promise<StepResult> {
    if (this.isDecodeStep(input)) return this.decodes.enqueue(wireId, input);
    const req = stepToWire(wireId, { fingerprint: this.opts.fingerprint, first: 0 }, input);
    return this.received(await this.stages.links[0].step(req, this.opts.stepTimeoutMs ?? 60_000));
  }

  private received(wire: WireStepReply): StepResult {
    const reply = resultFromWire(wire);
    reply.timings.forEach((t, i) => this.opts.onTiming?.(i, t));
    return reply;
  }

  /** One token of one session on top of its KV cache: the steps worth batching across sessions. */
  private isDecodeStep(input: PipelineStep): boolean {
    const [rows, seq] = input.positionIds.dims;
    return this.opts.spec.causal && rows === 1 && seq === 1 && input.attentionMask.dims[1] > 1 && input.output !== 'hidden_mean';
  }

  /** Rebuilds a session's KV caches under a fresh wire id: one prefill of every token so far. */
  private async replay(log: SessionLog): Promise<void> {
    const { old, steps } = this.sessions.renew(log);
    void this.stages.links[0]?.endSession(old).catch(() => {});
    for (const s of steps) await this.send(log.wireId, s);
  }

  /** Re-plans onto the larger set when a worker lost earlier answers again; false when there is none. */
  regrow(): Promise<boolean> {
    return this.recovery.regrow();
  }

  async end(sessionId: string): Promise<void> {
    const wireId = this.sessions.end(sessionId);
    this.decodes.forget(wireId);
    await this.stages.links[0]?.endSession(wireId).catch(() => {});
  }

  /** Mean-pooled last hidden state (the /v1/embeddings vector). */
  embed(ids: number[]): Promise<Float32Array> {
    return embed(this, ids);
  }

  close(): void {
    this.health.stop();
    this.results?.close();
    this.stages.links.forEach((c) => c.close());
  }
}
