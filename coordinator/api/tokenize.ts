import type { FastifyInstance } from 'fastify';
import type { StrataTokenizer } from '../../model/tokenizer.ts';
import { bad, show, tokenIds } from './jobs/validate.ts';
import type { RouteContext } from './context.ts';
import { asObject } from './errors.ts';
import { checkMessages, templateFor } from './chat.ts';

/** POST /tokenize and /detokenize, in vLLM's shapes: text (or chat messages) ↔ token ids, without the pipeline. */
export function registerTokenize(app: FastifyInstance, ctx: RouteContext): void {
  const template = templateFor(ctx);
  const tokenizer = (): StrataTokenizer => {
    const tok = ctx.model.tokenizer;
    if (!tok) throw bad('tokenizer_missing', 'this model ships no tokenizer, so it cannot tokenize; add tokenizer.json (or vocab.json + merges.txt) to the model directory');
    return tok;
  };
  const flag = (o: Record<string, unknown>, name: string, fallback: boolean): boolean => {
    const v = o[name];
    if (v === undefined || v === null) return fallback;
    if (typeof v !== 'boolean') throw bad('invalid_field', `${name} must be true or false, got ${show(v)}`);
    return v;
  };

  app.post('/tokenize', async (req) => {
    const o = asObject(req.body);
    ctx.checkModel(o);
    const tok = tokenizer();
    let ids: number[];
    if (o.messages !== undefined) {
      if (o.prompt !== undefined) throw bad('invalid_field', 'send prompt or messages, not both');
      const text = template().render(checkMessages(o.messages), { addGenerationPrompt: flag(o, 'add_generation_prompt', true), specialTokens: tok.specialTokens ?? {} });
      ids = tok.encode(text, { addSpecialTokens: flag(o, 'add_special_tokens', false) });
    } else {
      if (typeof o.prompt !== 'string') throw bad('prompt_missing', 'prompt is required: the text to tokenize (or messages, for a chat)');
      ids = tok.encode(o.prompt, { addSpecialTokens: flag(o, 'add_special_tokens', true) });
    }
    const strs = flag(o, 'return_token_strs', false);
    return { count: ids.length, max_model_len: ctx.opts.spec.maxPositions, tokens: ids, token_strs: strs ? ids.map((id) => tok.idToToken(id) ?? '') : null };
  });

  app.post('/detokenize', async (req) => {
    const o = asObject(req.body);
    ctx.checkModel(o);
    const tok = tokenizer();
    return { prompt: tok.decode(tokenIds(o.tokens, 'tokens', ctx.opts.spec, true)) };
  });
}
