import * as grpc from '@grpc/grpc-js';
import { HealthImplementation } from 'grpc-health-check';
import { loadModelSpec, type ModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { isStrataError, StrataError, toErrorRecord } from '../model/errors.ts';
import { checkRange, rangeLabel, type BlockRange } from '../model/range.ts';
import type { WeightDType } from '../model/stage-graph.ts';
import { StageClient, type WireResultsMessage, type WireStepBatchReply, type WireStepOutcome, type WireStepReply, type WireStepRequest, type WireTiming } from '../proto/client.ts';
import { resultToWire, stepFromWire, stepToWire } from '../proto/step-codec.ts';
import { channelOptions, fromWire, MALFORMED, PROTOCOL_VERSION, sameModel, StageService, toServiceError, type WireIdentity } from '../proto/wire.ts';
import { StageHost } from './stage-host.ts';
import type { StepDone } from './thread-protocol.ts';
import type { PipelineStep } from '../model/generation.ts';
import type { TensorData } from '../model/tensor.ts';

export interface WorkerOptions {
  listen: string;
  modelDir: string;
  device?: string;
  threads?: number;
  cacheDir?: string;
  kvBudgetBytes?: number;
  sessionTtlMs?: number;
  /** Capacity and relative speed this worker reports to the planner. */
  memoryBytes?: number;
  speed?: number;
  stepTimeoutMs?: number;
  /** Decode steps of different sessions merged into one ORT run. */
  maxBatch?: number;
  credentials?: { server: grpc.ServerCredentials; client: grpc.ChannelCredentials };
  log?: (obj: object, msg: string) => void;
}

/** Items one StepBatch may carry (a coordinator sends at most its live sessions). */
const MAX_BATCH_ITEMS = 1024;

type ResultsStream = grpc.ServerWritableStream<any, WireResultsMessage>;
type Delivered = WireResultsMessage['replies'][number];

/** What a stage answers for a step whose reply (or error) went, or will go, to the coordinator's subscription. */
const DELIVERED_ACK: WireStepReply = { tokens: [], timings: [], delivered: true };

/** A batch's direct replies, one Results message per subscriber. */
class Deliveries {
  private readonly bySubscriber = new Map<ResultsStream, Delivered[]>();

  add(to: ResultsStream, d: Delivered): void {
    const list = this.bySubscriber.get(to);
    if (list) list.push(d);
    else this.bySubscriber.set(to, [d]);
  }

  /** A subscriber that went away meanwhile lost nothing: its coordinator failed those steps when the stream broke. */
  send(): void {
    for (const [to, replies] of this.bySubscriber) if (to.writable) to.write({ ready: false, replies });
  }
}

interface Assignment {
  range: BlockRange;
  dtype: WeightDType;
  next: StageClient | null;
  identity: WireIdentity;
  device: string;
}

/**
 * One pipeline stage as a gRPC server: receives a step (token ids or hidden states), runs its blocks on the stage
 * thread, forwards the hidden states straight to the next stage and relays that stage's reply back upstream.
 */
export class StageWorker {
  private readonly server = new grpc.Server({ 'grpc.max_receive_message_length': channelOptions['grpc.max_receive_message_length'], 'grpc.max_send_message_length': channelOptions['grpc.max_send_message_length'] });
  private readonly health = new HealthImplementation({ '': 'NOT_SERVING', 'strata.v1.Stage': 'NOT_SERVING' });
  private readonly host: StageHost;
  private assignment: Assignment | null = null;
  private configuring: Promise<unknown> = Promise.resolve();
  private sweepTimer: NodeJS.Timeout | null = null;
  /** Open StepStreams from predecessors: ended on close, or the server would wait for their peers to hang up. */
  private readonly streams = new Set<grpc.ServerDuplexStream<any, WireStepBatchReply>>();
  /** Coordinators' Results subscriptions, by subscriber id: results go there from the last stage, pass-on errors from any. */
  private readonly subscribers = new Map<string, ResultsStream>();
  readonly spec: ModelSpec;
  readonly fingerprint: string;
  address = '';

  constructor(private readonly opts: WorkerOptions) {
    // Fail fast (before listening) on a bad model directory, with the model layer's typed message.
    this.spec = loadModelSpec(opts.modelDir);
    const ck = Checkpoint.open(opts.modelDir);
    this.fingerprint = ck.fingerprint();
    ck.close();
    this.host = new StageHost((m) => this.log({}, m));
    this.health.addToServer(this.server);
    this.server.addService(StageService, {
      Info: this.unary(() => this.info()),
      Configure: this.unary((req) => this.configure(req)),
      Handshake: this.unary((req) => this.handshake(req)),
      Step: this.unary((req) => this.step(req)),
      StepStream: (call: grpc.ServerDuplexStream<any, any>) => this.serveStepStream(call),
      Results: (call: grpc.ServerWritableStream<any, WireResultsMessage>) => this.serveResults(call),
      EndSession: this.unary((req) => this.endSession(req)),
      Ping: this.unary(async (req) => ({ bytes: fromWire(req.payload, 'payload')?.data.byteLength ?? 0 })),
    });
  }

  private log(obj: object, msg: string): void {
    this.opts.log?.(obj, msg);
  }

  private unary(fn: (req: any) => Promise<unknown>): grpc.handleUnaryCall<any, any> {
    return (call, callback) => {
      if (call.request?.[MALFORMED]) {
        return callback(toServiceError(new StrataError('request_malformed', `the request is not a valid protobuf message: ${call.request[MALFORMED]}`)) as grpc.ServiceError);
      }
      fn(call.request).then(
        (res) => callback(null, res),
        (e) => callback(toServiceError(e) as grpc.ServiceError),
      );
    };
  }

  async listen(): Promise<string> {
    const creds = this.opts.credentials?.server ?? grpc.ServerCredentials.createInsecure();
    const port = await new Promise<number>((resolve, reject) => this.server.bindAsync(this.opts.listen, creds, (err, p) => (err ? reject(err) : resolve(p))));
    const host = this.opts.listen.slice(0, this.opts.listen.lastIndexOf(':'));
    this.address = `${host}:${port}`;
    this.sweepTimer = setInterval(() => this.host.stats().then((s) => s.expired.length && this.log({ expired: s.expired.length }, 'expired idle sessions'), () => {}), 30_000);
    this.sweepTimer.unref();
    return this.address;
  }

  identity(a: Assignment | null = this.assignment): WireIdentity {
    return {
      fingerprint: this.fingerprint, first: a?.range.first ?? 0, last: a?.range.last ?? 0, dtype: a?.dtype ?? '',
      protocol: PROTOCOL_VERSION, blocks: this.spec.blocks, model_type: this.spec.modelType,
    };
  }

  private async info() {
    const stats = this.assignment ? await this.host.stats() : { sessions: 0, kvBytes: 0 };
    return {
      identity: this.identity(), configured: !!this.assignment, next_address: this.assignment?.next?.address ?? '', pid: process.pid,
      device: this.assignment?.device ?? this.opts.device ?? 'cpu', memory_bytes: this.opts.memoryBytes ?? 0, speed: this.opts.speed ?? 1,
      sessions: stats.sessions, kv_bytes: stats.kvBytes,
    };
  }

  /** Loads a block range (building its graph if needed) and connects to the next stage, verifying it. */
  async configure(req: { first: number; last: number; dtype: string; next_address: string; fingerprint: string }) {
    if (req.fingerprint && req.fingerprint !== this.fingerprint) {
      throw new StrataError('checkpoint_mismatch', `this worker serves checkpoint ${this.fingerprint} (${this.opts.modelDir}) but the coordinator expects ${req.fingerprint}; start it with the same --model`, 'failed_precondition');
    }
    const range = checkRange({ first: req.first, last: req.last }, this.spec.blocks);
    const dtype = (req.dtype || 'float32') as WeightDType;
    if (dtype !== 'float32' && dtype !== 'float16') throw new StrataError('dtype_invalid', `dtype "${req.dtype}" is not float32 or float16`);
    const run = async () => {
      const same = this.assignment && this.assignment.range.first === range.first && this.assignment.range.last === range.last && this.assignment.dtype === dtype;
      // The same assignment again (a second coordinator, a recovery that kept this stage): nothing to change, and
      // steps in flight keep their connection to the next stage.
      if (same && (this.assignment!.next?.address ?? '') === req.next_address) return { identity: this.identity() };
      this.health.setStatus('', 'NOT_SERVING');
      let device = this.assignment?.device ?? 'cpu';
      // Until the new range is loaded and its next stage connected, steps are refused (stage_not_configured: the
      // coordinator retries them after its reconfiguration). A step accepted under the old assignment must not be
      // answered as if this stage ended the model because its next stage is not connected yet.
      this.assignment?.next?.close();
      this.assignment = null;
      if (!same) {
        this.log({ range: rangeLabel(range), dtype }, 'loading stage');
        const loaded = await this.host.load({
          modelDir: this.opts.modelDir, range, dtype, cacheDir: this.opts.cacheDir, threads: this.opts.threads, device: this.opts.device,
          kvBudgetBytes: this.opts.kvBudgetBytes ?? 2 * 1024 ** 3, sessionTtlMs: this.opts.sessionTtlMs ?? 10 * 60_000, maxBatch: this.opts.maxBatch ?? 8,
        });
        device = loaded.provider;
        this.log({ range: rangeLabel(range), paramBytes: loaded.paramBytes, provider: loaded.provider, cached: !loaded.built }, 'stage loaded');
      }
      const assignment: Assignment = { range, dtype, next: null, identity: null as never, device };
      assignment.identity = this.identity(assignment);
      if (range.last < this.spec.blocks) {
        if (!req.next_address) throw new StrataError('next_stage_missing', `blocks ${rangeLabel(range)} do not end the model (${this.spec.blocks} blocks): a next_address is required`);
        const next = new StageClient(req.next_address, this.opts.credentials?.client);
        const theirs = await this.handshakeWhenReady(next, assignment.identity);
        if (theirs.first !== range.last) {
          next.close();
          throw new StrataError('peer_mismatch', `next stage ${req.next_address} starts at block ${theirs.first}, but this stage ends at ${range.last}`, 'failed_precondition');
        }
        assignment.next = next;
      }
      this.assignment = assignment;
      this.health.setStatus('', 'SERVING');
      this.health.setStatus('strata.v1.Stage', 'SERVING');
      return { identity: this.identity() };
    };
    const p = this.configuring.then(run, run);
    this.configuring = p.catch(() => {});
    return p;
  }

  /** Stages are configured in parallel: the next one may still be loading, so wait for it (not for a mismatch). */
  private async handshakeWhenReady(next: StageClient, mine: WireIdentity): Promise<WireIdentity> {
    const started = Date.now();
    for (let delay = 100; ; delay = Math.min(delay * 2, 2_000)) {
      try {
        return (await next.handshake(mine)).identity;
      } catch (e) {
        // Still loading (a stage build may take many minutes), briefly unreachable, or still holding its previous
        // range (its own Configure may not have arrived yet): wait. A next stage that stays unreachable fails this
        // configure soon, so a recovery can re-plan instead of hanging.
        const waited = Date.now() - started;
        const loading = isStrataError(e) && ((e.code === 'stage_not_configured' && waited < 30 * 60_000) || (e.kind === 'unavailable' && waited < 30_000));
        const stale = isStrataError(e) && e.code === 'peer_range_mismatch' && waited < 15_000;
        if (!loading && !stale) {
          next.close();
          throw e;
        }
        await new Promise((r) => setTimeout(r, delay));
      }
    }
  }

  /** The previous stage introduces itself: it must be the same checkpoint and dtype, and end where this stage starts. */
  private async handshake(req: { peer: WireIdentity }) {
    const mine = this.identity();
    if (!this.assignment) throw new StrataError('stage_not_configured', 'this worker has no block range yet; configure it before its predecessor', 'failed_precondition');
    const why = sameModel(req.peer, mine);
    if (why) throw new StrataError('peer_mismatch', `refusing a previous stage built from a different model (${why})`, 'failed_precondition');
    if (req.peer.last !== mine.first) throw new StrataError('peer_range_mismatch', `previous stage ends at block ${req.peer.last} but this stage starts at ${mine.first}`, 'failed_precondition');
    return { identity: mine };
  }

  private configured(): Assignment {
    if (!this.assignment) throw new StrataError('stage_not_configured', 'this worker has no block range yet', 'failed_precondition');
    return this.assignment;
  }

  /** A step must be addressed to this stage: same checkpoint, same first block. */
  private checkAddressed(req: WireStepRequest, a: Assignment): void {
    if ((req.fingerprint && req.fingerprint !== this.fingerprint) || req.first !== a.range.first) {
      throw new StrataError('stage_mismatch', `step addressed to blocks from ${req.first} of checkpoint ${req.fingerprint || '?'}, but this stage is ${rangeLabel(a.range)} of ${this.fingerprint}`, 'failed_precondition');
    }
  }

  private timing(a: Assignment, done: StepDone): WireTiming {
    return { first: a.range.first, last: a.range.last, run_ms: done.runMs, start_unix_ms: done.startUnixMs, batch: done.batch, pid: process.pid };
  }

  private async step(req: WireStepRequest): Promise<WireStepReply> {
    const a = this.configured();
    this.checkAddressed(req, a);
    const { input, hidden } = stepFromWire(req);
    const done = await this.host.step(req.session_id, { ...input, hidden });
    const timing = this.timing(a, done);
    if (!a.next) return resultToWire(done.result, [timing]);
    const reply = await a.next.step(stepToWire(req.session_id, { fingerprint: this.fingerprint, first: a.range.last }, input, done.hidden), this.opts.stepTimeoutMs ?? 120_000);
    reply.timings = [timing, ...(reply.timings ?? [])];
    return reply;
  }

  /** A predecessor's (or the coordinator's) StepStream: each message is one step batch, answered under its call_id. */
  private serveStepStream(call: grpc.ServerDuplexStream<any, WireStepBatchReply>): void {
    this.streams.add(call);
    call.on('close', () => this.streams.delete(call));
    call.on('data', (req) => {
      const callId = Number(req?.call_id ?? 0);
      const answer = (reply: Omit<WireStepBatchReply, 'call_id'>) => {
        if (!call.destroyed && call.writable) call.write({ call_id: callId, ...reply });
      };
      if (req?.[MALFORMED]) return answer({ outcomes: [], error: toErrorRecord(new StrataError('request_malformed', `the request is not a valid protobuf message: ${req[MALFORMED]}`)) });
      this.stepBatch(req).then(answer, (e) => answer({ outcomes: [], error: toErrorRecord(e) }));
    });
    call.on('end', () => call.end());
    call.on('error', () => {}); // the peer went away: its calls are its business
  }

  /** A coordinator subscribes to the replies of steps that name it in reply_to. */
  private serveResults(call: grpc.ServerWritableStream<any, WireResultsMessage>): void {
    const id = String(call.request?.subscriber ?? '');
    if (!id || id.length > 128) {
      call.destroy(toServiceError(new StrataError('subscriber_invalid', 'a Results subscriber id is a non-empty string of at most 128 characters')) as grpc.ServiceError);
      return;
    }
    this.subscribers.get(id)?.end(); // a coordinator that resubscribes replaces its old stream
    this.subscribers.set(id, call);
    const forget = () => this.subscribers.get(id) === call && this.subscribers.delete(id);
    call.on('cancelled', forget);
    call.on('close', forget);
    call.on('error', forget);
    call.write({ ready: true, replies: [] });
  }

  /**
   * A coordinator's micro-batch: the items run together on the stage thread, the successful ones go on to the next
   * stage as one message, and every item comes back with its own reply or error (one bad item fails only itself).
   * Timings travel forward with the items, so whichever reply ends a step's journey carries every stage's timing.
   */
  private async stepBatch(req: { steps?: WireStepRequest[] }): Promise<{ outcomes: WireStepOutcome[] }> {
    const a = this.configured();
    const items = req.steps ?? [];
    if (items.length === 0 || items.length > MAX_BATCH_ITEMS) {
      throw new StrataError('step_batch_invalid', `a StepBatch carries 1 to ${MAX_BATCH_ITEMS} steps, got ${items.length}`);
    }
    const outcomes: WireStepOutcome[] = new Array(items.length);
    const decoded: { index: number; sessionId: string; input: PipelineStep; replyTo: string; timings: WireTiming[] }[] = [];
    items.forEach((r, index) => {
      try {
        this.checkAddressed(r, a);
        const { input, hidden } = stepFromWire(r);
        decoded.push({ index, sessionId: r.session_id, input: { ...input, hidden }, replyTo: r.reply_to ?? '', timings: r.timings ?? [] });
      } catch (e) {
        outcomes[index] = { error: toErrorRecord(e) };
      }
    });
    const done = decoded.length ? await this.host.stepMany(decoded.map(({ sessionId, input }) => ({ sessionId, input }))) : [];
    const onward: { item: (typeof decoded)[number]; hidden: TensorData | undefined; timings: WireTiming[] }[] = [];
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
    if (onward.length) {
      const target = { fingerprint: this.fingerprint, first: a.range.last };
      const sent = a.next!.stepBatch(onward.map(({ item, hidden, timings }) => ({ ...stepToWire(item.sessionId, target, item.input, hidden), reply_to: item.replyTo, timings })), this.opts.stepTimeoutMs ?? 120_000);
      // Items whose coordinator subscribed here are acked now: waiting for the chain's answer would put K-1 relays
      // of acks on the cores just when the next token's first stage runs (measured: 43 -> 38 ms/token at K=4). What
      // the later stages answer for them (an error, or a reply they could not deliver) is delivered from here.
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
      if (passedOn.every(Boolean)) sent.then(settle, (err) => settle(null, err));
      else await sent.then(settle, (err) => settle(null, err));
    }
    return { outcomes };
  }

  /** This worker's open Results stream of that subscriber, if any. */
  private subscriberFor(replyTo: string): ResultsStream | undefined {
    const s = replyTo ? this.subscribers.get(replyTo) : undefined;
    return s?.writable ? s : undefined;
  }

  private async endSession(req: { session_id: string }) {
    await this.host.end(req.session_id);
    await this.assignment?.next?.endSession(req.session_id).catch(() => {});
    return {};
  }

  async close(): Promise<void> {
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    this.health.setStatus('', 'NOT_SERVING');
    for (const call of [...this.streams, ...this.subscribers.values()]) call.end();
    await new Promise<void>((resolve) => this.server.tryShutdown(() => resolve()));
    this.assignment?.next?.close();
    await this.host.close();
  }
}
