import { StrataError, toErrorRecord } from '../model/errors.ts';
import type { PipelineStep } from '../model/generation.ts';
import { rangeLabel } from '../model/range.ts';
import type { TensorData } from '../model/tensor.ts';
import type { WireDelivered, WireStepOutcome, WireStepReply, WireStepRequest, WireTiming } from '../proto/messages.ts';
import { resultToWire, stepFromWire, stepToWire } from '../proto/step-codec.ts';
import type { ResultsSink } from '../transport/link.ts';
import type { Assignment } from './assignment.ts';
import type { StageHost } from './stage-host.ts';
import type { StepDone } from './thread-protocol.ts';

/** Items one StepBatch may carry (a coordinator sends at most its live sessions). */
const MAX_BATCH_ITEMS = 1024;

/** What a stage answers for a step whose reply (or error) went, or will go, to the coordinator's subscription. */
const DELIVERED_ACK: WireStepReply = { tokens: [], timings: [], delivered: true };

/** A batch's direct replies, one Results message per subscriber. */
class Deliveries {
  private readonly bySubscriber = new Map<ResultsSink, WireDelivered[]>();

  add(to: ResultsSink, d: WireDelivered): void {
    const list = this.bySubscriber.get(to);
    if (list) list.push(d);
    else this.bySubscriber.set(to, [d]);
  }

  /** A subscriber that went away meanwhile lost nothing: its coordinator failed those steps when the stream broke. */
  send(): void {
    for (const [to, replies] of this.bySubscriber) if (to.open) to.send({ ready: false, replies });
  }
}

/** A step item of a batch, decoded and addressed to this stage. */
interface BatchItem {
  index: number;
  sessionId: string;
  input: PipelineStep;
  replyTo: string;
  timings: WireTiming[];
}

export interface RelayOptions {
  fingerprint: string;
  host: StageHost;
  /** The current assignment, or stage_not_configured. */
  configured(): Assignment;
  stepTimeoutMs: number;
}

/**
 * A stage's part of a step's journey: run the step's blocks on the stage thread, pass the hidden states on to the
 * next stage, and answer with the reply that ends the journey, or deliver it to the coordinator's Results
 * subscription (ARCHITECTURE.md's data flow: results come straight from the last stage).
 */
export class StepRelay {
  /** Coordinators' Results subscriptions, by subscriber id: results go there from the last stage, pass-on errors from any. */
  private readonly subscribers = new Map<string, ResultsSink>();

  constructor(private readonly o: RelayOptions) {}

  /** A step must be addressed to this stage: same checkpoint, same first block. */
  private checkAddressed(req: WireStepRequest, a: Assignment): void {
    if ((req.fingerprint && req.fingerprint !== this.o.fingerprint) || req.first !== a.range.first) {
      throw new StrataError('stage_mismatch', `step addressed to blocks from ${req.first} of checkpoint ${req.fingerprint || '?'}, but this stage is ${rangeLabel(a.range)} of ${this.o.fingerprint}`, 'failed_precondition');
    }
  }

  private timing(a: Assignment, done: StepDone): WireTiming {
    const t = done.transfer;
    return {
      first: a.range.first, last: a.range.last, run_ms: done.runMs, start_unix_ms: done.startUnixMs, batch: done.batch, pid: process.pid,
      host_to_device_bytes: t?.hostToDevice ?? 0, device_to_host_bytes: t?.deviceToHost ?? 0, kv_host_bytes: t?.kvBytes ?? 0,
      ahead: done.ahead === true, steps: done.steps ?? 1,
    };
  }

  private target(a: Assignment) {
    return { fingerprint: this.o.fingerprint, first: a.range.last };
  }

  /** One step, answered through the chain: this stage's run, then the next stage's reply with every timing. */
  async step(req: WireStepRequest): Promise<WireStepReply> {
    const a = this.o.configured();
    this.checkAddressed(req, a);
    const { input, hidden } = stepFromWire(req);
    const done = await this.o.host.step(req.session_id, { ...input, hidden });
    const timing = this.timing(a, done);
    if (!a.next) return resultToWire(done.result, [timing]);
    const reply = await a.next.step(stepToWire(req.session_id, this.target(a), input, done.hidden), this.o.stepTimeoutMs);
    reply.timings = [timing, ...(reply.timings ?? [])];
    return reply;
  }

  /** A coordinator subscribes to the replies of steps that name it in reply_to. */
  subscribe(id: string, sink: ResultsSink): void {
    if (!id || id.length > 128) throw new StrataError('subscriber_invalid', 'a Results subscriber id is a non-empty string of at most 128 characters');
    this.subscribers.get(id)?.end(); // a coordinator that resubscribes replaces its old stream
    this.subscribers.set(id, sink);
    sink.onClosed(() => this.subscribers.get(id) === sink && this.subscribers.delete(id));
    sink.send({ ready: true, replies: [] });
  }

  /** This worker's open Results stream of that subscriber, if any. */
  private subscriberFor(replyTo: string): ResultsSink | undefined {
    const s = replyTo ? this.subscribers.get(replyTo) : undefined;
    return s?.open ? s : undefined;
  }

  /**
   * A coordinator's micro-batch: the items run together on the stage thread, the successful ones go on to the next
   * stage as one message, and every item comes back with its own reply or error (one bad item fails only itself).
   * Timings travel forward with the items, so whichever reply ends a step's journey carries every stage's timing.
   */
  async stepBatch(req: { steps?: WireStepRequest[] }): Promise<{ outcomes: WireStepOutcome[] }> {
    const a = this.o.configured();
    const items = req.steps ?? [];
    if (items.length === 0 || items.length > MAX_BATCH_ITEMS) {
      throw new StrataError('step_batch_invalid', `a StepBatch carries 1 to ${MAX_BATCH_ITEMS} steps, got ${items.length}`);
    }
    const outcomes: WireStepOutcome[] = new Array(items.length);
    const decoded: BatchItem[] = [];
    items.forEach((r, index) => {
      try {
        this.checkAddressed(r, a);
        const { input, hidden } = stepFromWire(r);
        decoded.push({ index, sessionId: r.session_id, input: { ...input, hidden }, replyTo: r.reply_to ?? '', timings: r.timings ?? [] });
      } catch (e) {
        outcomes[index] = { error: toErrorRecord(e) };
      }
    });
    const done = decoded.length ? await this.o.host.stepMany(decoded.map(({ sessionId, input }) => ({ sessionId, input }))) : [];
    const onward: Onward[] = [];
    const deliveries = new Deliveries();
    done.forEach((o, j) => {
      const item = decoded[j];
      if (!o.ok) return void (outcomes[item.index] = { error: o.error });
      const timings = [...item.timings, this.timing(a, o.done)];
      if (a.next) return void onward.push({ item, hidden: o.done.hidden, timings });
      const reply = resultToWire(o.done.result, timings);
      const subscriber = this.subscriberFor(item.replyTo);
      if (subscriber) {
        deliveries.add(subscriber, { session_id: item.sessionId, reply });
        outcomes[item.index] = { reply: DELIVERED_ACK };
      } else {
        outcomes[item.index] = { reply }; // no such subscription here: the reply goes back through the chain
      }
    });
    // Sent before the chain's acks: the coordinator has every result by the time it could hear of it another way.
    deliveries.send();
    if (onward.length) await this.passOn(a, onward, outcomes);
    return { outcomes };
  }

  /**
   * Sends the batch's successful items to the next stage as one message. Items whose coordinator subscribed here are
   * acked now: waiting for the chain's answer would put K-1 relays of acks on the cores just when the next token's
   * first stage runs (measured: 43 -> 38 ms/token at K=4). What the later stages answer for them (an error, or a
   * reply they could not deliver) is delivered from here. Resolves once `outcomes` is final.
   */
  private async passOn(a: Assignment, onward: Onward[], outcomes: WireStepOutcome[]): Promise<void> {
    const target = this.target(a);
    const sent = a.next!.stepBatch(onward.map(({ item, hidden, timings }) => ({ ...stepToWire(item.sessionId, target, item.input, hidden), reply_to: item.replyTo, timings })), this.o.stepTimeoutMs);
    const passedOn = onward.map(({ item }) => this.subscriberFor(item.replyTo));
    passedOn.forEach((sub, j) => sub && (outcomes[onward[j].item.index] = { reply: DELIVERED_ACK }));
    const settle = (next: WireStepOutcome[] | null, e?: unknown) => {
      const late = new Deliveries();
      onward.forEach(({ item }, j) => {
        const o = next?.[j] ?? { error: toErrorRecord(e) };
        const sub = passedOn[j];
        if (!sub) outcomes[item.index] = o.reply ? { reply: o.reply } : { error: o.error };
        else if (!o.reply) late.add(sub, { session_id: item.sessionId, error: o.error });
        else if (!o.reply.delivered) late.add(sub, { session_id: item.sessionId, reply: o.reply });
      });
      late.send();
    };
    if (passedOn.every(Boolean)) void sent.then(settle, (err) => settle(null, err));
    else await sent.then(settle, (err) => settle(null, err));
  }
}

/** An item that ran here and goes on to the next stage. */
interface Onward {
  item: BatchItem;
  hidden: TensorData | undefined;
  timings: WireTiming[];
}
