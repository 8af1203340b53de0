import { fromErrorRecord, StrataError } from '../model/errors.ts';
import type { WireStepReply } from '../proto/messages.ts';
import type { StageLink, Subscription } from '../transport/link.ts';

/**
 * The coordinator's Results streams, one per stage: replies of steps sent with reply_to = `subscriber` come here
 * straight from the last stage instead of back through every stage (ARCHITECTURE.md's data flow), and a stage that
 * passed a step on delivers here the error the stages after it answered. A reply is expected (`expect`) before its
 * step is sent, so a reply nobody waits for is stale (its step was given up) and is dropped. It is ready once every
 * stage confirmed the subscription; when any stream breaks, every expected reply fails as unavailable (its step may
 * have been passing through that stage), which the pipeline recovers from.
 */
export class ResultsSubscription {
  ready = false;
  closed = false;
  private readonly subscriptions: Subscription[];
  private readonly confirmed = new Set<number>();
  private readonly waiting = new Map<string, { resolve: (r: WireStepReply) => void; reject: (e: unknown) => void }>();

  constructor(
    clients: StageLink[],
    readonly subscriber: string,
  ) {
    this.subscriptions = clients.map((client, i) =>
      client.subscribe(subscriber, {
        message: (m) => {
          if (m.ready) {
            this.confirmed.add(i);
            this.ready = !this.closed && this.confirmed.size === clients.length;
          }
          for (const { session_id, reply, error } of m.replies ?? []) {
            const w = this.waiting.get(session_id);
            this.waiting.delete(session_id);
            if (error?.code) w?.reject(fromErrorRecord(error));
            else if (reply) w?.resolve(reply);
            else w?.reject(new StrataError('stage_error', `stage ${client.address} delivered neither a reply nor an error`, 'internal'));
          }
        },
        ended: (err) => {
          this.ready = false;
          this.closed = true;
          for (const w of this.waiting.values()) w.reject(err);
          this.waiting.clear();
        },
      }),
    );
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
    for (const s of this.subscriptions) s.cancel();
  }
}

/**
 * The coordinator's current ResultsSubscription: a new one whenever the pipeline is reconfigured, and one renewed
 * when it broke (the last stage restarted, say). Null while there is none: the chain then carries the replies.
 */
export class ResultsRoute {
  private results: ResultsSubscription | null = null;

  constructor(readonly subscriber: string) {}

  /** (Re)subscribes to every stage's Results; until all confirm, decode replies come back through the chain. */
  renew(links: StageLink[]): void {
    this.results?.close();
    try {
      this.results = new ResultsSubscription(links, this.subscriber);
    } catch {
      this.results = null; // a link closed meanwhile: the chain carries the replies
    }
  }

  /** The subscription for the next decode group: a broken one is renewed first. */
  current(links: StageLink[]): ResultsSubscription | null {
    if (this.results?.closed && links.length) this.renew(links);
    return this.results;
  }

  close(): void {
    this.results?.close();
  }
}
