import { randomUUID } from 'node:crypto';
import { isRecoverable, isStrataError, StrataError } from '../model/errors.ts';
import { chainedSteps, embed, MAX_DECODE_STEPS, type PipelineStep, type StepResult, type Stepper } from '../model/generation.ts';
import type { BlockRange } from '../model/range.ts';
import type { WireTiming } from '../proto/messages.ts';
import { HealthMonitor } from './health-monitor.ts';
import { Recovery, type RecoveryOptions } from './recovery.ts';
import { ReplayLog, replayExactly, type SessionLog } from './replay-log.ts';
import { ResultsRoute } from './results-subscription.ts';
import { SessionGate } from './session-gate.ts';
import { configureStages, NO_STAGES, type ConfigureOptions, type StageSet } from './stage-set.ts';
import { StepRouter } from './step-router.ts';

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
  /** Decode steps per request while the pipeline is one stage (default STRATA_DECODE_STEPS, else DEFAULT_DECODE_STEPS). */
  decodeSteps?: number;
  /** Called after each recovery: how long the pipeline was broken, and the new plan. */
  onRecovery?: (ms: number, stages: StageView[]) => void;
  log?: (obj: object, msg: string) => void;
}

/**
 * The coordinator's view of K workers as one Stepper. It configures every worker with its block range and next hop
 * (stage-set.ts), then sends token ids to stage 0 and gets tokens or logits back from the chain, decode steps in
 * groups (step-router.ts, decode-scheduler.ts). It never sees hidden states.
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
  private readonly router: StepRouter;
  /** Replies straight from the last stage, errors from the stage that passed a step on (re-subscribed whenever the pipeline is reconfigured). */
  private readonly results = new ResultsRoute(`coordinator-${randomUUID()}`);
  /** Sessions past the stages' KV slots wait here for one to end (session-gate.ts). */
  private readonly gate: SessionGate;
  /** Bumped by every (re)configuration; a failure seen under an older generation needs no new recovery. */
  private generation = 0;
  /**
   * Decode steps per request while the pipeline is one stage: that worker chains them (PipelineStep.steps), so the
   * coordinator's and the worker's per-request work (gRPC each way, the thread hops) is paid once per chain. A longer
   * pipeline takes one step per request: only the last stage knows the token the next step feeds.
   */
  chainSteps: number;

  private constructor(
    addresses: string[],
    private readonly opts: RemotePipelineOptions,
  ) {
    this.chainSteps = decodeStepsOption(opts.decodeSteps ?? process.env.STRATA_DECODE_STEPS, 'STRATA_DECODE_STEPS');
    this.sessions = new ReplayLog(opts.spec.causal, replayExactly(opts.dtype));
    this.gate = new SessionGate(undefined, (waiting, held, capacity) => this.opts.log?.({ waiting, held, capacity }, 'request waiting for a KV slot: every slot of the pipeline is held'));
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
    this.router = new StepRouter({
      spec: opts.spec,
      fingerprint: opts.fingerprint,
      stepTimeoutMs: opts.stepTimeoutMs ?? 60_000,
      links: () => this.stages.links,
      subscription: () => this.results.current(this.stages.links),
      onTiming: (stage, timing) => this.opts.onTiming?.(stage, timing),
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
    this.gate.setCapacity(stages.infos.map((i) => i.kv_slots));
    this.generation++;
    this.results.renew(stages.links);
  }

  /** Polls every stage's health so /health and /v1/pipeline tell the truth, and grows back to full size. */
  startHealthMonitor(intervalMs = 2_000): void {
    this.health.start(intervalMs, () => {
      if (this.recovery.shrunk && !this.recovery.inProgress) void this.recovery.regrow();
    });
  }

  get decodeSteps(): number {
    return this.stages.links.length === 1 ? this.chainSteps : 1;
  }

  get isHealthy(): boolean {
    return !this.recovery.inProgress && this.health.allHealthy;
  }

  get recoveries(): number {
    return this.recovery.recoveries;
  }

  /** Decode results that came straight from the last stage (the rest came back through the chain). */
  get directReplies(): number {
    return this.router.directReplies;
  }

  describe(): { stages: StageView[] } {
    const { ranges, addresses, infos } = this.stages;
    return {
      stages: ranges.map((r, i) => ({ blocks: [r.first, r.last], address: addresses[i], pid: infos[i]?.pid, healthy: this.health.isHealthy(i), device: infos[i]?.device })),
    };
  }

  async step(sessionId: string, input: PipelineStep): Promise<StepResult> {
    await this.gate.admit(sessionId, (input.inputIds ?? input.positionIds).dims[0]);
    const log = this.sessions.open(sessionId);
    const deadline = Date.now() + (this.opts.recoveryTimeoutMs ?? 60_000);
    let replayNeeded = false;
    let slotWait = 50;
    const slotDeadline = Date.now() + this.gate.waitMs;
    for (;;) {
      const generation = this.generation;
      try {
        // A replay can itself meet a fault (another worker dies meanwhile): it is retried like the step.
        if (replayNeeded) await this.replay(log);
        replayNeeded = false;
        const result = await this.router.send(log.wireId, input);
        this.sessions.record(log, input);
        // A chained request ran more steps than it sent: a replay feeds them one by one.
        if ((input.steps ?? 1) > 1) for (const s of chainedSteps(input, result.tokens ?? [])) this.sessions.record(log, s);
        return result;
      } catch (e) {
        // A stage's slots are all held: by another coordinator's sessions when this is a session's first step (this
        // one's gate admits no more than the slots), or, in a replay, by this one's own after a re-plan onto fewer,
        // larger stages left fewer slots than live sessions. The session waits for one as the gate would, polling
        // with backoff under a fresh wire id (the stages before may already hold its tokens; a replay renews its id
        // itself), instead of failing with the 429.
        if (isStrataError(e) && e.code === 'kv_slots_exhausted' && (log.steps.length === 0 || replayNeeded) && Date.now() < slotDeadline) {
          if (!replayNeeded) void this.stages.links[0]?.endSession(this.sessions.renew(log).old).catch(() => {});
          await new Promise((r) => setTimeout(r, slotWait));
          slotWait = Math.min(2 * slotWait, 1_000);
          continue;
        }
        if (!isRecoverable(e) || Date.now() > deadline) throw e;
        this.opts.log?.({ session: sessionId, err: (e as Error).message }, 'step failed; recovering the pipeline');
        await this.recovery.recover(generation, deadline);
        replayNeeded = true;
      }
    }
  }

  /** Rebuilds a session's KV caches under a fresh wire id: one prefill of every token so far. */
  private async replay(log: SessionLog): Promise<void> {
    const { old, steps } = this.sessions.renew(log);
    void this.stages.links[0]?.endSession(old).catch(() => {});
    for (const s of steps) await this.router.send(log.wireId, s);
  }

  /** Re-plans onto the larger set when a worker lost earlier answers again; false when there is none. */
  regrow(): Promise<boolean> {
    return this.recovery.regrow();
  }

  async end(sessionId: string): Promise<void> {
    const wireId = this.sessions.end(sessionId);
    this.router.forget(wireId);
    // Every stage has freed the session's slot once stage 0 answers (it passes the end on): only then may a waiting
    // session take it.
    await this.stages.links[0]?.endSession(wireId).catch(() => {});
    this.gate.release(sessionId);
  }

  /** Sessions the pipeline admits at once (its stages' fewest KV slots; null: no limit), and those waiting (/v1/pipeline, /metrics). */
  get slots(): { capacity: number | null; waiting: number } {
    return { capacity: Number.isFinite(this.gate.limit) ? this.gate.limit : null, waiting: this.gate.queued };
  }

  /** Mean-pooled last hidden state (the /v1/embeddings vector). */
  embed(ids: number[]): Promise<Float32Array> {
    return embed(this, ids);
  }

  close(): void {
    this.health.stop();
    this.results.close();
    this.stages.links.forEach((c) => c.close());
  }
}

/**
 * Decode steps per request on a one-stage pipeline when nothing says otherwise (README, "Chained decode steps"). The
 * worker ends a chain once it has run --chain-ms (50 ms), so a streaming client's bursts stay that short whatever this
 * says, and a slow model's chain is one step. Where steps are fast, a longer chain divides the per-request CPU further:
 * on 2026-12-02 (int8) one step per request read ×1.14 slower than 4; on 2026-12-04 (interleaved on one GPT-2-small
 * worker, batch 1) 16 against 4 read int4 3.31 against 3.40 ms per token and int8 4.42 against 4.39 (a wash).
 */
export const DEFAULT_DECODE_STEPS = 16;

/** --decode-steps / STRATA_DECODE_STEPS: a whole number from 1 to MAX_DECODE_STEPS. */
export function decodeStepsOption(value: string | number | undefined, flag = '--decode-steps'): number {
  if (value === undefined || value === '') return DEFAULT_DECODE_STEPS;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > MAX_DECODE_STEPS) {
    throw new StrataError('flag_invalid', `${flag} must be a whole number from 1 to ${MAX_DECODE_STEPS}, got ${JSON.stringify(value)}`);
  }
  return n;
}
