import { readFileSync } from 'node:fs';
import { Template } from '@huggingface/jinja';
import { StrataError } from './errors.ts';

/**
 * Chat prompts rendered by the model's own Jinja chat template (tokenizer_config.json's `chat_template`, or a file
 * given with --chat-template) through @huggingface/jinja, the renderer transformers.js uses.
 */

export interface ChatMessage {
  role: string;
  content: string;
}

export interface ChatTemplate {
  /** Where the template came from, for messages. */
  origin: string;
  render(messages: ChatMessage[], vars: { addGenerationPrompt: boolean; specialTokens: Record<string, string | undefined> }): string;
}

const templateError = (message: string) => new StrataError('chat_template_error', message, 'invalid_argument');

/** Parses a template once; a syntax error names its origin. */
export function compileChatTemplate(source: string, origin: string): ChatTemplate {
  let template: Template;
  try {
    template = new Template(source);
  } catch (e) {
    throw templateError(`the chat template from ${origin} does not parse (${(e as Error).message}); fix it or pass another with --chat-template FILE`);
  }
  return {
    origin,
    render(messages, { addGenerationPrompt, specialTokens }) {
      try {
        // The variables transformers' apply_chat_template passes: messages, add_generation_prompt and the special tokens.
        return template.render({ messages, add_generation_prompt: addGenerationPrompt, ...specialTokens });
      } catch (e) {
        // Templates refuse what they cannot render (raise_exception: "roles must alternate", ...): the client's fix.
        throw templateError(`the chat template (${origin}) refused these messages: ${(e as Error).message}`);
      }
    },
  };
}

/** tokenizer_config.json's chat_template: a string, or a list of named templates (the one named "default"). */
export function chatTemplateSource(config: Record<string, unknown>): string | null {
  const t = config.chat_template;
  if (typeof t === 'string' && t.length > 0) return t;
  if (Array.isArray(t)) {
    const named = t.find((x) => x && typeof x === 'object' && (x as { name?: unknown }).name === 'default') as { template?: unknown } | undefined;
    if (typeof named?.template === 'string') return named.template;
  }
  return null;
}

/** --chat-template FILE: a Jinja file, read and parsed at start-up (a bad file stops the server, not a request). */
export function loadChatTemplateFile(path: string): ChatTemplate {
  let source: string;
  try {
    source = readFileSync(path, 'utf8');
  } catch (e) {
    throw new StrataError('chat_template_error', `cannot read the chat template ${path} (${(e as Error).message}); give a Jinja template file`, 'invalid_argument');
  }
  return compileChatTemplate(source, path);
}
