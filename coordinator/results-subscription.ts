import type * as grpc from '@grpc/grpc-js';
import type { StageClient, WireResultsMessage, WireStepReply } from '../proto/client.ts';
import { streamEnded } from '../proto/wire.ts';

/**
 * The coordinator's Results stream from the last stage: replies of steps sent with reply_to = `subscriber` come
 * here straight from stage K-1 instead of back through every stage (ARCHITECTURE.md's data flow). A reply is
 * expected (`expect`) before its step is sent, so a reply nobody waits for is stale (its step was given up) and is
 * dropped. When the stream breaks, every expected reply fails as unavailable, which the pipeline recovers from.
 */
export class ResultsSubscription {
  ready = false;
  closed = false;
  private readonly call: grpc.ClientReadableStream<WireResultsMessage>;
  private readonly waiting = new Map<string, { resolve: (r: WireStepReply) => void; reject: (e: unknown) => void }>();

  constructor(
    client: StageClient,
    readonly subscriber: string,
  ) {
    this.call = client.results(subscriber);
    this.call.on('data', (m: WireResultsMessage) => {
      if (m.ready) this.ready = true;
      for (const { session_id, reply } of m.replies ?? []) {
        const w = this.waiting.get(session_id);
        this.waiting.delete(session_id);
        w?.resolve(reply);
      }
    });
    const fail = (e?: grpc.ServiceError) => {
      this.ready = false;
      this.closed = true;
      const err = streamEnded(e, client.address, 'results');
      for (const w of this.waiting.values()) w.reject(err);
      this.waiting.clear();
    };
    this.call.on('error', fail);
    this.call.on('end', () => fail());
  }

  /** The reply to the step of `wireId` that is about to be sent. */
  expect(wireId: string): Promise<WireStepReply> {
    return new Promise((resolve, reject) => this.waiting.set(wireId, { resolve, reject }));
  }

  /** The step will not be answered here (the chain answered it, or failed). */
  cancel(wireId: string): void {
    this.waiting.delete(wireId);
  }

  close(): void {
    this.call.cancel();
  }
}
