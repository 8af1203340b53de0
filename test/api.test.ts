import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { loadModelSpec } from '../model/config.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { embed, fillMask, generate } from '../model/generation.ts';
import { loadTokenizer, type StrataTokenizer } from '../model/tokenizer.ts';
import { buildApi } from '../coordinator/api/index.ts';
import { RequestQueue } from '../coordinator/queue.ts';
import { startCoordinatorService, type CoordinatorService } from '../coordinator/service.ts';
import { expected, fixtureDir, testCacheDir } from './helpers/fixtures.ts';
import { freePort, redisUrlForTests, startPrivateRedis, uniqueQueueName } from './helpers/redis.ts';

// The HTTP API end to end: real Redis, real BullMQ, real ORT sessions (LocalPipeline on the tiny fixtures).

const GPT2 = fixtureDir('gpt2-tiny');
const BERT = fixtureDir('distilbert-tiny');
const gpt2Case = expected('gpt2-tiny').generate![0]; // [229, 49, 46, 89, 242] → 12 greedy ids
const maskCase = expected('distilbert-tiny').fill_mask![0];
const quiet = pino({ level: 'silent' });

let redis: { url: string; stop: () => Promise<void> };
let gpt2: LocalPipeline;
let bert: LocalPipeline;
let gptSvc: CoordinatorService;
let bertSvc: CoordinatorService;
let bertTok: StrataTokenizer;
const prefix = 'strata-test-api';

const stagesOf = (p: LocalPipeline) => () => ({
  stages: p.prepared.map((s) => ({ blocks: [s.range.first, s.range.last] as [number, number], address: 'in-process', pid: process.pid, healthy: true })),
});

before(async () => {
  testCacheDir();
  redis = await redisUrlForTests();
  [gpt2, bert] = await Promise.all([LocalPipeline.load(GPT2, 2), LocalPipeline.load(BERT, 2)]);
  const common = { redisUrl: redis.url, prefix, host: '127.0.0.1', port: 0, log: quiet, tokenizer: null };
  // gpt2 served without embeddings (a Stepper only), to check the 501 path.
  const gpt2Steps = { step: gpt2.step.bind(gpt2), end: gpt2.end.bind(gpt2) };
  gptSvc = await startCoordinatorService({ ...common, pipeline: gpt2Steps, spec: gpt2.spec, pipelineInfo: stagesOf(gpt2), modelName: 'gpt2-tiny', queueName: uniqueQueueName('api-gpt2') });
  // A WordPiece vocab.txt for the distilbert fixture (300 ids, [MASK] = 299), so the HF text form can be served.
  const tokDir = mkdtempSync(join(tmpdir(), 'strata-bert-tok-'));
  const vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', ...Array.from({ length: 295 }, (_, i) => `w${i + 4}`), '[MASK]'];
  writeFileSync(join(tokDir, 'vocab.txt'), vocab.join('\n') + '\n');
  bertTok = (await loadTokenizer(tokDir, bert.spec))!;
  bertSvc = await startCoordinatorService({ ...common, tokenizer: bertTok, pipeline: bert, spec: bert.spec, pipelineInfo: stagesOf(bert), modelName: 'distilbert-tiny', queueName: uniqueQueueName('api-bert') });
});

after(async () => {
  // Leave nothing behind in a shared REDIS_URL.
  for (const svc of [gptSvc, bertSvc]) await svc?.queue.queue.obliterate({ force: true });
  await gptSvc?.close();
  await bertSvc?.close();
  await gpt2?.close();
  await bert?.close();
  await redis?.stop();
});

const post = (svc: CoordinatorService, path: string, body: unknown, headers: Record<string, string> = {}) =>
  fetch(`${svc.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: typeof body === 'string' ? body : JSON.stringify(body) });

/** Total jobs in every state: an invalid request must not change it. */
const jobTotal = async (svc: CoordinatorService) => Object.values(await svc.queue.counts()).reduce((a, b) => a + b, 0);

/** Reads an SSE response as a client does: `data: ` lines, blank-line separated, until [DONE]. */
async function readSse(res: Response): Promise<unknown[]> {
  const text = await res.text();
  const events = text.split('\n\n').filter((e) => e.trim()).map((e) => {
    assert.ok(e.startsWith('data: '), `SSE event without data: ${e}`);
    return e.slice(6);
  });
  assert.equal(events.at(-1), '[DONE]');
  return events.slice(0, -1).map((e) => JSON.parse(e));
}

test('completion (token ids, greedy) equals generate() on the same pipeline and the HF fixture', async () => {
  const direct = await generate(gpt2, gpt2Case.input_ids, { maxNewTokens: 12, eosTokenId: gpt2.spec.eosTokenId });
  const res = await post(gptSvc, '/v1/completions', { model: 'gpt2-tiny', prompt: gpt2Case.input_ids, max_tokens: 12, temperature: 0 });
  assert.equal(res.status, 200);
  const body = await res.json();
  assert.equal(body.object, 'text_completion');
  assert.equal(body.model, 'gpt2-tiny');
  assert.match(body.id, /^cmpl-/);
  assert.equal(body.choices.length, 1);
  assert.deepEqual(body.choices[0].token_ids, gpt2Case.output_ids);
  assert.deepEqual(body.choices[0].token_ids, direct.outputIds);
  assert.equal(body.choices[0].finish_reason, 'length');
  assert.equal(body.choices[0].logprobs, null);
  assert.equal(body.choices[0].text, '');
  assert.deepEqual(body.usage, { prompt_tokens: 5, completion_tokens: 12, total_tokens: 17 });

  // The job stays queryable.
  const job = await (await fetch(`${gptSvc.url}/v1/jobs/${body.id.slice(5)}`)).json();
  assert.equal(job.state, 'completed');
  assert.deepEqual(job.result.choices[0].token_ids, gpt2Case.output_ids);
  const missing = await fetch(`${gptSvc.url}/v1/jobs/nope`);
  assert.equal(missing.status, 404);
  assert.equal((await missing.json()).error.code, 'job_not_found');
});

test('streamed completion: SSE chunks carry token id deltas that add up to the greedy continuation', async () => {
  const res = await post(gptSvc, '/v1/completions', { prompt: gpt2Case.input_ids, max_tokens: 12, temperature: 0, stream: true, stream_options: { include_usage: true } });
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type') ?? '', /^text\/event-stream/);
  const chunks = (await readSse(res)) as { choices: { index: number; token_ids: number[]; text: string; finish_reason: string | null }[]; usage?: unknown }[];
  const usage = chunks.pop()!;
  assert.deepEqual(usage.usage, { prompt_tokens: 5, completion_tokens: 12, total_tokens: 17 });
  assert.ok(chunks.length >= 2, 'several chunks, not one final blob');
  assert.deepEqual(chunks.flatMap((c) => c.choices[0].token_ids), gpt2Case.output_ids);
  assert.equal(chunks.at(-1)!.choices[0].finish_reason, 'length');
  assert.ok(chunks.slice(0, -1).every((c) => c.choices[0].finish_reason === null));
});

test('stop_token_ids end a completion with finish_reason stop', async () => {
  const res = await post(gptSvc, '/v1/completions', { prompt: gpt2Case.input_ids, max_tokens: 12, temperature: 0, stop_token_ids: [156] });
  const body = await res.json();
  assert.deepEqual(body.choices[0].token_ids, [9, 5, 5, 156]);
  assert.equal(body.choices[0].finish_reason, 'stop');
});

test('fill-mask (input_ids + mask_index) equals the HF top-5', async () => {
  const res = await post(bertSvc, '/v1/fill-mask', { input_ids: maskCase.input_ids, mask_index: maskCase.mask_index, parameters: { top_k: 5 } });
  assert.equal(res.status, 200);
  const body = (await res.json()) as { token: number; score: number }[];
  assert.deepEqual(body.map((c) => c.token), maskCase.top5_ids);
  assert.ok(body.every((c, i) => c.score > 0 && c.score < 1 && (i === 0 || c.score <= body[i - 1].score)));
});

test('fill-mask, HF text form: [{sequence, score, token, token_str}] as the pipeline ranks them', async () => {
  const res = await post(bertSvc, '/v1/fill-mask', { inputs: 'w10 w20 [MASK] w30', parameters: { top_k: 3 } });
  assert.equal(res.status, 200);
  const body = (await res.json()) as { sequence: string; score: number; token: number; token_str: string }[];
  const ids = bertTok.encode('w10 w20 [MASK] w30');
  assert.deepEqual(ids, [2, 10, 20, 299, 30, 3]);
  const want = await fillMask(bert, ids, 3, 3);
  assert.deepEqual(body.map((c) => c.token), want.map((c) => c.id));
  assert.equal(body[0].token_str, bertTok.decode([want[0].id]));
  assert.equal(body[0].sequence, `w10 w20 ${body[0].token_str} w30`);
  const two = await post(bertSvc, '/v1/fill-mask', { inputs: '[MASK] w5 [MASK]' });
  assert.equal(two.status, 400);
  assert.equal((await two.json()).error.code, 'multiple_masks');
});

test('embeddings: one mean-pooled vector per input; 501 where the pipeline has none', async () => {
  const res = await post(bertSvc, '/v1/embeddings', { input: [[5, 6, 7], [8, 9]] });
  assert.equal(res.status, 200);
  const body = await res.json();
  assert.equal(body.object, 'list');
  assert.equal(body.data.length, 2);
  assert.equal(body.data[1].index, 1);
  assert.equal(body.data[0].embedding.length, bert.spec.dModel);
  assert.deepEqual(body.usage, { prompt_tokens: 5, total_tokens: 5 });
  const direct = await embed(bert, [5, 6, 7]);
  assert.ok(body.data[0].embedding.every((v: number, i: number) => Math.abs(v - direct[i]) < 1e-6));

  const b64 = await (await post(bertSvc, '/v1/embeddings', { input: 'w5 w6', encoding_format: 'base64' })).json();
  const buf = Buffer.from(b64.data[0].embedding, 'base64');
  const vec = new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4);
  const direct2 = await embed(bert, bertTok.encode('w5 w6'));
  assert.ok(vec.length === bert.spec.dModel && vec.every((v, i) => Math.abs(v - direct2[i]) < 1e-6));

  const none = await post(gptSvc, '/v1/embeddings', { input: [1, 2, 3] });
  assert.equal(none.status, 501);
  assert.equal((await none.json()).error.code, 'not_implemented');
});

test('50 concurrent completions are all answered correctly', async () => {
  const cases = expected('gpt2-tiny').generate!;
  const results = await Promise.all(Array.from({ length: 50 }, async (_, i) => {
    const c = cases[i % cases.length];
    const res = await post(gptSvc, '/v1/completions', { prompt: c.input_ids, max_tokens: c.max_new_tokens, temperature: 0 });
    return { want: c.output_ids, body: await res.json() };
  }));
  for (const { want, body } of results) assert.deepEqual(body.choices?.[0]?.token_ids, want, JSON.stringify(body));
});

test('seeded sampling is reproducible; another seed gives other tokens; n choices use seed + i; unseeded ones differ', async () => {
  const ask = async (seed: number, n = 1) =>
    (await (await post(gptSvc, '/v1/completions', { prompt: gpt2Case.input_ids, max_tokens: 16, temperature: 1.5, top_k: 50, seed, n })).json()).choices.map((c: { token_ids: number[] }) => c.token_ids);
  const [a] = await ask(42);
  const [b] = await ask(42);
  const [c] = await ask(43);
  assert.deepEqual(a, b);
  assert.notDeepEqual(a, c);
  const two = await ask(42, 2);
  assert.deepEqual(two, [a, c]);
  // Unseeded requests each draw their own seed.
  const unseeded = async () => (await (await post(gptSvc, '/v1/completions', { prompt: gpt2Case.input_ids, max_tokens: 16, temperature: 1.5 })).json()).choices[0].token_ids;
  assert.notDeepEqual(await unseeded(), await unseeded());
});

test('invalid requests: 4xx with a useful message, and no job enqueued', async () => {
  const before = await jobTotal(gptSvc);
  const cases: [unknown, number, string, RegExp][] = [
    [{}, 400, 'prompt_missing', /prompt is required/],
    [{ prompt: 'hello' }, 400, 'tokenizer_missing', /send token ids/],
    [{ prompt: [1, 2, 300] }, 400, 'token_out_of_range', /prompt\[2\] = 300.*\[0, 256\)/],
    [{ prompt: [1, 2.5] }, 400, 'token_out_of_range', /prompt\[1\]/],
    [{ prompt: [], max_tokens: 3 }, 400, 'input_empty', /empty/],
    [{ prompt: [1, 2, 3], max_tokens: 62 }, 400, 'prompt_too_long', /context of 64.*max_tokens to 61/],
    [{ prompt: [1], max_tokens: 0 }, 400, 'invalid_field', /max_tokens/],
    [{ prompt: [1], temperature: -1 }, 400, 'invalid_field', /temperature/],
    [{ prompt: [1], temperature: 'hot' }, 400, 'invalid_field', /temperature/],
    [{ prompt: [1], top_p: 0 }, 400, 'invalid_field', /top_p/],
    [{ prompt: [1], n: 0 }, 400, 'invalid_field', /\bn must be/],
    [{ prompt: [1], seed: 1.5 }, 400, 'invalid_field', /seed/],
    [{ prompt: [1], stop: ['x'] }, 400, 'tokenizer_missing', /stop_token_ids/],
    [{ prompt: [1], stream: 'yes' }, 400, 'invalid_field', /stream/],
    [{ prompt: [1], logprobs: 21 }, 400, 'invalid_field', /logprobs must be an integer in \[0, 20\]/],
    [{ prompt: [1], logprobs: -1 }, 400, 'invalid_field', /logprobs/],
    [{ prompt: [1], echo: 'yes' }, 400, 'invalid_field', /echo must be true or false/],
    [{ prompt: [1], max_tokens: 0, echo: false }, 400, 'invalid_field', /max_tokens/],
    [{ prompt: [1], best_of: 3 }, 400, 'unsupported_field', /best_of/],
    [{ prompt: [1], priority: -1 }, 400, 'invalid_field', /priority/],
    [{ prompt: [[1], 'two'] }, 400, 'invalid_field', /prompt mixes kinds/],
    [{ prompt: [[1], [2, 'x']] }, 400, 'token_out_of_range', /prompt\[1\]\[1\]/],
    [{ prompt: Array.from({ length: 65 }, () => [1]) }, 400, 'input_too_many', /65 prompts; send at most 64/],
    [{ prompt: [[1], []] }, 400, 'input_empty', /prompt\[1\] is empty/],
    [{ prompt: [1], model: 'gpt-4' }, 404, 'model_not_found', /serves "gpt2-tiny"/],
    [[1, 2], 400, 'invalid_body', /JSON object/],
  ];
  for (const [body, status, code, message] of cases) {
    const res = await post(gptSvc, '/v1/completions', body);
    assert.equal(res.status, status, JSON.stringify(body));
    const err = (await res.json()).error;
    assert.equal(err.code, code, JSON.stringify(body));
    assert.match(err.message, message);
    assert.equal(typeof err.type, 'string');
  }
  const malformed = await post(gptSvc, '/v1/completions', '{"prompt": [1,');
  assert.equal(malformed.status, 400);
  assert.ok((await malformed.json()).error.message);

  const wrongTask = await post(gptSvc, '/v1/fill-mask', { input_ids: [1, 2], mask_index: 1 });
  assert.equal(wrongTask.status, 422);
  assert.equal((await wrongTask.json()).error.code, 'task_unsupported');
  const noCompletions = await post(bertSvc, '/v1/completions', { prompt: [1] });
  assert.equal(noCompletions.status, 422);
  const badMask = await post(bertSvc, '/v1/fill-mask', { input_ids: [1, 2], mask_index: 2 });
  assert.equal(badMask.status, 400);
  assert.match((await badMask.json()).error.message, /mask_index/);
  const noMask = await post(bertSvc, '/v1/fill-mask', { input_ids: [1, 2] });
  assert.equal((await noMask.json()).error.code, 'mask_missing');
  const longEmbed = await post(bertSvc, '/v1/embeddings', { input: Array.from({ length: bert.spec.maxPositions + 1 }, () => 5) });
  assert.equal((await longEmbed.json()).error.code, 'input_too_long');

  assert.equal(await jobTotal(gptSvc), before, 'an invalid request left a job in the queue');
});

test('introspection: /v1/models, /v1/pipeline, /health, /metrics', async () => {
  const models = await (await fetch(`${gptSvc.url}/v1/models`)).json();
  assert.equal(models.data[0].id, 'gpt2-tiny');
  assert.equal(models.data[0].max_model_len, 64);
  const pipeline = await (await fetch(`${gptSvc.url}/v1/pipeline`)).json();
  assert.deepEqual(pipeline.stages.map((s: { blocks: number[] }) => s.blocks), [[0, 2], [2, 4]]);
  assert.ok(pipeline.stages.every((s: { healthy: boolean; address: string }) => s.healthy && s.address));
  const health = await fetch(`${gptSvc.url}/health`);
  assert.equal(health.status, 200);
  assert.deepEqual(await health.json(), { status: 'ok', pipeline: true, redis: true });
  const metrics = await (await fetch(`${gptSvc.url}/metrics`)).text();
  for (const name of [
    'strata_requests_waiting', 'strata_requests_running', 'strata_time_to_first_token_seconds_bucket', 'strata_time_per_output_token_seconds_bucket',
    'strata_e2e_request_latency_seconds_bucket', 'strata_prompt_tokens_total', 'strata_generation_tokens_total',
    'strata_request_success_total{finish_reason="length"}', 'strata_queue_depth{state="completed"}', 'strata_redis_up 1', 'bullmq_job_count{',
    'strata_requests_waiting_for_kv_slot 0',
    // Node's own process metrics, started by the process that serves /metrics (coordinator/metrics.ts).
    'strata_process_cpu_seconds_total', 'strata_nodejs_eventloop_lag_seconds',
  ]) assert.ok(metrics.includes(name), `metrics lack ${name}`);
});

test('429 once too many jobs wait; the refused request leaves no job', async () => {
  const queue = await RequestQueue.open({ redisUrl: redis.url, prefix, queueName: uniqueQueueName('api-full'), log: quiet });
  const app = await buildApi({ queue, spec: gpt2.spec, tokenizer: null, modelName: 'm', pipelineInfo: stagesOf(gpt2), health: () => true, maxQueued: 2 });
  try {
    // No consumer on this queue: two jobs wait.
    await queue.enqueue({ kind: 'generate', prompt_ids: [1], max_tokens: 1 });
    await queue.enqueue({ kind: 'generate', prompt_ids: [2], max_tokens: 1 }, { priority: 5 });
    const res = await app.inject({ method: 'POST', url: '/v1/completions', payload: { prompt: [1, 2], max_tokens: 2 } });
    assert.equal(res.statusCode, 429);
    assert.equal(res.json().error.code, 'queue_full');
    assert.equal(res.json().error.type, 'rate_limit_error');
    assert.equal(await queue.waitingCount(), 2);
  } finally {
    await queue.queue.obliterate({ force: true });
    await app.close();
    await queue.close();
  }
});

test('bearer auth: 401 without or with a wrong token; probes stay open', async () => {
  const queue = await RequestQueue.open({ redisUrl: redis.url, prefix, queueName: uniqueQueueName('api-auth'), log: quiet });
  const app = await buildApi({ queue, spec: gpt2.spec, tokenizer: null, modelName: 'm', pipelineInfo: stagesOf(gpt2), health: () => true, authToken: 's3cret' });
  try {
    const none = await app.inject({ method: 'GET', url: '/v1/models' });
    assert.equal(none.statusCode, 401);
    assert.equal(none.json().error.type, 'authentication_error');
    assert.equal((await app.inject({ method: 'POST', url: '/v1/completions', headers: { authorization: 'Bearer nope' }, payload: { prompt: [1] } })).statusCode, 401);
    assert.equal((await app.inject({ method: 'GET', url: '/v1/models', headers: { authorization: 'Bearer s3cret' } })).statusCode, 200);
    assert.equal((await app.inject({ method: 'GET', url: '/health' })).statusCode, 200);
  } finally {
    await queue.queue.obliterate({ force: true });
    await app.close();
    await queue.close();
  }
});

test('Redis unreachable: 503 with a JSON error, fast, and the process lives on', async () => {
  // An API pointed at a port where nothing listens.
  const queue = await RequestQueue.open({ redisUrl: `redis://127.0.0.1:${await freePort()}`, queueName: uniqueQueueName('api-down'), log: quiet });
  const app = await buildApi({ queue, spec: gpt2.spec, tokenizer: null, modelName: 'm', pipelineInfo: stagesOf(gpt2), health: () => true });
  try {
    const t0 = Date.now();
    const res = await app.inject({ method: 'POST', url: '/v1/completions', payload: { prompt: [1, 2], max_tokens: 2 } });
    assert.equal(res.statusCode, 503);
    assert.equal(res.json().error.code, 'queue_unavailable');
    assert.match(res.json().error.message, /REDIS_URL/);
    assert.ok(Date.now() - t0 < 3000, `took ${Date.now() - t0} ms`);
    assert.equal((await app.inject({ method: 'GET', url: '/health' })).statusCode, 503);
    assert.equal((await app.inject({ method: 'GET', url: '/v1/jobs/x' })).statusCode, 503);
    const metrics = await app.inject({ method: 'GET', url: '/metrics' });
    assert.equal(metrics.statusCode, 200);
    assert.match(metrics.body, /strata_redis_up 0/);
  } finally {
    await app.close();
    await queue.close();
  }

  // A running service whose Redis goes away: requests fail with 503, health turns 503; nothing crashes.
  const own = await startPrivateRedis();
  const svc = await startCoordinatorService({
    redisUrl: own.url, host: '127.0.0.1', port: 0, log: quiet, tokenizer: null, pipeline: gpt2, spec: gpt2.spec, pipelineInfo: stagesOf(gpt2),
    modelName: 'gpt2-tiny', queueName: uniqueQueueName('api-stop'),
  });
  try {
    const ok = await post(svc, '/v1/completions', { prompt: gpt2Case.input_ids, max_tokens: 3, temperature: 0 });
    assert.deepEqual((await ok.json()).choices[0].token_ids, gpt2Case.output_ids.slice(0, 3));
    await own.stop();
    const down = await post(svc, '/v1/completions', { prompt: gpt2Case.input_ids, max_tokens: 3, temperature: 0 });
    assert.equal(down.status, 503);
    assert.equal((await down.json()).error.code, 'queue_unavailable');
    assert.equal((await fetch(`${svc.url}/health`)).status, 503);
  } finally {
    await svc.close();
    await own.stop();
  }
});
