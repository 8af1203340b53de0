import * as grpc from '@grpc/grpc-js';
import { service as healthService } from 'grpc-health-check';
import { channelOptions, fromServiceError, StageClientCtor, type WireIdentity, type WireTensor } from './wire.ts';

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
}

export interface WireStepReply {
  logits?: WireTensor | null;
  tokens: number[];
  hidden_mean?: WireTensor | null;
  timings: WireTiming[];
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
      this.client[method](req, { deadline: Date.now() + timeoutMs }, (err: grpc.ServiceError | null, res: Res) => {
        if (err) reject(fromServiceError(err, this.address));
        else resolve(res);
      });
    });
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
    this.client.close();
  }
}
