import { nextDecodeStep, type PipelineStep, type StepResult } from '../model/generation.ts';
import type { TensorData } from '../model/tensor.ts';

/** What run-ahead did since the stage was configured (InfoReply.run_ahead). */
export interface RunAheadCounts {
  /** Steps run ahead. */
  ran: number;
  /** Of those, answered when their requests arrived. */
  claimed: number;
  /** Undone: the request that arrived was another step (the cache rewound). */
  undone: number;
  /** Thrown away unclaimed: the session ended (or was dropped) first. Wasted runs. */
  unclaimed: number;
}

/**
 * Run-ahead decoding for a stage that is both first and last (a one-stage pipeline). Once such a stage has chosen a
 * session's next token it knows that session's next decode step: the token, one position on, the same sampling at the
 * next step index, which is exactly what generate() (model/generation.ts) sends next. While nothing else waits, the
 * stage runs that step before it is asked, so the round trip to the coordinator and back (about 3 ms a token at
 * batch 1 on loopback: two gRPC hops and two thread hops) overlaps the next token's compute instead of adding to it.
 *
 * The step that then arrives is compared with the prediction, field by field. Equal, it is answered from the run
 * already done. Different (the session stopped, or its client changed something), that session's cache is rewound one
 * position, which is all a rewind takes: the K/V written there is overwritten by the next real step, and attention
 * reads only a session's own length. Answers are the same either way: a run ahead is the same run on the same inputs.
 * The coordinator's hints (StepRequest.stop_tokens, final_request) say where a generation ends, so nothing is run
 * ahead past it; `strata worker --run-ahead off` turns it off.
 */
export class RunAhead<Done extends { result: StepResult }> {
  readonly counts: RunAheadCounts = { ran: 0, claimed: 0, undone: 0, unclaimed: 0 };
  /** Per session: the step predicted from its last answer, not yet run. */
  private readonly predicted = new Map<string, PipelineStep>();
  /** Per session: a step run ahead, and the result it waits to be claimed with. */
  private readonly ran = new Map<string, { input: PipelineStep; done: Done }>();

  constructor(
    /** Undoes a run ahead: the session's cache goes back to `past` positions. */
    private readonly rewind: (sessionId: string, past: number) => void,
    private readonly maxPositions: number,
  ) {}

  /**
   * A step was answered: predict the session's next one (when it chose one token for one row), unless `more` says no
   * request follows (the coordinator's hints: a stop token was chosen, or the request was the generation's last).
   */
  answered(sessionId: string, input: PipelineStep, result: StepResult, more = true): void {
    const next = more && result.tokens?.length === 1 ? nextDecodeStep(input, result.tokens[0], this.maxPositions) : null;
    if (next) this.predicted.set(sessionId, next);
    else this.predicted.delete(sessionId);
  }

  /** Up to `max` predicted steps to run now (the stage is idle), of sessions whose caches are where the steps expect. */
  take(max: number, cachedLength: (sessionId: string) => number | undefined): { sessionId: string; input: PipelineStep }[] {
    const steps: { sessionId: string; input: PipelineStep }[] = [];
    for (const [sessionId, input] of this.predicted) {
      if (steps.length === max) break;
      this.predicted.delete(sessionId);
      if (cachedLength(sessionId) === pastLength(input)) steps.push({ sessionId, input });
    }
    return steps;
  }

  /** The runs ahead finished: their results wait for the steps they predicted. */
  store(steps: { sessionId: string; input: PipelineStep }[], done: Done[]): void {
    steps.forEach((s, i) => this.ran.set(s.sessionId, { input: s.input, done: done[i] }));
    this.counts.ran += steps.length;
  }

  /**
   * The session's step arrived: its result when it was run ahead on exactly these inputs (`valid` checks the session
   * still holds its cache at the length the run left), else null, with any run ahead for the session undone.
   */
  claim(sessionId: string, input: PipelineStep, valid: (past: number) => boolean): Done | null {
    this.predicted.delete(sessionId);
    const r = this.ran.get(sessionId);
    if (!r) return null;
    this.ran.delete(sessionId);
    const past = pastLength(r.input);
    if (sameStep(r.input, input) && valid(past + 1)) {
      this.counts.claimed++;
      return r.done;
    }
    this.counts.undone++;
    this.rewind(sessionId, past);
    return null;
  }

  /** The session ended (or its cache was dropped): nothing of it is kept. */
  forget(sessionId: string): void {
    this.predicted.delete(sessionId);
    if (this.ran.delete(sessionId)) this.counts.unclaimed++;
  }
}

/** Positions a step's session has cached before it: what its attention mask spans beyond the step's own tokens. */
export const pastLength = (input: PipelineStep): number => input.attentionMask.dims[1] - input.positionIds.dims[1];

const sameTensor = (a: TensorData | undefined, b: TensorData | undefined): boolean => {
  if (!a || !b) return !a && !b;
  if (a.dtype !== b.dtype || a.dims.length !== b.dims.length || a.dims.some((d, i) => d !== b.dims[i])) return false;
  const x = a.data;
  const y = b.data;
  if (x.length !== y.length) return false;
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
  return true;
};

const sameJson = (a: unknown, b: unknown) => JSON.stringify(a ?? null) === JSON.stringify(b ?? null);

/** Whether two steps ask for the same computation (every field a stage reads; absent and default are the same). */
export function sameStep(a: PipelineStep, b: PipelineStep): boolean {
  const sampling = (s: NonNullable<PipelineStep['select']>['sampling']) => [s.temperature || 0, s.topK || 0, s.topP || 0, s.repetitionPenalty || 0, s.seed ?? 0];
  const select = (s: PipelineStep['select']) => s && { sampling: sampling(s.sampling), history: s.history, step: s.step };
  return (
    sameTensor(a.inputIds, b.inputIds) && sameTensor(a.positionIds, b.positionIds) && sameTensor(a.attentionMask, b.attentionMask) &&
    sameTensor(a.logitPositions, b.logitPositions) && !a.hidden && !b.hidden &&
    (a.output ?? 'tokens_or_logits') === (b.output ?? 'tokens_or_logits') && sameJson(select(a.select), select(b.select)) && sameJson(a.logprobs, b.logprobs)
  );
}
