import type { RowLogprobs } from '../../model/logprobs.ts';
import type { StrataTokenizer } from '../../model/tokenizer.ts';

/** Logprobs in the shapes vLLM's OpenAI server answers with: completions' four arrays, and chat's `content` list. */

/** A token as text: decoded alone (vLLM's completions default), or `token_id:N` without a tokenizer. */
export const tokenText = (tok: StrataTokenizer | null, id: number) => (tok ? tok.decode([id]) : `token_id:${id}`);

/** vLLM clamps -inf (a token the softmax underflowed) so the JSON stays finite. */
const finite = (v: number) => Math.max(v, -9999);

export interface CompletionLogprobs {
  tokens: string[];
  token_logprobs: (number | null)[];
  top_logprobs: (Record<string, number> | null)[];
  text_offset: number[];
}

/**
 * Completions logprobs of `ids` (each with its report, null for an unscored first prompt token). text_offset starts
 * at `offset` and advances by each token's text; top_logprobs holds the token itself, then the top N.
 */
export function completionLogprobs(tok: StrataTokenizer | null, ids: number[], rows: (RowLogprobs | null | undefined)[], offset = 0): CompletionLogprobs {
  const out: CompletionLogprobs = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
  ids.forEach((id, i) => {
    const row = rows[i];
    const text = tokenText(tok, id);
    out.tokens.push(text);
    out.token_logprobs.push(row ? finite(row.logprob) : null);
    let top: Record<string, number> | null = null;
    if (row) {
      // The token itself first; a top token whose text collides with one already there (bytes that decode alone to
      // U+FFFD) does not overwrite it.
      top = { [text]: finite(row.logprob) };
      for (const t of row.top) {
        const key = tokenText(tok, t.id);
        if (!Object.hasOwn(top, key)) top[key] = finite(t.logprob);
      }
    }
    out.top_logprobs.push(top);
    out.text_offset.push(offset);
    offset += text.length;
  });
  return out;
}

/** Appends b's arrays to a's (streamed echo: the prompt's, then the first tokens'). */
export function concatLogprobs(a: CompletionLogprobs, b: CompletionLogprobs): CompletionLogprobs {
  return { tokens: [...a.tokens, ...b.tokens], token_logprobs: [...a.token_logprobs, ...b.token_logprobs], top_logprobs: [...a.top_logprobs, ...b.top_logprobs], text_offset: [...a.text_offset, ...b.text_offset] };
}

const entry = (tok: StrataTokenizer | null, id: number, logprob: number) => {
  const token = tokenText(tok, id);
  return { token, logprob: finite(logprob), bytes: [...Buffer.from(token, 'utf8')] };
};

/** Chat logprobs (OpenAI's shape): {content: [{token, logprob, bytes, top_logprobs: [...]}]}. */
export function chatLogprobs(tok: StrataTokenizer | null, ids: number[], rows: RowLogprobs[], top: number) {
  return {
    content: ids.map((id, i) => ({
      ...entry(tok, id, rows[i]?.logprob ?? -9999),
      top_logprobs: (rows[i]?.top ?? []).slice(0, top).map((t) => entry(tok, t.id, t.logprob)),
    })),
  };
}
