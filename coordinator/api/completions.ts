import type { FastifyInstance } from 'fastify';
import type { StrataTokenizer } from '../../model/tokenizer.ts';
import { bad, resolveJob } from './jobs/validate.ts';
import type { GenerateChoice, GenerateJob, GenerateResultBody, ResolvedGenerate } from './jobs/types.ts';
import { JOB_ID_HEADER, type RouteContext } from './context.ts';
import { asObject, rethrow } from './errors.ts';
import { completionLogprobs, concatLogprobs, tokenText, type CompletionLogprobs } from './logprobs.ts';
import { streamJob, type StreamFormat } from './sse.ts';

/** The job that runs exactly what was validated (the consumer validates it again). */
export function generatePayload(r: ResolvedGenerate): GenerateJob {
  return {
    kind: 'generate', prompt_ids: r.prompts.length === 1 ? r.prompts[0] : r.prompts, max_tokens: r.maxTokens, n: r.n,
    temperature: r.sampling.temperature, top_p: r.sampling.topP, top_k: r.sampling.topK, repetition_penalty: r.sampling.repetitionPenalty,
    seed: r.sampling.seed, stop: r.stop, stop_token_ids: r.stopTokenIds, ignore_eos: r.ignoreEos,
    ...(r.logprobs !== undefined ? { logprobs: r.logprobs } : {}), ...(r.echo ? { echo: true } : {}),
  };
}

/** `stream` and `stream_options.include_usage`, checked. */
export function streamFlags(o: Record<string, unknown>): { stream: boolean; includeUsage: boolean } {
  if (o.stream !== undefined && o.stream !== null && typeof o.stream !== 'boolean') throw bad('invalid_field', 'stream must be true or false');
  const so = o.stream_options;
  if (so !== undefined && so !== null && (typeof so !== 'object' || Array.isArray(so))) throw bad('invalid_field', 'stream_options must be an object');
  return { stream: o.stream === true, includeUsage: (so as { include_usage?: unknown } | null | undefined)?.include_usage === true };
}

/** What echo puts before a choice's text: its prompt, decoded. */
const echoed = (r: ResolvedGenerate, tok: StrataTokenizer | null, index: number) => (r.echo && tok ? tok.decode(r.prompts[Math.floor(index / r.n)]) : '');

/** A whole choice's logprobs: with echo the prompt's first (its first token null), then the generated tokens'. */
function choiceLogprobs(r: ResolvedGenerate, tok: StrataTokenizer | null, c: GenerateChoice): CompletionLogprobs | null {
  if (r.logprobs === undefined) return null;
  const prompt = r.prompts[Math.floor(c.index / r.n)];
  const ids = r.echo ? [...prompt, ...c.token_ids] : c.token_ids;
  const rows = r.echo ? [...(c.logprobs?.prompt ?? prompt.map(() => null)), ...(c.logprobs?.tokens ?? [])] : (c.logprobs?.tokens ?? []);
  return completionLogprobs(tok, ids, rows);
}

/** SSE events of /v1/completions: each delta's text (and logprobs, their text_offset running on per choice). */
function completionStream(r: ResolvedGenerate, tok: StrataTokenizer | null, created: number, model: string): StreamFormat {
  const offsets = new Map<number, number>();
  const event = (id: string, choices: unknown[], extra = {}) => ({ id, object: 'text_completion', created, model, choices, ...extra });
  return {
    id: (jobId) => `cmpl-${jobId}`,
    delta(id, d) {
      const prefix = d.first ? echoed(r, tok, d.index) : '';
      let logprobs: CompletionLogprobs | null = null;
      if (r.logprobs !== undefined) {
        const start = offsets.get(d.index) ?? 0;
        const prompt = d.first && r.echo ? r.prompts[Math.floor(d.index / r.n)] : [];
        const head = completionLogprobs(tok, prompt, d.promptLogprobs ?? prompt.map(() => null), start);
        const headEnd = start + prompt.reduce((s, t) => s + tokenText(tok, t).length, 0);
        const tail = completionLogprobs(tok, d.tokens, d.logprobs ?? [], headEnd);
        offsets.set(d.index, headEnd + d.tokens.reduce((s, t) => s + tokenText(tok, t).length, 0));
        logprobs = concatLogprobs(head, tail);
      }
      return event(id, [{ index: d.index, text: prefix + d.text, token_ids: d.tokens, finish_reason: d.finish, logprobs }]);
    },
    usage: (id, usage) => event(id, [], { usage }),
  };
}

/** POST /v1/completions: one prompt or a list (choices numbered prompt * n + i), streaming or not, with logprobs/echo. */
export function registerCompletions(app: FastifyInstance, ctx: RouteContext): void {
  const { modelName } = ctx.opts;
  app.post('/v1/completions', async (req, reply) => {
    const o = asObject(req.body);
    ctx.checkModel(o);
    const { stream, includeUsage } = streamFlags(o);
    const priority = ctx.priorityOf(o);
    const key = ctx.idempotencyKey(req.headers, o);
    const r = resolveJob({ ...o, kind: 'generate' }, ctx.model) as ResolvedGenerate;
    const payload = generatePayload(r);
    const created = Math.floor(Date.now() / 1000);
    const tok = ctx.model.tokenizer;
    if (stream) {
      return streamJob(reply, ctx, { payload, priority, key, choices: r.prompts.length * r.n, includeUsage, format: completionStream(r, tok, created, modelName) });
    }
    const { jobId, result } = await ctx.submit(payload, priority, key);
    reply.header(JOB_ID_HEADER, jobId);
    const out = (await result.catch(rethrow)) as GenerateResultBody;
    return {
      id: `cmpl-${jobId}`, object: 'text_completion', created, model: modelName,
      choices: out.choices.map((c) => ({
        index: c.index, text: echoed(r, tok, c.index) + (c.text ?? ''), token_ids: c.token_ids, finish_reason: c.finish_reason, logprobs: choiceLogprobs(r, tok, c),
      })),
      usage: out.usage,
    };
  });
}
