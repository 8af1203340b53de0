import type { ModelSpec } from '../model/config.ts';
import type { PipelineStep, StepResult } from '../model/generation.ts';
import type { WireStepReply, WireTiming } from '../proto/messages.ts';
import { resultFromWire, stepToWire } from '../proto/step-codec.ts';
import type { StageLink } from '../transport/link.ts';
import { DecodeScheduler } from './decode-scheduler.ts';
import type { ResultsSubscription } from './results-subscription.ts';

export interface StepRouterOptions {
  spec: ModelSpec;
  fingerprint: string;
  stepTimeoutMs: number;
  /** The current stages (stage 0 takes every step). */
  links(): StageLink[];
  /** The Results subscription to use now, renewed when broken; null while there is none. */
  subscription(): ResultsSubscription | null;
  /** Called with each stage's ORT run per step (metrics, bench timelines). */
  onTiming?: (stage: number, timing: WireTiming) => void;
}

/**
 * Puts one step of one session on the wire: a decode step (one token on top of the KV cache) leaves with the next
 * decode group (decode-scheduler.ts), any other step (a prefill, an embedding) goes to stage 0 alone. Either way the
 * reply comes back as a StepResult, each stage's timing reported.
 */
export class StepRouter {
  private readonly decodes: DecodeScheduler;

  constructor(private readonly o: StepRouterOptions) {
    this.decodes = new DecodeScheduler({
      fingerprint: o.fingerprint,
      stepTimeoutMs: o.stepTimeoutMs,
      links: o.links,
      subscription: o.subscription,
      received: (reply) => this.received(reply),
    });
  }

  async send(wireId: string, input: PipelineStep): Promise<StepResult> {
    if (this.isDecodeStep(input)) return this.decodes.enqueue(wireId, input);
    const req = stepToWire(wireId, { fingerprint: this.o.fingerprint, first: 0 }, input);
    return this.received(await this.o.links()[0].step(req, this.o.stepTimeoutMs));
  }

  /** Decode results that came straight from the last stage (the rest came back through the chain). */
  get directReplies(): number {
    return this.decodes.directReplies;
  }

  /** The session ended: it no longer counts as decoding. */
  forget(wireId: string): void {
    this.decodes.forget(wireId);
  }

  private received(wire: WireStepReply): StepResult {
    const reply = resultFromWire(wire);
    reply.timings.forEach((t, i) => this.o.onTiming?.(i, t));
    return reply;
  }

  /** One token of one session on top of its KV cache: the steps worth batching across sessions. */
  private isDecodeStep(input: PipelineStep): boolean {
    const [rows, seq] = input.positionIds.dims;
    return this.o.spec.causal && rows === 1 && seq === 1 && input.attentionMask.dims[1] > 1 && input.output !== 'hidden_mean';
  }
}
