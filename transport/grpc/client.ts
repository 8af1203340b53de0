import * as grpc from '@grpc/grpc-js';
import { service as healthService } from 'grpc-health-check';
import { fromErrorRecord, StrataError } from '../../model/errors.ts';
import type {
  WireConfigureRequest, WireIdentityReply, WireInfo, WireResultsMessage, WireStepBatch, WireStepBatchReply, WireStepOutcome, WireStepReply, WireStepRequest,
} from '../../proto/messages.ts';
import type { WireIdentity, WireTensor } from '../../proto/wire.ts';
import type { ResultsHandlers, StageLink, Subscription } from '../link.ts';
import { channelOptions, StageClientCtor } from './service.ts';
import { fromServiceError, streamEnded } from './status.ts';

interface StepStreamState {
  call: grpc.ClientDuplexStream<WireStepBatch, WireStepBatchReply>;
  /** Calls sent on this stream and not answered yet, by call_id. */
  waiting: Map<number, { resolve: (r: WireStepBatchReply) => void; reject: (e: unknown) => void }>;
}

const HealthClient = grpc.makeGenericClientConstructor(healthService as grpc.ServiceDefinition, 'Health');

/** The generated client's methods, as this class calls them. */
type UnaryMethod = (req: unknown, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res: unknown) => void) => void;
interface StageStub extends grpc.Client {
  [method: string]: unknown;
  StepStream(): grpc.ClientDuplexStream<WireStepBatch, WireStepBatchReply>;
  Results(req: { subscriber: string }): grpc.ClientReadableStream<WireResultsMessage>;
}
interface HealthStub extends grpc.Client {
  [method: string]: unknown;
  Check(req: { service: string }, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res: { status: string | number }) => void): void;
}

/** The gRPC StageLink: a promise-returning client of one worker's Stage service (and its grpc.health.v1 status). */
export class StageClient implements StageLink {
  private readonly client: StageStub;
  private readonly health: HealthStub;
  private stream: StepStreamState | null = null;
  private nextCallId = 1;

  constructor(
    readonly address: string,
    credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure(),
  ) {
    this.client = new StageClientCtor(address, credentials, channelOptions) as StageStub;
    // Share the channel: one HTTP/2 connection per stage pair.
    this.health = new HealthClient(address, credentials, { channelOverride: this.client.getChannel() }) as HealthStub;
  }

  private unary<Req, Res>(method: string, req: Req, timeoutMs: number): Promise<Res> {
    return new Promise((resolve, reject) => {
      try {
        (this.client[method] as UnaryMethod).call(this.client, req, { deadline: Date.now() + timeoutMs }, (err, res) => {
          if (err) reject(fromServiceError(err, this.address));
          else resolve(res as Res);
        });
      } catch (e) {
        reject(this.closedError(e));
      }
    });
  }

  /** A call on a client that was closed meanwhile (its stage was reconfigured or given up): the stage is gone. */
  private closedError(e: unknown): StrataError {
    return new StrataError('stage_unavailable', `stage ${this.address}: ${(e as Error)?.message ?? e}`, 'unavailable');
  }

  info(timeoutMs = 5_000): Promise<WireInfo> {
    return this.unary('Info', {}, timeoutMs);
  }

  configure(req: WireConfigureRequest, timeoutMs = 30 * 60_000): Promise<WireIdentityReply> {
    return this.unary('Configure', req, timeoutMs);
  }

  handshake(peer: WireIdentity, timeoutMs = 10_000): Promise<WireIdentityReply> {
    return this.unary('Handshake', { peer }, timeoutMs);
  }

  step(req: WireStepRequest, timeoutMs: number): Promise<WireStepReply> {
    return this.unary('Step', req, timeoutMs);
  }

  /**
   * Several sessions' steps in one message on this client's StepStream (opened on first use, reopened after a
   * failure); one outcome per step, in order. A broken stream or a missed deadline fails the call as unavailable.
   */
  stepBatch(steps: WireStepRequest[], timeoutMs: number): Promise<WireStepOutcome[]> {
    let stream: StepStreamState;
    try {
      stream = this.stream ?? this.openStream();
    } catch (e) {
      return Promise.reject(this.closedError(e));
    }
    const callId = this.nextCallId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        stream.waiting.delete(callId);
        reject(new StrataError('stage_unavailable', `stage ${this.address}: no answer to a step batch within ${timeoutMs} ms`, 'unavailable'));
      }, timeoutMs);
      stream.waiting.set(callId, {
        resolve: (reply) => {
          clearTimeout(timer);
          if (reply.error?.code) return reject(fromErrorRecord(reply.error));
          if (reply.outcomes?.length !== steps.length) {
            return reject(new StrataError('stage_error', `stage ${this.address} answered ${reply.outcomes?.length ?? 0} outcomes for ${steps.length} steps`, 'internal'));
          }
          resolve(reply.outcomes);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      stream.call.write({ call_id: callId, steps });
    });
  }

  /** Subscribes to the replies (and pass-on errors) this stage sends straight to `subscriber`. */
  results(subscriber: string): grpc.ClientReadableStream<WireResultsMessage> {
    return this.client.Results({ subscriber });
  }

  /** The Results stream as a StageLink subscription: a break or a close by the peer ends it as unavailable. */
  subscribe(subscriber: string, on: ResultsHandlers): Subscription {
    const call = this.results(subscriber);
    call.on('data', (m: WireResultsMessage) => on.message(m));
    const fail = (e?: grpc.ServiceError) => on.ended(streamEnded(e, this.address, 'results'));
    call.on('error', fail);
    call.on('end', () => fail());
    return { cancel: () => call.cancel() };
  }

  private openStream(): StepStreamState {
    const call = this.client.StepStream();
    const state: StepStreamState = { call, waiting: new Map() };
    call.on('data', (reply: WireStepBatchReply) => {
      const w = state.waiting.get(Number(reply.call_id));
      state.waiting.delete(Number(reply.call_id));
      w?.resolve(reply);
    });
    const fail = (e?: grpc.ServiceError) => {
      if (this.stream === state) this.stream = null;
      const err = streamEnded(e, this.address, 'step');
      for (const w of state.waiting.values()) w.reject(err);
      state.waiting.clear();
    };
    call.on('error', fail);
    call.on('end', () => fail());
    this.stream = state;
    return state;
  }

  /** Sends a tensor that the worker validates and drops: the transport cost of one hop. */
  ping(payload: WireTensor, timeoutMs = 60_000): Promise<{ bytes: number }> {
    return this.unary('Ping', { payload }, timeoutMs);
  }

  endSession(sessionId: string, timeoutMs = 5_000): Promise<void> {
    return this.unary('EndSession', { session_id: sessionId }, timeoutMs);
  }

  /** grpc.health.v1 Check: 'SERVING' | 'NOT_SERVING' | 'UNKNOWN'; rejects when unreachable. */
  checkHealth(timeoutMs = 2_000): Promise<string> {
    return new Promise((resolve, reject) => {
      this.health.Check({ service: '' }, { deadline: Date.now() + timeoutMs }, (err, res) => {
        if (err) reject(fromServiceError(err, this.address));
        else resolve(typeof res.status === 'number' ? ['UNKNOWN', 'SERVING', 'NOT_SERVING'][res.status] ?? 'UNKNOWN' : res.status);
      });
    });
  }

  close(): void {
    this.stream?.call.cancel();
    this.client.close();
  }
}
