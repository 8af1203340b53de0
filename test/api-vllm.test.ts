import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { compileChatTemplate } from '../model/chat-template.ts';
import { loadTokenizer } from '../model/tokenizer.ts';
import { forwardLogits } from '../model/generation.ts';
import type { CoordinatorService } from '../coordinator/service.ts';
import { expected } from './helpers/fixtures.ts';
import { startGpt2Service, type Gpt2Service } from './helpers/service.ts';

// The vLLM-compatible surface over HTTP (real Redis, BullMQ, ORT): logprobs/echo against the fixture's logits,
// prompt lists, chat through a Jinja template, /tokenize and /detokenize, and their 400s.

const TEMPLATE = "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tools are not supported') }}{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
const forward = expected('gpt2-tiny').forward.find((c) => c.input_ids.length >= 6)!;
let plain: Gpt2Service;
let chat: Gpt2Service;
let endToken = -1;

const post = (svc: CoordinatorService, path: string, body: unknown) =>
  fetch(`${svc.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
const json = async (svc: CoordinatorService, path: string, body: unknown) => {
  const res = await post(svc, path, body);
  const out = await res.json();
  assert.equal(res.status, 200, JSON.stringify(out));
  return out as any;
};
async function sse(svc: CoordinatorService, path: string, body: unknown): Promise<any[]> {
  const res = await post(svc, path, body);
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type') ?? '', /text\/event-stream/);
  const events = (await res.text()).split('\n\n').filter((e) => e.trim()).map((e) => e.replace(/^data: /, ''));
  assert.equal(events.pop(), '[DONE]');
  return events.map((e) => JSON.parse(e));
}
const jobTotal = async (svc: CoordinatorService) => Object.values(await svc.queue.counts()).reduce((a, b) => a + b, 0);

function logSoftmax(row: number[]): number[] {
  const max = Math.max(...row);
  const lse = max + Math.log(row.reduce((s, v) => s + Math.exp(v - max), 0));
  return row.map((v) => v - lse);
}

before(async () => {
  plain = await startGpt2Service('api-vllm');
  // The chat service's tokenizer: bytes, with generation_config.json naming an extra end token (found below).
  const ids = (await (await post(plain.svc, '/v1/completions', { prompt: '<system>be brief<user>hi<assistant>', max_tokens: 6, temperature: 0, ignore_eos: true })).json()).choices[0].token_ids;
  endToken = ids[3];
  const dir = mkdtempSync(join(tmpdir(), 'strata-chat-tok-'));
  const bytes = plain.tokenizer;
  writeFileSync(join(dir, 'vocab.json'), JSON.stringify(Object.fromEntries(Array.from({ length: 256 }, (_, id) => [bytes.idToToken(id), id]))));
  writeFileSync(join(dir, 'merges.txt'), '#version: 0.2\n');
  writeFileSync(join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: [0, endToken] }));
  const tokenizer = (await loadTokenizer(dir, plain.gpt2.spec))!;
  chat = await startGpt2Service('api-vllm-chat', { tokenizer, chatTemplate: compileChatTemplate(TEMPLATE, 'test') });
});

after(async () => {
  await plain?.close();
  await chat?.close();
});

test('echo + logprobs + max_tokens 0 scores the prompt: log-softmax of the HF logits, first token null', async () => {
  const ids = forward.input_ids;
  const out = await json(plain.svc, '/v1/completions', { prompt: ids, echo: true, logprobs: 3, max_tokens: 0 });
  const c = out.choices[0];
  assert.equal(c.text, plain.tokenizer.decode(ids));
  assert.deepEqual(c.token_ids, []);
  const lp = c.logprobs;
  assert.equal(lp.tokens.length, ids.length);
  assert.deepEqual(lp.tokens, ids.map((id) => plain.tokenizer.decode([id])));
  assert.equal(lp.token_logprobs[0], null);
  assert.equal(lp.top_logprobs[0], null);
  assert.deepEqual(lp.text_offset, ids.map((_, i) => i), 'one character per byte token');
  for (let p = 1; p < ids.length; p++) {
    const ref = logSoftmax(forward.logits[p - 1]);
    assert.ok(Math.abs(lp.token_logprobs[p] - ref[ids[p]]) < 1e-4, `position ${p}`);
    const best = ref.map((v, id) => ({ v, id })).sort((a, b) => b.v - a.v).slice(0, 3);
    const top = lp.top_logprobs[p] as Record<string, number>;
    // Bytes >= 0x80 alone all decode to U+FFFD: those keys collide (as in vLLM), so only distinct texts are compared.
    for (const b of best.filter((x) => plain.tokenizer.decode([x.id]) !== '\uFFFD')) assert.ok(Math.abs(top[plain.tokenizer.decode([b.id])] - b.v) < 1e-4, `position ${p}: top token ${b.id}`);
    assert.ok(Object.keys(top).length <= 4, 'the token itself plus the top 3');
  }
  assert.deepEqual(out.usage, { prompt_tokens: ids.length, completion_tokens: 0, total_tokens: ids.length });
});

test('generated logprobs: greedy picks the top token; streaming sends the same arrays and the echoed prompt first', async () => {
  const prompt = forward.input_ids.slice(0, 5);
  const body = { prompt, max_tokens: 6, temperature: 0, logprobs: 2, echo: true, ignore_eos: true };
  const whole = (await json(plain.svc, '/v1/completions', body)).choices[0];
  const lp = whole.logprobs;
  assert.equal(lp.tokens.length, prompt.length + 6);
  for (let i = prompt.length; i < lp.tokens.length; i++) {
    const top = Object.values(lp.top_logprobs[i] as Record<string, number>);
    assert.ok(Math.abs(Math.max(...top) - lp.token_logprobs[i]) < 1e-6, `token ${i} is the most likely`);
  }
  const chunks = await sse(plain.svc, '/v1/completions', { ...body, stream: true });
  assert.ok(chunks[0].choices[0].text.startsWith(plain.tokenizer.decode(prompt)), 'the first chunk carries the prompt');
  const merged = { tokens: [] as string[], token_logprobs: [] as unknown[], top_logprobs: [] as unknown[], text_offset: [] as number[] };
  let text = '';
  for (const ch of chunks) {
    text += ch.choices[0].text;
    for (const k of Object.keys(merged) as (keyof typeof merged)[]) (merged[k] as unknown[]).push(...ch.choices[0].logprobs[k]);
  }
  assert.equal(text, whole.text);
  assert.deepEqual(merged, lp);
});

test('an lm-evaluation-harness local-completions loglikelihood request: token-id prompts, echo, logprobs 1', async () => {
  // Its payload (tokenized_requests): a batch of context + continuation ids; it sums token_logprobs[ctxlen:-1] of
  // each choice (sorted by index) and checks the continuation is greedy against top_logprobs.
  const context = [72, 101, 108];
  const conts = [[108, 111], [32, 119, 111]];
  const out = await json(plain.svc, '/v1/completions', { model: 'gpt2-tiny', prompt: conts.map((c) => [...context, ...c]), max_tokens: 1, temperature: 0, logprobs: 1, seed: 1234, echo: true });
  const choices = [...out.choices].sort((a: any, b: any) => a.index - b.index);
  for (const [i, cont] of conts.entries()) {
    const ids = [...context, ...cont];
    const lp = choices[i].logprobs;
    assert.equal(lp.tokens.length, ids.length + 1, 'the prompt, then the one generated token');
    const got = (lp.token_logprobs as number[]).slice(context.length, -1).reduce((a, b) => a + b, 0);
    const rows = (await forwardLogits(plain.gpt2, ids)).map(logSoftmax);
    const want = cont.reduce((s, t, j) => s + rows[context.length + j - 1][t], 0);
    assert.ok(Math.abs(got - want) < 1e-4, `continuation ${i}: ${got} vs ${want}`);
    const greedy = cont.every((t, j) => rows[context.length + j - 1].indexOf(Math.max(...rows[context.length + j - 1])) === t);
    const reported = (lp.top_logprobs as Record<string, number>[]).slice(context.length, -1).every((top, j) => {
      const best = Object.entries(top).sort((a, b) => b[1] - a[1])[0][0];
      return best === lp.tokens[context.length + j];
    });
    assert.equal(reported, greedy, 'is_greedy as the harness computes it');
  }
});

test('/tokenize and /detokenize need the API token when one is set', async () => {
  const guarded = await startGpt2Service('api-vllm-auth', { authToken: 'sesame' });
  try {
    for (const [path, body] of [['/tokenize', { prompt: 'x' }], ['/detokenize', { tokens: [1] }]] as const) {
      assert.equal((await post(guarded.svc, path, body)).status, 401);
      const ok = await fetch(`${guarded.svc.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json', authorization: 'Bearer sesame' }, body: JSON.stringify(body) });
      assert.equal(ok.status, 200);
    }
  } finally {
    await guarded.close();
  }
});

test('a list of prompts: one choice per prompt and n, numbered prompt * n + i, each as if sent alone', async () => {
  const prompts = [[5, 6, 7], [40, 41, 42, 43], [99]];
  const out = await json(plain.svc, '/v1/completions', { prompt: prompts, n: 2, max_tokens: 4, temperature: 0, ignore_eos: true });
  assert.deepEqual(out.choices.map((c: any) => c.index), [0, 1, 2, 3, 4, 5]);
  for (const [i, p] of prompts.entries()) {
    const alone = (await json(plain.svc, '/v1/completions', { prompt: p, max_tokens: 4, temperature: 0, ignore_eos: true })).choices[0].token_ids;
    assert.deepEqual(out.choices[2 * i].token_ids, alone, `prompt ${i}`);
    assert.deepEqual(out.choices[2 * i + 1].token_ids, alone, `prompt ${i}, second choice`);
  }
  assert.equal(out.usage.prompt_tokens, 8);
  const texts = await json(plain.svc, '/v1/completions', { prompt: ['ab', 'cd'], max_tokens: 2, temperature: 0, echo: true, ignore_eos: true });
  assert.ok(texts.choices[0].text.startsWith('ab') && texts.choices[1].text.startsWith('cd'));
  const chunks = await sse(plain.svc, '/v1/completions', { prompt: prompts, max_tokens: 3, temperature: 0, stream: true, ignore_eos: true });
  const streamed = new Map<number, number[]>();
  for (const ch of chunks) for (const c of ch.choices) streamed.set(c.index, [...(streamed.get(c.index) ?? []), ...c.token_ids]);
  assert.deepEqual([...streamed.keys()].sort(), [0, 1, 2]);
  for (const [i] of prompts.entries()) assert.deepEqual(streamed.get(i), out.choices[2 * i].token_ids.slice(0, 3));
});

test('/tokenize and /detokenize in vLLM shapes, text and chat messages', async () => {
  assert.deepEqual(await json(plain.svc, '/tokenize', { prompt: 'hi!' }), { count: 3, max_model_len: 64, tokens: [104, 105, 33], token_strs: null });
  assert.deepEqual((await json(plain.svc, '/tokenize', { prompt: 'a b', return_token_strs: true })).token_strs, ['a', 'Ġ', 'b']);
  assert.deepEqual(await json(plain.svc, '/detokenize', { tokens: [104, 105, 33] }), { prompt: 'hi!' });
  const messages = [{ role: 'user', content: 'hi' }];
  const rendered = await json(chat.svc, '/tokenize', { messages });
  assert.deepEqual(rendered.tokens, [...Buffer.from('<user>hi<assistant>')]);
  const noPrompt = await json(chat.svc, '/tokenize', { messages, add_generation_prompt: false });
  assert.equal(noPrompt.count, '<user>hi'.length);
  for (const [svc, body, path, code] of [
    [plain.svc, { messages }, '/tokenize', 'chat_template_missing'],
    [plain.svc, { prompt: 5 }, '/tokenize', 'prompt_missing'],
    [plain.svc, { tokens: [1, 999] }, '/detokenize', 'token_out_of_range'],
    [plain.svc, { tokens: 'abc' }, '/detokenize', 'invalid_field'],
  ] as const) {
    const res = await post(svc, path, body);
    assert.equal(res.status, 400, JSON.stringify(body));
    assert.equal((await res.json()).error.code, code);
  }
});

test('chat completions: rendered by the template, vLLM response and chunk shapes, stops at the end token', async () => {
  const messages = [{ role: 'system', content: 'be brief' }, { role: 'user', content: [{ type: 'text', text: 'hi' }] }];
  const out = await json(chat.svc, '/v1/chat/completions', { model: 'gpt2-tiny', messages, max_tokens: 10, temperature: 0 });
  assert.match(out.id, /^chatcmpl-/);
  assert.equal(out.object, 'chat.completion');
  assert.equal(out.usage.prompt_tokens, '<system>be brief<user>hi<assistant>'.length);
  const c = out.choices[0];
  assert.equal(c.message.role, 'assistant');
  assert.equal(c.logprobs, null);
  const noStop = await json(plain.svc, '/v1/completions', { prompt: '<system>be brief<user>hi<assistant>', max_tokens: 10, temperature: 0, ignore_eos: true });
  const ids = noStop.choices[0].token_ids as number[];
  const at = ids.indexOf(endToken);
  assert.ok(at >= 0, 'the greedy continuation reaches the end token');
  assert.equal(c.finish_reason, 'stop');
  assert.equal(out.usage.completion_tokens, at + 1, 'generation ends at the end token');
  assert.equal(c.message.content, plain.tokenizer.decode(ids.slice(0, at)) + plain.tokenizer.decode([endToken]));

  const chunks = await sse(chat.svc, '/v1/chat/completions', { messages, max_tokens: 10, temperature: 0, stream: true, stream_options: { include_usage: true }, logprobs: true, top_logprobs: 2 });
  assert.ok(chunks.every((ch) => ch.object === 'chat.completion.chunk' && ch.id === chunks[0].id));
  assert.deepEqual(chunks[0].choices[0].delta, { role: 'assistant', content: '' });
  const content = chunks.flatMap((ch) => ch.choices.map((x: any) => x.delta.content ?? '')).join('');
  assert.equal(content, c.message.content);
  const finals = chunks.flatMap((ch) => ch.choices.filter((x: any) => x.finish_reason));
  assert.deepEqual(finals.map((x: any) => x.finish_reason), ['stop']);
  const lps = chunks.flatMap((ch) => ch.choices.flatMap((x: any) => x.logprobs?.content ?? []));
  assert.equal(lps.length, at + 1, 'one logprob entry per generated token');
  for (const e of lps) {
    assert.equal(e.top_logprobs.length, 2);
    assert.ok(Math.abs(e.top_logprobs[0].logprob - e.logprob) < 1e-6, 'greedy: the token is the top one');
    assert.deepEqual(e.bytes, [...Buffer.from(e.token, 'utf8')]);
  }
  assert.deepEqual(chunks.at(-1).choices, []);
  assert.equal(chunks.at(-1).usage.completion_tokens, at + 1);
});

test('bad chat and completions input: a 400 naming the field (or the fix), and no job', async () => {
  const before = await jobTotal(chat.svc);
  const m = [{ role: 'user', content: 'hi' }];
  const cases: [CoordinatorService, string, unknown, string, RegExp][] = [
    [plain.svc, '/v1/chat/completions', { messages: m }, 'chat_template_missing', /--chat-template FILE/],
    [chat.svc, '/v1/chat/completions', { messages: 'hi' }, 'invalid_field', /messages must be a non-empty list/],
    [chat.svc, '/v1/chat/completions', { messages: [] }, 'invalid_field', /messages/],
    [chat.svc, '/v1/chat/completions', { messages: [{ role: 'wizard', content: 'hi' }] }, 'invalid_field', /messages\[0\]\.role must be one of/],
    [chat.svc, '/v1/chat/completions', { messages: [{ role: 'user', content: 5 }] }, 'invalid_field', /messages\[0\]\.content/],
    [chat.svc, '/v1/chat/completions', { messages: [{ role: 'tool', content: 'x' }] }, 'chat_template_error', /refused these messages: tools are not supported/],
    [chat.svc, '/v1/chat/completions', { messages: m, logprobs: true, top_logprobs: 21 }, 'invalid_field', /top_logprobs must be an integer in \[0, 20\]/],
    [chat.svc, '/v1/chat/completions', { messages: m, top_logprobs: 2 }, 'invalid_field', /needs logprobs: true/],
    [chat.svc, '/v1/chat/completions', { messages: m, logprobs: 3 }, 'invalid_field', /logprobs must be true or false/],
    [chat.svc, '/v1/chat/completions', { messages: m, max_tokens: 0 }, 'invalid_field', /max_tokens/],
    [chat.svc, '/v1/chat/completions', { messages: m, stream_options: 'yes' }, 'invalid_field', /stream_options/],
    [chat.svc, '/v1/completions', { prompt: [1], logprobs: 21 }, 'invalid_field', /logprobs/],
    [chat.svc, '/v1/completions', { prompt: ['a', [1]] }, 'invalid_field', /mixes kinds/],
  ];
  for (const [svc, path, body, code, message] of cases) {
    const res = await post(svc, path, body);
    const err = (await res.json()).error;
    assert.equal(res.status, 400, `${path} ${JSON.stringify(body)}: ${err?.message}`);
    assert.equal(err.code, code, JSON.stringify(body));
    assert.match(err.message, message);
  }
  // A tokenizer_config.json template that does not parse is the operator's to fix: a 400 naming it, per request.
  const broken = await startGpt2Service('api-vllm-broken', { tokenizer: { ...plain.tokenizer, chatTemplate: '{% for m in messages %}' } });
  try {
    const res = await post(broken.svc, '/v1/chat/completions', { messages: m });
    assert.equal(res.status, 400);
    assert.match((await res.json()).error.message, /tokenizer_config\.json does not parse/);
  } finally {
    await broken.close();
  }
  assert.equal(await jobTotal(chat.svc), before);
});
