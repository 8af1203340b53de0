import type { StrataError } from '../model/errors.ts';
import type {
  WireConfigureRequest, WireIdentityReply, WireInfo, WireResultsMessage, WireStepOutcome, WireStepReply, WireStepRequest,
} from '../proto/messages.ts';
import type { WireIdentity, WireTensor } from '../proto/wire.ts';

/**
 * The seam between the stage protocol and the transport that carries it. The coordinator talks to "a stage" and a
 * worker to "the next stage" through a StageLink; a worker answers through a StageServer that calls its
 * StageHandler. A transport (transport/grpc/) implements both sides and has one entry in transport/registry.ts.
 * Messages are proto/messages.ts shapes whatever the transport; failures are StrataErrors, a peer that cannot be
 * reached or went away `unavailable` (the coordinator recovers from those).
 */

/** A transport's client-side security material (mTLS channel credentials for gRPC); opaque outside the transport. */
export type ClientSecurity = object;
/** A transport's server-side security material; opaque outside the transport. */
export type ServerSecurity = object;

/** grpc.health.v1's answers. */
export type HealthStatus = 'SERVING' | 'NOT_SERVING' | 'UNKNOWN' | (string & {});

/** The client side of one stage. */
export interface StageLink {
  readonly address: string;
  info(timeoutMs?: number): Promise<WireInfo>;
  configure(req: WireConfigureRequest, timeoutMs?: number): Promise<WireIdentityReply>;
  handshake(peer: WireIdentity, timeoutMs?: number): Promise<WireIdentityReply>;
  step(req: WireStepRequest, timeoutMs: number): Promise<WireStepReply>;
  /** Several sessions' steps in one message; one outcome per step, in order. */
  stepBatch(steps: WireStepRequest[], timeoutMs: number): Promise<WireStepOutcome[]>;
  /**
   * Subscribes to the replies (and pass-on errors) this stage sends straight to `subscriber`. Throws when the link
   * is closed; `ended` is called (possibly more than once) when the subscription breaks or is cancelled.
   */
  subscribe(subscriber: string, on: ResultsHandlers): Subscription;
  endSession(sessionId: string, timeoutMs?: number): Promise<void>;
  /** Rejects when the stage is unreachable. */
  checkHealth(timeoutMs?: number): Promise<HealthStatus>;
  /** Sends a tensor the stage validates and drops: the transport cost of one hop. */
  ping(payload: WireTensor, timeoutMs?: number): Promise<{ bytes: number }>;
  close(): void;
}

export interface ResultsHandlers {
  message(m: WireResultsMessage): void;
  ended(why: StrataError): void;
}

export interface Subscription {
  cancel(): void;
}

/** What a stage answers, transport-free: the worker implements it, a StageServer serves it. */
export interface StageHandler {
  info(): Promise<WireInfo>;
  configure(req: WireConfigureRequest): Promise<WireIdentityReply>;
  handshake(req: { peer: WireIdentity }): Promise<WireIdentityReply>;
  step(req: WireStepRequest): Promise<WireStepReply>;
  stepBatch(req: { steps?: WireStepRequest[] }): Promise<{ outcomes: WireStepOutcome[] }>;
  /** A coordinator subscribes to the replies of steps naming it in reply_to; throws a StrataError to refuse. */
  subscribe(subscriber: string, sink: ResultsSink): void;
  endSession(req: { session_id: string }): Promise<object>;
  ping(req: { payload?: WireTensor | null }): Promise<{ bytes: number }>;
}

/** The server end of one Results subscription. */
export interface ResultsSink {
  /** False once the subscriber went away: what is sent then is lost (its coordinator failed those steps). */
  readonly open: boolean;
  send(m: WireResultsMessage): void;
  end(): void;
  /** Called once the subscriber cancels or the stream closes. */
  onClosed(fn: () => void): void;
}

/** The server side of one stage: serves a StageHandler and the health status. */
export interface StageServer {
  /** Binds `listen` (port 0 = any free port); resolves with the address peers reach it at. */
  listen(listen: string): Promise<string>;
  /** Health: NOT_SERVING until a block range is loaded and the next stage connected. */
  setServing(serving: boolean): void;
  /** Stops serving: ends open streams and subscriptions, then waits for calls in flight. */
  close(): Promise<void>;
}

/** One transport: how to reach a stage, and how to serve one. */
export interface Transport {
  connect(address: string, security?: ClientSecurity): StageLink;
  serve(handler: StageHandler, security?: ServerSecurity): StageServer;
}
