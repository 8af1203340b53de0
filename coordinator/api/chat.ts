import type { FastifyInstance } from 'fastify';
import { compileChatTemplate, type ChatMessage, type ChatTemplate } from '../../model/chat-template.ts';
import { StrataError } from '../../model/errors.ts';
import { MAX_TOP_LOGPROBS } from '../../model/logprobs.ts';
import { bad, resolveJob, show } from './jobs/validate.ts';
import type { GenerateResultBody, ResolvedGenerate } from './jobs/types.ts';
import { JOB_ID_HEADER, type RouteContext } from './context.ts';
import { asObject, rethrow } from './errors.ts';
import { chatLogprobs } from './logprobs.ts';
import { generatePayload, streamFlags } from './completions.ts';
import type { StreamFormat } from './sse.ts';
import { streamJob } from './sse.ts';

const ROLES = ['system', 'developer', 'user', 'assistant', 'tool'];

/** messages → [{role, content}]: content a string or a list of text parts (OpenAI's forms). */
export function checkMessages(v: unknown): ChatMessage[] {
  if (!Array.isArray(v) || v.length === 0) throw bad('invalid_field', 'messages must be a non-empty list of {role, content} objects');
  return v.map((m, i) => {
    if (!m || typeof m !== 'object' || Array.isArray(m)) throw bad('invalid_field', `messages[${i}] must be an object {role, content}`);
    const { role, content } = m as Record<string, unknown>;
    if (typeof role !== 'string' || !ROLES.includes(role)) throw bad('invalid_field', `messages[${i}].role must be one of ${ROLES.join(', ')}, got ${show(role)}`);
    if (typeof content === 'string') return { role, content };
    if (content === null || content === undefined) return { role, content: '' };
    if (Array.isArray(content) && content.every((p) => p && typeof p === 'object' && (p as { type?: unknown }).type === 'text' && typeof (p as { text?: unknown }).text === 'string')) {
      return { role, content: content.map((p) => (p as { text: string }).text).join('\n') };
    }
    throw bad('invalid_field', `messages[${i}].content must be a string or a list of {type: "text", text} parts (this model reads text only)`);
  });
}

/** The template to render with: --chat-template's, else the tokenizer's (parsed once), else a 400 naming the fix. */
export function templateFor(ctx: RouteContext): () => ChatTemplate {
  let cached: ChatTemplate | undefined;
  return () => {
    if (ctx.opts.chatTemplate) return ctx.opts.chatTemplate;
    const tok = ctx.model.tokenizer;
    if (!tok) throw bad('tokenizer_missing', 'chat needs a tokenizer and this model ships none; use /v1/completions with token ids');
    if (!tok.chatTemplate) {
      throw bad('chat_template_missing', 'this model has no chat template (tokenizer_config.json has no chat_template); start the server with --chat-template FILE (a Jinja template), or use /v1/completions');
    }
    cached ??= compileChatTemplate(tok.chatTemplate, 'tokenizer_config.json');
    return cached;
  };
}

/** SSE events of /v1/chat/completions: a role event per choice, then content deltas, finish_reason on the last. */
function chatStream(r: ResolvedGenerate, ctx: RouteContext, created: number, top: number | undefined): StreamFormat {
  const event = (id: string, choices: unknown[], extra = {}) => ({ id, object: 'chat.completion.chunk', created, model: ctx.opts.modelName, choices, ...extra });
  return {
    id: (jobId) => `chatcmpl-${jobId}`,
    opening: (id) => Array.from({ length: r.n }, (_, index) => event(id, [{ index, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }])),
    delta: (id, d) =>
      event(id, [{
        index: d.index, delta: d.text ? { content: d.text } : {}, finish_reason: d.finish,
        logprobs: top !== undefined && d.tokens.length > 0 ? chatLogprobs(ctx.model.tokenizer, d.tokens, d.logprobs ?? [], top) : null,
      }]),
    usage: (id, usage) => event(id, [], { usage }),
  };
}

/** POST /v1/chat/completions: the messages rendered by the model's chat template, generated until its end token. */
export function registerChat(app: FastifyInstance, ctx: RouteContext): void {
  const template = templateFor(ctx);
  app.post('/v1/chat/completions', async (req, reply) => {
    const o = asObject(req.body);
    ctx.checkModel(o);
    const { stream, includeUsage } = streamFlags(o);
    const priority = ctx.priorityOf(o);
    const key = ctx.idempotencyKey(req.headers, o);
    const messages = checkMessages(o.messages);
    if (o.logprobs !== undefined && o.logprobs !== null && typeof o.logprobs !== 'boolean') throw bad('invalid_field', `logprobs must be true or false, got ${show(o.logprobs)}`);
    const tl = o.top_logprobs;
    if (tl !== undefined && tl !== null && (!Number.isInteger(tl) || (tl as number) < 0 || (tl as number) > MAX_TOP_LOGPROBS)) {
      throw bad('invalid_field', `top_logprobs must be an integer in [0, ${MAX_TOP_LOGPROBS}], got ${show(tl)}`);
    }
    if (tl !== undefined && tl !== null && o.logprobs !== true) throw bad('invalid_field', 'top_logprobs needs logprobs: true');
    const top = o.logprobs === true ? ((tl as number | undefined) ?? 0) : undefined;
    const add = o.add_generation_prompt ?? true;
    if (typeof add !== 'boolean') throw bad('invalid_field', 'add_generation_prompt must be true or false');
    const tok = ctx.model.tokenizer;
    const prompt = template().render(messages, { addGenerationPrompt: add, specialTokens: tok?.specialTokens ?? {} });
    if (!tok) throw new StrataError('tokenizer_missing', 'chat needs a tokenizer and this model ships none', 'invalid_argument');
    // The template writes the special tokens itself (vLLM's add_special_tokens=False for chat).
    const promptIds = tok.encode(prompt, { addSpecialTokens: false });
    const userStops = Array.isArray(o.stop_token_ids) ? o.stop_token_ids : [];
    const r = resolveJob({
      ...o, kind: 'generate', prompt: undefined, prompt_ids: promptIds, messages: undefined, echo: undefined,
      max_tokens: o.max_completion_tokens ?? o.max_tokens, logprobs: top, top_logprobs: undefined,
      // Generation stops at the end of the assistant's turn: the template's end token(s).
      stop_token_ids: o.ignore_eos === true ? userStops : [...userStops, ...(tok.endTokenIds ?? [])],
    }, ctx.model) as ResolvedGenerate;
    const payload = generatePayload(r);
    const created = Math.floor(Date.now() / 1000);
    if (stream) return streamJob(reply, ctx, { payload, priority, key, choices: r.n, includeUsage, format: chatStream(r, ctx, created, top) });

    const { jobId, result } = await ctx.submit(payload, priority, key);
    reply.header(JOB_ID_HEADER, jobId);
    const out = (await result.catch(rethrow)) as GenerateResultBody;
    return {
      id: `chatcmpl-${jobId}`, object: 'chat.completion', created, model: ctx.opts.modelName,
      choices: out.choices.map((c) => ({
        index: c.index, message: { role: 'assistant', content: c.text ?? '' }, finish_reason: c.finish_reason,
        logprobs: top !== undefined ? chatLogprobs(tok, c.token_ids, c.logprobs?.tokens ?? [], top) : null,
      })),
      usage: out.usage,
    };
  });
}
