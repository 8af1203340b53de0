import type { ModelSpec } from '../model/config.ts';
import { fromErrorRecord, isRecoverable, StrataError } from '../model/errors.ts';
import { embed, type PipelineStep, type StepResult, type Stepper } from '../model/generation.ts';
import { rangeLabel, type BlockRange } from '../model/range.ts';
import type { WeightDType } from '../model/stage-graph.ts';
import type { TensorData } from '../model/tensor.ts';
import type { WireInfo, WireStepReply, WireTiming } from '../proto/messages.ts';
import { resultFromWire, stepToWire } from '../proto/step-codec.ts';
import { PROTOCOL_VERSION } from '../proto/wire.ts';
import type { ClientSecurity, StageLink } from '../transport/link.ts';
import { connectStage } from '../transport/registry.ts';
import { planPartition } from './planner.ts';
import { ResultsSubscription } from './results-subscription.ts';
import { randomUUID } from 'node:crypto';

// A type alias (not an interface) so it is assignable to the API's open-ended stage records.
export type StageView = {
  blocks: [number, number];
  address: string;
  pid?: number;
  healthy: boolean;
  device?: string;
};

export interface RemotePipelineOptions {
  spec: ModelSpec;
  /** The checkpoint the coordinator serves: every worker must report the same. */
  fingerprint: string;
  dtype?: WeightDType;
  /** Explicit ranges (one per address); default: the partition planner over the workers' reported capacities. */
  ranges?: BlockRange[];
  /** Standby workers that take over the range of a worker that died. */
  spares?: string[];
  /** The transport's security material (gRPC: transport/grpc/tls.ts's loadCredentials(...).client). */
  credentials?: ClientSecurity;
  stepTimeoutMs?: number;
  /** How long a request waits for the pipeline to be whole again after a fault before failing. */
  recoveryTimeoutMs?: number;
  /** How long recovery waits for a lost worker to come back (restart, spare) before re-planning onto fewer. */
  replaceGraceMs?: number;
  /** Called with each stage's ORT run per step (metrics, bench timelines). */
  onTiming?: (stage: number, timing: WireTiming) => void;
  /** Called after each recovery: how long the pipeline was broken, and the new plan. */
  onRecovery?: (ms: number, stages: StageView[]) => void;
  log?: (obj: object, msg: string) => void;
}

interface SessionLog {
  /** The session id the stages know now: a replay starts a fresh one so no stale cache can interfere. */
  wireId: string;
  epoch: number;
  /** Every step's token-level input so far (no hidden states: the coordinator never has them). */
  steps: PipelineStep[];
}

interface QueuedDecode {
  wireId: string;
  input: PipelineStep;
  resolve: (r: StepResult) => void;
  reject: (e: unknown) => void;
  /** Called once the step has its result or error (set when its group is sent). */
  settled?: () => void;
}

/** A session counts as decoding (for the group size) while its steps keep coming within this window. */
const DECODING_WINDOW_MS = 2_000;

/**
 * The coordinator's view of K workers as one Stepper. It configures every worker with its block range and next hop at
 * once (each stage handshakes its successor as soon as that one is ready), then sends token ids to stage 0 and gets
 * tokens or logits back from the chain. It never sees hidden states.
 *
 * It keeps every live session's token-level inputs, so when a stage dies mid-request it re-plans onto the workers
 * that answer (a restarted worker at its old address, a spare, or fewer stages), replays each affected session's
 * tokens to rebuild the lost KV caches, and carries on: greedy output is the same as without the fault.
 */
export class RemotePipeline implements Stepper {
  private clients: StageLink[] = [];
  private active: string[] = [];
  private infos: WireInfo[] = [];
  private ranges: BlockRange[] = [];
  private healthy: boolean[] = [];
  private monitor: NodeJS.Timeout | null = null;
  private readonly sessions = new Map<string, SessionLog>();
  private readonly decodeQueue: QueuedDecode[] = [];
  private groupsInFlight = 0;
  /** Replies straight from the last stage, errors from the stage that passed a step on (re-subscribed whenever the pipeline is reconfigured). */
  private results: ResultsSubscription | null = null;
  private readonly subscriber = `coordinator-${randomUUID()}`;
  private flushScheduled = false;
  /** When each wire session last sent a decode step: how many sessions are decoding now. */
  private readonly lastDecode = new Map<string, number>();
  private recovering: Promise<void> | null = null;
  /** Bumped by every (re)configuration; a failure seen under an older generation needs no new recovery. */
  private generation = 0;
  recoveries = 0;
  /** Decode results that came straight from the last stage (the rest came back through the chain). */
  directReplies = 0;

  private constructor(
    private readonly addresses: string[],
    private readonly opts: RemotePipelineOptions,
  ) {}

  static async connect(addresses: string[], opts: RemotePipelineOptions): Promise<RemotePipeline> {
    if (addresses.length === 0) throw new StrataError('no_workers', 'no worker addresses given; pass --workers HOST:PORT,...', 'failed_precondition');
    const p = new RemotePipeline(addresses, opts);
    await p.configure(addresses, opts.ranges);
    return p;
  }

  private async configure(addresses: string[], fixedRanges?: BlockRange[]): Promise<void> {
    const { spec, fingerprint } = this.opts;
    const clients = addresses.map((a) => connectStage(a, this.opts.credentials));
    try {
      const infos = await Promise.all(clients.map((c) => c.info(30_000)));
      infos.forEach((info, i) => {
        if (info.identity.protocol !== PROTOCOL_VERSION) {
          throw new StrataError('protocol_mismatch', `worker ${addresses[i]} speaks stage protocol ${info.identity.protocol}, this coordinator ${PROTOCOL_VERSION}; run the same strata version everywhere`, 'failed_precondition');
        }
        if (info.identity.fingerprint !== fingerprint || info.identity.blocks !== spec.blocks) {
          throw new StrataError('checkpoint_mismatch', `worker ${addresses[i]} serves checkpoint ${info.identity.fingerprint} (${info.identity.blocks} blocks), the coordinator's model is ${fingerprint} (${spec.blocks} blocks); start every worker with the same --model`, 'failed_precondition');
        }
      });
      const dtype = this.opts.dtype ?? 'float32';
      const ranges = fixedRanges ?? planPartition(spec, infos.map((info, i) => ({ id: addresses[i], memoryBytes: info.memory_bytes || Infinity, speed: info.speed || 1 })), { dtype }).stages.map((s) => s.range);
      if (ranges.length !== clients.length) {
        throw new StrataError('plan_unusable', `the plan uses ${ranges.length} of ${clients.length} workers; give every worker enough memory`, 'failed_precondition');
      }
      // All stages build/load at once; each waits for its successor before handshaking.
      await Promise.all(
        clients.map((c, i) => {
          this.opts.log?.({ stage: i, blocks: rangeLabel(ranges[i]), address: addresses[i] }, 'configuring stage');
          return c.configure({ first: ranges[i].first, last: ranges[i].last, dtype, next_address: addresses[i + 1] ?? '', fingerprint });
        }),
      );
      this.clients.forEach((c) => c.close());
      Object.assign(this, { clients, active: addresses, infos, ranges, healthy: clients.map(() => true) });
      this.generation++;
      this.subscribeResults();
    } catch (e) {
      clients.forEach((c) => c.close());
      throw e;
    }
  }

  /** (Re)subscribes to every stage's Results; until all confirm, decode replies come back through the chain. */
  private subscribeResults(): void {
    this.results?.close();
    try {
      this.results = new ResultsSubscription(this.clients, this.subscriber);
    } catch {
      this.results = null; // a client closed meanwhile: the chain carries the replies
    }
  }

  /** Polls grpc.health.v1 on every stage so /health and /v1/pipeline tell the truth, and grows back to full size. */
  startHealthMonitor(intervalMs = 2_000): void {
    this.monitor = setInterval(() => {
      if (this.active.length < this.addresses.length && !this.recovering) void this.regrow();
      const clients = this.clients;
      clients.forEach((c, i) => c.checkHealth(Math.min(intervalMs, 2_000)).then((s) => clients === this.clients && (this.healthy[i] = s === 'SERVING'), () => clients === this.clients && (this.healthy[i] = false)));
    }, intervalMs);
    this.monitor.unref();
  }

  get isHealthy(): boolean {
    return !this.recovering && this.healthy.length > 0 && this.healthy.every(Boolean);
  }

  describe(): { stages: StageView[] } {
    return {
      stages: this.ranges.map((r, i) => ({ blocks: [r.first, r.last], address: this.active[i], pid: this.infos[i]?.pid, healthy: this.healthy[i] ?? false, device: this.infos[i]?.device })),
    };
  }

  async step(sessionId: string, input: PipelineStep): Promise<StepResult> {
    let log = this.sessions.get(sessionId);
    if (!log) {
      log = { wireId: sessionId, epoch: 0, steps: [] };
      if (this.opts.spec.causal) this.sessions.set(sessionId, log);
    }
    const deadline = Date.now() + (this.opts.recoveryTimeoutMs ?? 60_000);
    let replayNeeded = false;
    for (;;) {
      const generation = this.generation;
      try {
        // A replay can itself meet a fault (another worker dies meanwhile): it is retried like the step.
        if (replayNeeded) await this.replay(log);
        replayNeeded = false;
        const result = await this.send(log.wireId, input);
        if (this.opts.spec.causal) this.record(log, input);
        return result;
      } catch (e) {
        if (!isRecoverable(e) || Date.now() > deadline) throw e;
        this.opts.log?.({ session: sessionId, err: (e as Error).message }, 'step failed; recovering the pipeline');
        await this.recover(generation, deadline);
        replayNeeded = true;
      }
    }
  }

  private async send(wireId: string, input: PipelineStep): Promise<StepResult> {
    if (this.isDecodeStep(input)) return this.enqueueDecode(wireId, input);
    const req = stepToWire(wireId, { fingerprint: this.opts.fingerprint, first: 0 }, input);
    return this.received(await this.clients[0].step(req, this.opts.stepTimeoutMs ?? 60_000));
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

  /**
   * Decode steps leave as StepBatch messages, at most K of them in flight (K = stages), each of at most
   * ceil(decoding sessions / K) steps. So K groups of sessions take turns through the stages: while stage 1 runs one
   * group, stage 0 runs the next (one group of all sessions would move in lockstep, one stage busy at a time). Steps
   * that arrive while K groups are out wait for the next group to come back and leave with it: sessions that start
   * at different times coalesce into full groups. The stages keep each group together (worker/stage-thread.ts).
   */
  private enqueueDecode(wireId: string, input: PipelineStep): Promise<StepResult> {
    return new Promise((resolve, reject) => {
      this.decodeQueue.push({ wireId, input, resolve, reject });
      this.lastDecode.set(wireId, Date.now());
      this.scheduleFlush();
    });
  }

  /** After the current turn: every session resumed by a reply has queued its next step by then. */
  private scheduleFlush(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    setImmediate(() => {
      this.flushScheduled = false;
      this.flushDecodes();
    });
  }

  private flushDecodes(): void {
    const k = Math.max(1, this.clients.length);
    const now = Date.now();
    for (const [id, at] of this.lastDecode) if (now - at > DECODING_WINDOW_MS) this.lastDecode.delete(id);
    const size = Math.max(1, Math.ceil(this.lastDecode.size / k));
    while (this.decodeQueue.length > 0 && this.groupsInFlight < k) {
      this.groupsInFlight++;
      void this.sendDecodes(this.decodeQueue.splice(0, size)).finally(() => {
        this.groupsInFlight--;
        this.scheduleFlush();
      });
    }
  }

  /**
   * Sends one group; settles when every step in it has its result or error. With a ready Results subscription the
   * results (with every stage's timing) come straight from the last stage, stage 0 acks as soon as it has passed the
   * group on, and a later stage's error comes from the stage before it; a step that could not be delivered that way
   * gets its reply through the chain instead.
   */
  private async sendDecodes(group: QueuedDecode[]): Promise<void> {
    const target = { fingerprint: this.opts.fingerprint, first: 0 };
    // A broken subscription (the last stage restarted, say) is renewed; steps use it once the stage confirms it.
    if (this.results?.closed && this.clients.length) this.subscribeResults();
    const direct = this.results?.ready ? this.results : null;
    const settled = group.map(() => false);
    /** Per step: the timer that fails it if its acknowledged result never arrives. */
    const lost: (NodeJS.Timeout | undefined)[] = [];
    const settle = (j: number, fn: () => void) => {
      if (settled[j]) return;
      settled[j] = true;
      clearTimeout(lost[j]);
      direct?.cancel(group[j].wireId);
      fn();
      group[j].settled?.();
    };
    /** Settles a step with its reply (from the subscription or the chain); a reply that does not decode rejects it. */
    const resolveWith = (j: number, reply: WireStepReply, viaSubscription: boolean) =>
      settle(j, () => {
        try {
          group[j].resolve(this.received(reply));
          if (viaSubscription) this.directReplies++;
        } catch (e) {
          group[j].reject(e);
        }
      });
    const done = group.map((q, j) => {
      direct?.expect(q.wireId).then((reply) => resolveWith(j, reply, true), (e) => settle(j, () => q.reject(e)));
      return new Promise<void>((resolve) => (q.settled = resolve));
    });
    try {
      const outcomes = await this.clients[0].stepBatch(group.map((q) => ({ ...stepToWire(q.wireId, target, q.input), reply_to: direct?.subscriber ?? '' })), this.opts.stepTimeoutMs ?? 60_000);
      outcomes.forEach((o, j) => {
        if (!o.reply) {
          const err = fromErrorRecord({ code: o.error?.code || 'stage_error', message: o.error?.message || 'the stage answered neither a reply nor an error', kind: o.error?.kind || 'internal' });
          return settle(j, () => group[j].reject(err));
        }
        if (o.reply.delivered && direct) {
          // The result (or error) comes on the subscription; should it never come, the step fails like a lost stage.
          if (!settled[j]) lost[j] = setTimeout(() => settle(j, () => group[j].reject(new StrataError('stage_unavailable', 'a stage acknowledged a step whose result never arrived', 'unavailable'))), this.opts.stepTimeoutMs ?? 60_000).unref();
          return;
        }
        if (o.reply.delivered) return settle(j, () => group[j].reject(new StrataError('stage_error', 'a stage delivered a result to a subscription this step did not name', 'internal')));
        resolveWith(j, o.reply, false);
      });
    } catch (e) {
      group.forEach((q, j) => settle(j, () => q.reject(e)));
    }
    await Promise.all(done);
  }

  /**
   * Keeps a step's token-level input for replay. A single-row step's mask covers every earlier position, and a
   * single-row replay uses only the last mask (concatSteps): the previous one is dropped, or a long generation would
   * keep masks of quadratic total size.
   */
  private record(log: SessionLog, input: PipelineStep): void {
    const prev = log.steps.at(-1);
    if (prev && prev.positionIds.dims[0] === 1 && input.positionIds.dims[0] === 1) prev.attentionMask = SUBSUMED_MASK;
    log.steps.push({ inputIds: input.inputIds, positionIds: input.positionIds, attentionMask: input.attentionMask });
  }

  /** Rebuilds a session's KV caches under a fresh wire id: one prefill of every token so far. */
  private async replay(log: SessionLog): Promise<void> {
    const old = log.wireId;
    log.epoch++;
    log.wireId = `${old.replace(/#\d+$/, '')}#${log.epoch}`;
    void this.clients[0]?.endSession(old).catch(() => {});
    // Even a session with no step recorded yet gets the fresh id: its failed first step may have filled some
    // stages' caches, and a retry under the old id would meet them (session_out_of_step, again and again).
    if (log.steps.length === 0) return;
    const singleRow = log.steps.every((s) => s.positionIds.dims[0] === 1);
    const steps = singleRow ? [concatSteps(log.steps)] : log.steps;
    for (const s of steps) {
      const seq = s.positionIds.dims[1];
      await this.send(log.wireId, { ...s, logitPositions: { dtype: 'int64', dims: [1], data: BigInt64Array.of(BigInt(seq - 1)) } });
    }
  }

  /** One recovery at a time: re-plan onto whichever workers answer, within the deadline. */
  private recover(failedGeneration: number, deadline: number): Promise<void> {
    if (this.generation !== failedGeneration) return Promise.resolve(); // someone already re-planned
    this.recovering ??= (async () => {
      const started = Date.now();
      this.healthy = this.healthy.map(() => false);
      for (let attempt = 0; ; attempt++) {
        const live = await this.liveWorkers();
        const waiting = live.length < this.addresses.length && Date.now() - started < (this.opts.replaceGraceMs ?? 5_000);
        if (waiting && Date.now() < deadline) {
          await new Promise((r) => setTimeout(r, 250));
          continue;
        }
        try {
          if (live.length === 0) throw new StrataError('pipeline_unavailable', 'no worker answers', 'unavailable');
          const sameShape = this.opts.ranges && live.length === this.opts.ranges.length ? this.opts.ranges : undefined;
          await this.configure(live, sameShape);
          this.recoveries++;
          this.opts.log?.({ ms: Date.now() - started, workers: live }, 'pipeline recovered');
          this.opts.onRecovery?.(Date.now() - started, this.describe().stages);
          return;
        } catch (e) {
          if (Date.now() > deadline) {
            throw new StrataError('pipeline_unavailable', `the pipeline lost a stage and could not be re-planned within ${this.opts.recoveryTimeoutMs ?? 60_000} ms (${(e as Error).message}); start a replacement worker or add spares`, 'unavailable');
          }
          await new Promise((r) => setTimeout(r, Math.min(200 * (attempt + 1), 2_000)));
        }
      }
    })().finally(() => {
      this.recovering = null;
    });
    return this.recovering;
  }

  /**
   * After shrinking, a returning worker (restarted at its address) re-registers: re-plan onto the larger set. Steps in
   * flight then meet a re-configured stage and replay, like after a fault.
   */
  async regrow(): Promise<boolean> {
    const live = await this.liveWorkers();
    if (live.length <= this.active.length || this.recovering) return false;
    await this.recover(this.generation, Date.now() + (this.opts.recoveryTimeoutMs ?? 60_000));
    return true;
  }

  /** The workers to use now: each original position keeps its worker if it answers, else takes a live spare. */
  private async liveWorkers(): Promise<string[]> {
    const alive = async (a: string) => {
      const c = connectStage(a, this.opts.credentials);
      try {
        await c.info(2_000);
        return true;
      } catch {
        return false;
      } finally {
        c.close();
      }
    };
    const spares = this.opts.spares ?? [];
    const status = await Promise.all([...this.addresses, ...spares].map(alive));
    const liveSpares = spares.filter((_, i) => status[this.addresses.length + i]);
    const out: string[] = [];
    this.addresses.forEach((a, i) => {
      if (status[i]) out.push(a);
      else if (liveSpares.length) out.push(liveSpares.shift()!);
    });
    return out;
  }

  async end(sessionId: string): Promise<void> {
    const log = this.sessions.get(sessionId);
    this.sessions.delete(sessionId);
    this.lastDecode.delete(log?.wireId ?? sessionId);
    await this.clients[0]?.endSession(log?.wireId ?? sessionId).catch(() => {});
  }

  /** Mean-pooled last hidden state (the /v1/embeddings vector). */
  embed(ids: number[]): Promise<Float32Array> {
    return embed(this, ids);
  }

  close(): void {
    if (this.monitor) clearInterval(this.monitor);
    this.results?.close();
    this.clients.forEach((c) => c.close());
  }
}

/** Stands in for a recorded single-row mask that a later step's mask covers (see RemotePipeline.record). */
const SUBSUMED_MASK: TensorData = { dtype: 'int64', dims: [1, 0], data: new BigInt64Array(0) };

/** Concatenates single-row steps into one prefill: same tokens, positions and mask, in one run. */
function concatSteps(steps: PipelineStep[]): PipelineStep {
  const cat = (pick: (s: PipelineStep) => TensorData | undefined): TensorData | undefined => {
    const parts = steps.map(pick);
    if (parts.some((p) => !p)) return undefined;
    const data = new BigInt64Array(parts.reduce((n, p) => n + p!.data.length, 0));
    let at = 0;
    for (const p of parts) (data.set(p!.data as BigInt64Array, at), (at += p!.data.length));
    return { dtype: 'int64', dims: [1, data.length], data };
  };
  const last = steps.at(-1)!;
  return { inputIds: cat((s) => s.inputIds), positionIds: cat((s) => s.positionIds)!, attentionMask: last.attentionMask };
}
