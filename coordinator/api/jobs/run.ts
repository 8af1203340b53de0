import { randomInt } from 'node:crypto';
import { StrataError } from '../../../model/errors.ts';
import { fillMask, generate } from '../../../model/generation.ts';
import type { RowLogprobs } from '../../../model/logprobs.ts';
import { stopSequenceHit } from '../../../model/sampling.ts';
import type {
  FillMaskCandidateBody, FillMaskResultBody, GenerateChoice, GenerateResultBody, JobResult, ModelContext, ResolvedFillMask, ResolvedGenerate,
  ResolvedJob, ServingPipeline, TokenProgress,
} from './types.ts';

/** How a validated job runs against a pipeline (the queue consumer's side of the job contract). */

export interface RunHooks {
  /** Streams a delta; a failure to publish it must not fail the job (the result still carries every token). */
  progress?: (p: TokenProgress) => Promise<unknown> | unknown;
  /** Publish at most this often per choice (the first token always at once). Default 20 ms. */
  progressIntervalMs?: number;
  /**
   * Seed for choices whose request gave none. The consumer derives it from the job id, so a retried attempt
   * draws the same tokens as the first (a stream that already showed some stays consistent).
   */
  defaultSeed?: number;
  /** A token was chosen (for TTFT / inter-token metrics). */
  onToken?: (choice: number, at: number) => void;
  /** Which run of the job this is (1 = first); deltas of a later run carry it and mark their restart. */
  attempt?: number;
}

/** Runs a validated job against the pipeline. */
export async function runJob(req: ResolvedJob, pipeline: ServingPipeline, ctx: ModelContext, hooks: RunHooks = {}): Promise<JobResult> {
  if (req.kind === 'generate') return runGenerate(req, pipeline, ctx, hooks);
  if (req.kind === 'fill-mask') return runFillMask(req, pipeline, ctx);
  if (!pipeline.embed) throw new StrataError('not_implemented', 'this pipeline does not compute embeddings yet', 'failed_precondition');
  const data = await Promise.all(req.inputs.map(async (ids) => Array.from(await pipeline.embed!(ids))));
  const tokens = req.inputs.reduce((s, ids) => s + ids.length, 0);
  return { kind: 'embed', data, usage: { prompt_tokens: tokens, total_tokens: tokens } };
}

async function runGenerate(req: ResolvedGenerate, pipeline: ServingPipeline, ctx: ModelContext, hooks: RunHooks): Promise<GenerateResultBody> {
  const { spec, tokenizer } = ctx;
  const eos = req.ignoreEos ? null : (tokenizer?.eosTokenId ?? spec.eosTokenId);
  const maxStop = Math.max(0, ...req.stop.map((s) => s.length));
  const interval = hooks.progressIntervalMs ?? 20;
  const pending: Promise<unknown>[] = [];
  const scorePrompt = req.echo && req.logprobs !== undefined;

  // Every prompt's n choices run at once: their steps interleave in the pipeline like separate requests.
  const choices = await Promise.all(Array.from({ length: req.prompts.length * req.n }, async (_, index): Promise<GenerateChoice> => {
    const promptIndex = Math.floor(index / req.n);
    const promptIds = req.prompts[promptIndex];
    const seed = (req.sampling.seed ?? hooks.defaultSeed ?? randomInt(2 ** 32)) + index;
    const ids: number[] = [];
    const lps: RowLogprobs[] = [];
    let promptLps: (RowLogprobs | null)[] | undefined;
    let text = '';
    let cut: number | null = null; // where a stop string starts in `text`
    let sentTokens = 0;
    let sentText = 0;
    let lastSent = 0;
    let checked = 0; // text length already searched for stop strings

    // Text that can no longer change: a tail that may still become a stop string is held back, and so is a
    // trailing U+FFFD (an incomplete UTF-8 sequence the next token completes).
    const stableText = (final: boolean) => {
      if (cut !== null) return text.slice(0, cut);
      if (final) return text;
      let end = Math.max(0, text.length - Math.max(0, maxStop - 1));
      while (end > 0 && text[end - 1] === '\uFFFD') end--;
      return text.slice(0, end);
    };
    const publish = (final: boolean) => {
      if (!hooks.progress) return;
      const visible = stableText(final);
      if (ids.length === sentTokens && visible.length <= sentText) return;
      const delta: TokenProgress = { index, offset: sentTokens, tokens: ids.slice(sentTokens), text_offset: sentText, text: visible.slice(sentText) };
      if (req.logprobs !== undefined) delta.logprobs = lps.slice(sentTokens);
      if (promptLps && sentTokens === 0) delta.prompt_logprobs = promptLps;
      if (hooks.attempt !== undefined) {
        delta.attempt = hooks.attempt;
        if (hooks.attempt > 1 && sentTokens === 0 && sentText === 0) delta.restart = true;
      }
      sentTokens = ids.length;
      sentText = Math.max(sentText, visible.length);
      lastSent = Date.now();
      pending.push(Promise.resolve().then(() => hooks.progress!(delta)).catch(() => {}));
    };

    const out = await generate(pipeline, promptIds, {
      maxNewTokens: req.maxTokens, eosTokenId: eos, maxPositions: spec.maxPositions, sampling: { ...req.sampling, seed },
      logprobs: req.logprobs, promptLogprobs: scorePrompt,
      onPromptLogprobs: (p) => (promptLps = p),
      onToken: (id, _i, lp) => {
        const now = Date.now();
        hooks.onToken?.(index, now);
        ids.push(id);
        if (lp) lps.push(lp);
        let stop = req.stopTokenIds.includes(id);
        if (tokenizer) {
          text = tokenizer.decode(ids, { skipSpecialTokens: true });
          if (maxStop > 0) {
            // A new match must end in the new text: only the tail needs searching.
            const from = Math.max(0, checked - maxStop + 1);
            checked = text.length;
            const hit = stopSequenceHit(text.slice(from), req.stop);
            if (hit) {
              cut = from + hit.index;
              stop = true;
            }
          }
        }
        if (!stop && (sentTokens === 0 || now - lastSent >= interval)) publish(false);
        return !stop;
      },
    });
    publish(true);
    return {
      index, token_ids: out.outputIds, ...(tokenizer ? { text: stableText(true) } : {}), finish_reason: out.finishReason,
      ...(req.prompts.length > 1 ? { prompt_index: promptIndex } : {}),
      ...(req.logprobs !== undefined ? { logprobs: { tokens: out.tokenLogprobs ?? [], ...(out.promptLogprobs ? { prompt: out.promptLogprobs } : {}) } } : {}),
    };
  }));
  // Progress events go out before the job completes, so a stream reader sees every delta before the result.
  await Promise.all(pending);
  const completion = choices.reduce((s, c) => s + c.token_ids.length, 0);
  const prompt = req.prompts.reduce((s, p) => s + p.length, 0);
  return {
    kind: 'generate', prompt_ids: req.prompts[0], ...(req.prompts.length > 1 ? { prompts: req.prompts } : {}), choices,
    usage: { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion },
  };
}

async function runFillMask(req: ResolvedFillMask, pipeline: ServingPipeline, ctx: ModelContext): Promise<FillMaskResultBody> {
  const top = await fillMask(pipeline, req.ids, req.maskIndex, req.topK);
  const tok = ctx.tokenizer;
  const candidates = top.map(({ id, score }): FillMaskCandidateBody => {
    if (!tok) return { token: id, score };
    // As HF's fill-mask pipeline: token_str is the decoded candidate, sequence the decoded input with it filled in.
    const filled = req.ids.map((t, i) => (i === req.maskIndex ? id : t));
    return { token: id, score, token_str: tok.decode([id]), sequence: tok.decode(filled, { skipSpecialTokens: true }) };
  });
  return { kind: 'fill-mask', input_ids: req.ids, mask_index: req.maskIndex, candidates };
}
