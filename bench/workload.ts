import { performance } from 'node:perf_hooks';
import { generate, type PipelineStep, type StepResult, type Stepper } from '../model/generation.ts';
import { createRng } from '../model/sampling.ts';
import { summarize, type Summary } from './stats.ts';

/** Unix time in ms with sub-ms resolution: the clock the workers stamp their ORT runs with. */
export const nowUnixMs = (): number => performance.timeOrigin + performance.now();

export interface WorkloadOptions {
  /** Requests in flight at once (all start together). */
  concurrency: number;
  promptTokens: number;
  newTokens: number;
  vocab: number;
  seed?: number;
  /** Called after every generated token (progress displays). */
  onToken?: () => void;
}

export interface RequestSample {
  startMs: number;
  /** Unix ms at which each generated token was chosen (onToken). */
  tokenTimes: number[];
  endMs: number;
}

/** The shape of every step the coordinator sent: hidden states of B×T×D floats cross each hop for it. */
export interface StepShape {
  batch: number;
  seq: number;
}

export interface WorkloadResult {
  concurrency: number;
  promptTokens: number;
  newTokens: number;
  startMs: number;
  endMs: number;
  wallMs: number;
  generatedTokens: number;
  /** Every generated token / wall time (prefill included). */
  tokensPerSec: number;
  /** Aggregate decode rate: tokens chosen while every request was decoding / that window (see decodeRate). */
  decodeTokensPerSec: number;
  ttftMs: Summary;
  /** Inter-token latency: gaps between consecutive tokens of the same request, all requests pooled. */
  itlMs: Summary;
  requests: RequestSample[];
  steps: StepShape[];
}

/** Wraps a Stepper to record the [B, T] of every step (for bytes-per-hop accounting). */
export class RecordingStepper implements Stepper {
  readonly steps: StepShape[] = [];
  constructor(private readonly inner: Stepper) {}
  get decodeSteps(): number | undefined {
    return this.inner.decodeSteps;
  }
  step(sessionId: string, input: PipelineStep): Promise<StepResult> {
    const [batch, seq] = input.positionIds.dims;
    this.steps.push({ batch, seq });
    return this.inner.step(sessionId, input);
  }
  end(sessionId: string): Promise<void> {
    return this.inner.end(sessionId);
  }
}

export function randomPrompt(rand: () => number, tokens: number, vocab: number): number[] {
  return Array.from({ length: tokens }, () => Math.floor(rand() * vocab));
}

/**
 * Aggregate decode tokens/s over the window in which every request is past its first token and none has finished
 * (steady state: all N sessions decoding). Falls back to all decode tokens over first-to-last token when that
 * window is empty (e.g. very different request lengths).
 */
export function decodeRate(requests: readonly { tokenTimes: readonly number[] }[]): number {
  const live = requests.filter((r) => r.tokenTimes.length > 0);
  if (live.length === 0) return NaN;
  const from = Math.max(...live.map((r) => r.tokenTimes[0]));
  const to = Math.min(...live.map((r) => r.tokenTimes[r.tokenTimes.length - 1]));
  let count = 0;
  for (const r of live) for (const t of r.tokenTimes) if (t > from && t <= to) count++;
  if (to > from && count > 0) return (count * 1000) / (to - from);
  const decodeTokens = live.reduce((n, r) => n + r.tokenTimes.length - 1, 0);
  const span = Math.max(...live.map((r) => r.tokenTimes[r.tokenTimes.length - 1])) - Math.min(...live.map((r) => r.tokenTimes[0]));
  return span > 0 ? (decodeTokens * 1000) / span : NaN;
}

/** N concurrent greedy generate requests with random prompts; EOS ignored so every request emits newTokens. */
export async function runWorkload(stepper: Stepper, o: WorkloadOptions): Promise<WorkloadResult> {
  const rand = createRng(o.seed ?? 1); // the same seed gives the same workload in every run
  const prompts = Array.from({ length: o.concurrency }, () => randomPrompt(rand, o.promptTokens, o.vocab));
  const recorder = new RecordingStepper(stepper);
  const startMs = nowUnixMs();
  const requests = await Promise.all(
    prompts.map(async (prompt) => {
      const sample: RequestSample = { startMs: nowUnixMs(), tokenTimes: [], endMs: 0 };
      await generate(recorder, prompt, {
        maxNewTokens: o.newTokens, eosTokenId: null, sampling: { temperature: 0, seed: 0 },
        onToken: () => {
          sample.tokenTimes.push(nowUnixMs());
          o.onToken?.();
        },
      });
      sample.endMs = nowUnixMs();
      return sample;
    }),
  );
  const endMs = nowUnixMs();
  const wallMs = endMs - startMs;
  const generatedTokens = requests.reduce((n, r) => n + r.tokenTimes.length, 0);
  const itl: number[] = [];
  for (const r of requests) for (let i = 1; i < r.tokenTimes.length; i++) itl.push(r.tokenTimes[i] - r.tokenTimes[i - 1]);
  return {
    concurrency: o.concurrency, promptTokens: o.promptTokens, newTokens: o.newTokens, startMs, endMs, wallMs, generatedTokens,
    tokensPerSec: (generatedTokens * 1000) / wallMs,
    decodeTokensPerSec: decodeRate(requests),
    ttftMs: summarize(requests.filter((r) => r.tokenTimes.length).map((r) => r.tokenTimes[0] - r.startMs)),
    itlMs: summarize(itl),
    requests,
    steps: recorder.steps,
  };
}

/** Untimed requests first: ORT's first runs at a shape allocate, caches warm, HTTP/2 windows grow. */
export async function warmUp(stepper: Stepper, o: Pick<WorkloadOptions, 'concurrency' | 'promptTokens' | 'vocab'> & { newTokens?: number }): Promise<void> {
  await runWorkload(stepper, { ...o, newTokens: o.newTokens ?? 4, seed: 987654321 });
}
