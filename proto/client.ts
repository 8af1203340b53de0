import * as grpc from '@grpc/grpc-js';
import { service as healthService } from 'grpc-health-check';
import { fromErrorRecord, StrataError, type ErrorRecord } from '../model/errors.ts';
import { channelOptions, fromServiceError, StageClientCtor, streamEnded, type WireIdentity, type WireTensor } from './wire.ts';

export interface WireStepRequest {
  session_id: string;
  fingerprint: string;
  first: number;
  input_ids?: WireTensor | null;
  hidden?: WireTensor | null;
  position_ids: WireTensor;
  attention_mask: WireTensor;
  logit_positions?: WireTensor | null;
  select?: {
    sampling: { temperature: number; top_k: number; top_p: number; repetition_penalty: number; seed: number };
    history: { ids: number[] }[];
    step: number;
  } | null;
  output?: 'TOKENS_OR_LOGITS' | 'HIDDEN_MEAN';
  reply_to?: string;
  timings?: WireTiming[];
}

export interface WireStepReply {
  logits?: WireTensor | null;
  tokens: number[];
  hidden_mean?: WireTensor | null;
  timings: WireTiming[];
  delivered?: boolean;
}

export interface WireResultsMessage {
  ready: boolean;
  replies: { session_id: string; reply?: WireStepReply | null; error?: WireStepError | null }[];
}

export type WireStepError = ErrorRecord;

/** One item of a StepBatch reply: `reply` when the step succeeded, else `error`. */
export interface WireStepOutcome {
  reply?: WireStepReply | null;
  error?: WireStepError | null;
}

export interface WireStepBatchReply {
  call_id: number;
  outcomes: WireStepOutcome[];
  error?: WireStepError | null;
}

interface StepStreamState {
  call: grpc.ClientDuplexStream<unknown, WireStepBatchReply>;
  /** Calls sent on this stream and not answered yet, by call_id. */
  waiting: Map<number, { resolve: (r: WireStepBatchReply) => void; reject: (e: unknown) => void }>;
}

export interface WireTiming {
  first: number;
  last: number;
  run_ms: number;
  start_unix_ms: number;
  batch: number;
  pid: number;
}

export interface WireInfo {
  identity: WireIdentity;
  configured: boolean;
  next_address: string;
  pid: number;
  device: string;
  memory_bytes: number;
  speed: number;
  sessions: number;
  kv_bytes: number;
}

const HealthClient = grpc.makeGenericClientConstructor(healthService as grpc.ServiceDefinition, 'Health');

/** Promise-returning client of one worker's Stage service (and its grpc.health.v1 status). */
export class StageClient {
  private readonly client: grpc.Client & Record<string, Function>;
  private readonly health: grpc.Client & Record<string, Function>;
  private stream: StepStreamState | null = null;
  private nextCallId = 1;

  constructor(
    readonly address: string,
    credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure(),
  ) {
    this.client = new StageClientCtor(address, credentials, channelOptions) as never;
    // Share the channel: one HTTP/2 connection per stage pair.
    this.health = new HealthClient(address, credentials, { channelOverride: this.client.getChannel() }) as never;
  }

  private unary<Req, Res>(method: string, req: Req, timeoutMs: number): Promise<Res> {
    return new Promise((resolve, reject) => {
      try {
        this.client[method](req, { deadline: Date.now() + timeoutMs }, (err: grpc.ServiceError | null, res: Res) => {
          if (err) reject(fromServiceError(err, this.address));
          else resolve(res);
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

  configure(req: { first: number; last: number; dtype: string; next_address: string; fingerprint: string }, timeoutMs = 30 * 60_000): Promise<{ identity: WireIdentity }> {
    return this.unary('Configure', req, timeoutMs);
  }

  handshake(peer: WireIdentity, timeoutMs = 10_000): Promise<{ identity: WireIdentity }> {
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
    return this.client.Results({ subscriber }) as grpc.ClientReadableStream<WireResultsMessage>;
  }

  private openStream(): StepStreamState {
    const call = this.client.StepStream() as grpc.ClientDuplexStream<unknown, WireStepBatchReply>;
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
      this.health.Check({ service: '' }, { deadline: Date.now() + timeoutMs }, (err: grpc.ServiceError | null, res: { status: string | number }) => {
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
