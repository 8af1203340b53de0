import { fromErrorRecord, StrataError } from '../model/errors.ts';
import type { PipelineStep, StepResult } from '../model/generation.ts';
import type { WireStepReply } from '../proto/messages.ts';
import { stepToWire } from '../proto/step-codec.ts';
import type { StageLink } from '../transport/link.ts';
import type { ResultsSubscription } from './results-subscription.ts';

/** A session counts as decoding (for the group size) while its steps keep coming within this window. */
const DECODING_WINDOW_MS = 2_000;

interface QueuedDecode {
  wireId: string;
  input: PipelineStep;
  resolve: (r: StepResult) => void;
  reject: (e: unknown) => void;
  /** Called once the step has its result or error (set when its group is sent). */
  settled?: () => void;
}

export interface DecodeSchedulerOptions {
  fingerprint: string;
  stepTimeoutMs: number;
  /** The current stages (the first takes the groups; their number bounds the groups in flight). */
  links(): StageLink[];
  /** The Results subscription to use now, renewed when broken; null while there is none. */
  subscription(): ResultsSubscription | null;
  /** A reply as a StepResult (throws when it does not decode). */
  received(reply: WireStepReply): StepResult;
}

/**
 * Decode steps leave as StepBatch messages, at most K of them in flight (K = stages), each of at most
 * ceil(decoding sessions / K) steps. So K groups of sessions take turns through the stages: while stage 1 runs one
 * group, stage 0 runs the next (one group of all sessions would move in lockstep, one stage busy at a time). Steps
 * that arrive while K groups are out wait for the next group to come back and leave with it: sessions that start
 * at different times coalesce into full groups. The stages keep each group together (worker/stage-thread.ts).
 */
export class DecodeScheduler {
  private readonly queue: QueuedDecode[] = [];
  private groupsInFlight = 0;
  private flushScheduled = false;
  /** When each wire session last sent a decode step: how many sessions are decoding now. */
  private readonly lastDecode = new Map<string, number>();
  /** Decode results that came straight from the last stage (the rest came back through the chain). */
  directReplies = 0;

  constructor(private readonly o: DecodeSchedulerOptions) {}

  /** One decode step of one session, sent with the next group. */
  enqueue(wireId: string, input: PipelineStep): Promise<StepResult> {
    return new Promise((resolve, reject) => {
      this.queue.push({ wireId, input, resolve, reject });
      this.lastDecode.set(wireId, Date.now());
      this.scheduleFlush();
    });
  }

  /** The session ended: it no longer counts as decoding. */
  forget(wireId: string): void {
    this.lastDecode.delete(wireId);
  }

  /** After the current turn: every session resumed by a reply has queued its next step by then. */
  private scheduleFlush(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    setImmediate(() => {
      this.flushScheduled = false;
      this.flush();
    });
  }

  private flush(): void {
    const k = Math.max(1, this.o.links().length);
    const now = Date.now();
    for (const [id, at] of this.lastDecode) if (now - at > DECODING_WINDOW_MS) this.lastDecode.delete(id);
    const size = Math.max(1, Math.ceil(this.lastDecode.size / k));
    while (this.queue.length > 0 && this.groupsInFlight < k) {
      this.groupsInFlight++;
      void this.send(this.queue.splice(0, size)).finally(() => {
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
  private async send(group: QueuedDecode[]): Promise<void> {
    const target = { fingerprint: this.o.fingerprint, first: 0 };
    const subscription = this.o.subscription();
    const direct = subscription?.ready ? subscription : null;
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
          group[j].resolve(this.o.received(reply));
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
      const outcomes = await this.o.links()[0].stepBatch(group.map((q) => ({ ...stepToWire(q.wireId, target, q.input), reply_to: direct?.subscriber ?? '' })), this.o.stepTimeoutMs);
      outcomes.forEach((o, j) => {
        if (!o.reply) {
          const err = fromErrorRecord({ code: o.error?.code || 'stage_error', message: o.error?.message || 'the stage answered neither a reply nor an error', kind: o.error?.kind || 'internal' });
          return settle(j, () => group[j].reject(err));
        }
        if (o.reply.delivered && direct) {
          // The result (or error) comes on the subscription; should it never come, the step fails like a lost stage.
          if (!settled[j]) lost[j] = setTimeout(() => settle(j, () => group[j].reject(new StrataError('stage_unavailable', 'a stage acknowledged a step whose result never arrived', 'unavailable'))), this.o.stepTimeoutMs).unref();
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
}
