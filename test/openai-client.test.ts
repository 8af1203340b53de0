import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import OpenAI from 'openai';
import { freePort, startPrivateRedis, type PrivateRedis } from './helpers/redis.ts';
import { testCacheDir } from './helpers/fixtures.ts';

// The official `openai` npm client against a real `strata up` stack on the built-in demo model (models/demo: GPT-2's
// tokenizer, random weights): 2 worker processes over gRPC, a coordinator, BullMQ on a private Redis.

const STRATA = fileURLToPath(new URL('../bin/strata.js', import.meta.url));
let redis: PrivateRedis;
let up: ChildProcess;
let client: OpenAI;
let url = '';
let banner = '';

before(async () => {
  testCacheDir();
  redis = await startPrivateRedis();
  const port = await freePort();
  up = spawn(process.execPath, [STRATA, 'up', '--workers', '2', '--port', String(port), '--redis', redis.url, '--threads', '1', '--max-batch', '3'], {
    stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, STRATA_KV_BUDGET_MB: '64' },
  });
  let err = '';
  up.stderr!.on('data', (d) => (err = (err + d).slice(-4000)));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`strata up did not start: ${err}`)), 120_000);
    up.stdout!.on('data', (d) => {
      banner += d;
      if (/Ctrl-C stops everything/.test(banner)) {
        clearTimeout(timer);
        resolve();
      }
    });
    up.once('exit', (code) => reject(new Error(`strata up exited (${code}): ${err}`)));
  });
  url = /serving at (\S+)/.exec(banner)![1];
  client = new OpenAI({ baseURL: `${url}/v1`, apiKey: 'unused', maxRetries: 0 });
});

after(async () => {
  if (up && up.exitCode === null) {
    const exited = new Promise((r) => up.once('exit', r));
    up.kill('SIGTERM');
    await exited;
  }
  await redis?.stop();
});

test('the banner says the weights are random and prints a text and a chat request that work as printed', async () => {
  assert.match(banner, /RANDOM weights/);
  const curls = [...banner.matchAll(/curl -s (\S+) -H 'content-type: application\/json' -d '(.+)'/g)];
  assert.deepEqual(curls.map((m) => new URL(m[1]).pathname), ['/v1/completions', '/v1/chat/completions']);
  for (const [, target, body] of curls) {
    const res = await fetch(target, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
    assert.equal(res.status, 200, await res.clone().text());
  }
});

test('strata up passed its worker options on to every worker', async () => {
  const { stages } = (await (await fetch(`${url}/v1/pipeline`)).json()) as { stages: { pid: number }[] };
  assert.equal(stages.length, 2);
  for (const s of stages) {
    const args = readFileSync(`/proc/${s.pid}/cmdline`, 'utf8').split('\0');
    const value = (flag: string) => args[args.lastIndexOf(flag) + 1];
    assert.equal(value('--threads'), '1');
    assert.equal(value('--max-batch'), '3');
    assert.equal(value('--kv-budget-mb'), '64', 'from STRATA_KV_BUDGET_MB');
  }
});

test('completions: text in, text out; streaming with usage gives the same greedy text', async () => {
  const models = await client.models.list();
  assert.equal(models.data[0].id, 'demo');
  const body = { model: 'demo', prompt: 'Hello, my name is', max_tokens: 8, temperature: 0 };
  const done = await client.completions.create(body);
  assert.equal(done.choices.length, 1);
  assert.ok(done.choices[0].text.length > 0);
  assert.equal(done.usage?.prompt_tokens, 5);
  let text = '';
  let usage: OpenAI.CompletionUsage | undefined;
  for await (const chunk of await client.completions.create({ ...body, stream: true, stream_options: { include_usage: true } })) {
    text += chunk.choices[0]?.text ?? '';
    if (chunk.usage) usage = chunk.usage;
  }
  assert.equal(text, done.choices[0].text);
  assert.equal(usage?.completion_tokens, 8);
});

test('logprobs and echo (lm-evaluation-harness loglikelihood): scoring a prompt with max_tokens 0', async () => {
  const out = await client.completions.create({ model: 'demo', prompt: 'The cat sat on the mat', echo: true, logprobs: 5, max_tokens: 0 });
  const lp = out.choices[0].logprobs!;
  assert.equal(out.choices[0].text, 'The cat sat on the mat');
  assert.equal(lp.tokens!.join(''), 'The cat sat on the mat');
  assert.equal(lp.token_logprobs![0], null);
  assert.ok(lp.token_logprobs!.slice(1).every((v) => typeof v === 'number' && v < 0));
  assert.deepEqual(lp.text_offset, [0, 3, 7, 11, 14, 18]);
  for (const top of lp.top_logprobs!.slice(1)) assert.ok(Object.keys(top!).length >= 5);
  // Greedy continuation scored while generating equals the same tokens scored as a prompt.
  const gen = await client.completions.create({ model: 'demo', prompt: 'The cat', max_tokens: 3, temperature: 0, logprobs: 1 });
  const again = await client.completions.create({ model: 'demo', prompt: `The cat${gen.choices[0].text}`, max_tokens: 0, echo: true, logprobs: 1 });
  const tail = again.choices[0].logprobs!.token_logprobs!.slice(-3) as number[];
  gen.choices[0].logprobs!.token_logprobs!.forEach((v, i) => assert.ok(Math.abs(v! - tail[i]) < 1e-4, `token ${i}`));
});

test('chat completions, plain and streamed, through the demo model\'s template', async () => {
  const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'system', content: 'You are terse.' }, { role: 'user', content: 'Say hello.' }];
  const done = await client.chat.completions.create({ model: 'demo', messages, max_tokens: 6, temperature: 0, logprobs: true, top_logprobs: 2 });
  const c = done.choices[0];
  assert.equal(c.message.role, 'assistant');
  assert.equal(typeof c.message.content, 'string');
  assert.ok(['stop', 'length'].includes(c.finish_reason));
  assert.equal(c.logprobs!.content!.length, done.usage!.completion_tokens);
  let content = '';
  let role = '';
  for await (const chunk of await client.chat.completions.create({ model: 'demo', messages, max_tokens: 6, temperature: 0, stream: true })) {
    role ||= chunk.choices[0]?.delta.role ?? '';
    content += chunk.choices[0]?.delta.content ?? '';
  }
  assert.equal(role, 'assistant');
  assert.equal(content, c.message.content);
});

test('embeddings and a list of prompts', async () => {
  const emb = await client.embeddings.create({ model: 'demo', input: ['hello', 'world'] });
  assert.equal(emb.data.length, 2);
  assert.equal(emb.data[0].embedding.length, 16);
  const batch = await client.completions.create({ model: 'demo', prompt: ['One', 'Two words', 'Three more words'], max_tokens: 2, n: 2, temperature: 0 });
  assert.deepEqual(batch.choices.map((c) => c.index), [0, 1, 2, 3, 4, 5]);
  const single = await client.completions.create({ model: 'demo', prompt: 'Two words', max_tokens: 2, temperature: 0 });
  assert.equal(batch.choices[2].text, single.choices[0].text);
});

test('bad input comes back as the SDK\'s 400 with the field named', async () => {
  await assert.rejects(client.completions.create({ model: 'demo', prompt: 'x', logprobs: 21 }), (e: unknown) => {
    assert.ok(e instanceof OpenAI.BadRequestError);
    assert.match(e.message, /logprobs must be an integer in \[0, 20\]/);
    return true;
  });
  await assert.rejects(client.chat.completions.create({ model: 'demo', messages: [{ role: 'wizard' as 'user', content: 'x' }] }), OpenAI.BadRequestError);
});
