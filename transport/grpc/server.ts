import * as grpc from '@grpc/grpc-js';
import { HealthImplementation } from 'grpc-health-check';
import { StrataError, toErrorRecord } from '../../model/errors.ts';
import type { WireResultsMessage, WireStepBatch, WireStepBatchReply } from '../../proto/messages.ts';
import type { ResultsSink, ServerSecurity, StageHandler, StageServer } from '../link.ts';
import { channelOptions, MALFORMED, StageService, type Received } from './service.ts';
import { toServiceError } from './status.ts';

const malformed = (why: string) => new StrataError('request_malformed', `the request is not a valid protobuf message: ${why}`);

/**
 * A StageHandler served as the gRPC Stage service plus grpc.health.v1: protobuf decoding (a message that does not
 * decode is answered INVALID_ARGUMENT), StepStream call ids, Results streams as ResultsSinks, StrataErrors as gRPC
 * statuses. It knows nothing of what a stage does.
 */
export class GrpcStageServer implements StageServer {
  private readonly server = new grpc.Server({ 'grpc.max_receive_message_length': channelOptions['grpc.max_receive_message_length'], 'grpc.max_send_message_length': channelOptions['grpc.max_send_message_length'] });
  private readonly health = new HealthImplementation({ '': 'NOT_SERVING', 'strata.v1.Stage': 'NOT_SERVING' });
  /** Open StepStreams from predecessors: ended on close, or the server would wait for their peers to hang up. */
  private readonly streams = new Set<grpc.ServerDuplexStream<Received<WireStepBatch>, WireStepBatchReply>>();
  /** Open Results streams, ended on close for the same reason. */
  private readonly subscriptions = new Set<grpc.ServerWritableStream<{ subscriber?: string }, WireResultsMessage>>();

  constructor(
    private readonly handler: StageHandler,
    private readonly credentials: grpc.ServerCredentials = grpc.ServerCredentials.createInsecure(),
  ) {
    this.health.addToServer(this.server);
    this.server.addService(StageService, {
      Info: this.unary(() => handler.info()),
      Configure: this.unary((req) => handler.configure(req)),
      Handshake: this.unary((req) => handler.handshake(req)),
      Step: this.unary((req) => handler.step(req)),
      StepStream: (call: grpc.ServerDuplexStream<Received<WireStepBatch>, WireStepBatchReply>) => this.serveStepStream(call),
      Results: (call: grpc.ServerWritableStream<Received<{ subscriber?: string }>, WireResultsMessage>) => this.serveResults(call),
      EndSession: this.unary((req) => handler.endSession(req)),
      Ping: this.unary((req) => handler.ping(req)),
    });
  }

  private unary<Req, Res>(fn: (req: Req) => Promise<Res>): grpc.handleUnaryCall<Received<Req>, Res> {
    return (call, callback) => {
      const why = call.request?.[MALFORMED];
      if (why) return callback(toServiceError(malformed(why)) as grpc.ServiceError);
      fn(call.request).then(
        (res) => callback(null, res),
        (e) => callback(toServiceError(e) as grpc.ServiceError),
      );
    };
  }

  async listen(listen: string): Promise<string> {
    const port = await new Promise<number>((resolve, reject) => this.server.bindAsync(listen, this.credentials, (err, p) => (err ? reject(err) : resolve(p))));
    return `${listen.slice(0, listen.lastIndexOf(':'))}:${port}`;
  }

  /** The overall status ('') follows the stage; the Stage service's own, once serving, stays so (as it always has). */
  setServing(serving: boolean): void {
    this.health.setStatus('', serving ? 'SERVING' : 'NOT_SERVING');
    if (serving) this.health.setStatus('strata.v1.Stage', 'SERVING');
  }

  /** A predecessor's (or the coordinator's) StepStream: each message is one step batch, answered under its call_id. */
  private serveStepStream(call: grpc.ServerDuplexStream<Received<WireStepBatch>, WireStepBatchReply>): void {
    this.streams.add(call);
    call.on('close', () => this.streams.delete(call));
    call.on('data', (req: Received<WireStepBatch>) => {
      const callId = Number(req?.call_id ?? 0);
      const answer = (reply: Omit<WireStepBatchReply, 'call_id'>) => {
        if (!call.destroyed && call.writable) call.write({ call_id: callId, ...reply });
      };
      const why = req?.[MALFORMED];
      if (why) return answer({ outcomes: [], error: toErrorRecord(malformed(why)) });
      this.handler.stepBatch(req).then(answer, (e) => answer({ outcomes: [], error: toErrorRecord(e) }));
    });
    call.on('end', () => call.end());
    call.on('error', () => {}); // the peer went away: its calls are its business
  }

  private serveResults(call: grpc.ServerWritableStream<Received<{ subscriber?: string }>, WireResultsMessage>): void {
    const closed: (() => void)[] = [];
    const sink: ResultsSink = {
      get open() {
        return call.writable;
      },
      send: (m) => call.write(m),
      end: () => call.end(),
      onClosed: (fn) => closed.push(fn),
    };
    const forget = () => {
      this.subscriptions.delete(call);
      closed.forEach((fn) => fn());
    };
    try {
      this.handler.subscribe(String(call.request?.subscriber ?? ''), sink);
    } catch (e) {
      call.destroy(toServiceError(e) as grpc.ServiceError);
      return;
    }
    this.subscriptions.add(call);
    call.on('cancelled', forget);
    call.on('close', forget);
    call.on('error', forget);
  }

  async close(): Promise<void> {
    this.health.setStatus('', 'NOT_SERVING');
    for (const call of this.streams) call.end();
    for (const call of this.subscriptions) if (call.writable) call.end(); // a replaced one was ended already
    await new Promise<void>((resolve) => this.server.tryShutdown(() => resolve()));
  }
}
