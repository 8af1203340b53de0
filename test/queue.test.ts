import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { Queue, QueueEvents, type Job } from 'bullmq';
import { Redis } from 'ioredis';
import { pino } from 'pino';
import { StrataError } from '../model/errors.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { generate, type PipelineStep, type Stepper } from '../model/generation.ts';
import type { StrataTokenizer } from '../model/tokenizer.ts';
import {
  checkEvictionPolicy, formatFailure, parseFailure, QUEUE_NAME, RequestQueue, startQueueWorker, type QueueWorkerHandle, type TokenProgress,
} from '../coordinator/queue.ts';
import type { GenerateResultBody } from '../coordinator/api/jobs/types.ts';
import { expected, fixtureDir, testCacheDir } from './helpers/fixtures.ts';
import { redisUrlForTests, uniqueQueueName } from './helpers/redis.ts';
import { byteLevelTokenizer } from './helpers/byte-tokenizer.ts';

// The queue contract: what any BullMQ producer can enqueue, how the consumer serves, fails, retries, orders and
// stops. Real Redis, real ORT (LocalPipeline on the gpt2-tiny fixture).

const gpt2Case = expected('gpt2-tiny').generate![0];
const prefix = 'strata-test-queue';
const quiet = pino({ level: 'silent' });

let redis: { url: string; stop: () => Promise<void> };
let gpt2: LocalPipeline;
const cleanups: (() => Promise<unknown>)[] = [];
const names: string[] = [];
const queueName = (tag: string) => {
  names.push(uniqueQueueName(tag));
  return names.at(-1)!;
};

before(async () => {
  testCacheDir();
  redis = await redisUrlForTests();
  gpt2 = await LocalPipeline.load(fixtureDir('gpt2-tiny'), 2);
});

after(async () => {
  for (const c of cleanups.reverse()) await c();
  // Leave nothing behind in a shared REDIS_URL.
  const connection = new Redis(redis.url);
  for (const name of names) await new Queue(name, { connection, prefix }).obliterate({ force: true });
  connection.disconnect();
  await gpt2?.close();
  await redis?.stop();
});

/** A plain BullMQ producer and listener, as a non-strata client would write them. */
function plainClient(name: string) {
  const connection = new Redis(redis.url, { maxRetriesPerRequest: null });
  const listener = new Redis(redis.url, { maxRetriesPerRequest: null });
  const queue = new Queue(name, { connection, prefix });
  const events = new QueueEvents(name, { connection: listener, prefix });
  cleanups.push(async () => {
    await events.close();
    await queue.close();
    connection.disconnect();
    listener.disconnect();
  });
  return { queue, events };
}

async function worker(name: string, pipeline: Stepper = gpt2, extra: { tokenizer?: StrataTokenizer | null; concurrency?: number } = {}): Promise<QueueWorkerHandle> {
  const w = await startQueueWorker({ redisUrl: redis.url, prefix, queueName: name, pipeline, spec: gpt2.spec, tokenizer: extra.tokenizer ?? null, concurrency: extra.concurrency, log: quiet });
  cleanups.push(() => w.close());
  return w;
}

test('the queue name is exported for foreign producers', () => {
  assert.equal(QUEUE_NAME, 'strata-requests');
});

test('a job from a plain BullMQ producer is served; its tokens stream as progress events', async () => {
  const name = queueName('plain');
  await worker(name);
  const { queue, events } = plainClient(name);
  await events.waitUntilReady();
  const progress: TokenProgress[] = [];
  events.on('progress', ({ data }) => progress.push(data as unknown as TokenProgress));
  const job = await queue.add('generate', { kind: 'generate', prompt_ids: gpt2Case.input_ids, max_tokens: 12, temperature: 0 });
  const result = (await job.waitUntilFinished(events, 20_000)) as GenerateResultBody;
  assert.equal(result.kind, 'generate');
  assert.deepEqual(result.choices[0].token_ids, gpt2Case.output_ids);
  assert.equal(result.choices[0].finish_reason, 'length');
  assert.deepEqual(result.usage, { prompt_tokens: 5, completion_tokens: 12, total_tokens: 17 });
  // Every progress event was written before the job completed; offsets make the deltas contiguous.
  let offset = 0;
  for (const p of progress) {
    assert.equal(p.offset, offset);
    offset += p.tokens.length;
  }
  assert.deepEqual(progress.flatMap((p) => p.tokens), gpt2Case.output_ids);
});

test('bad jobs fail at once with the reason, and the worker keeps serving', async () => {
  const name = queueName('bad');
  await worker(name);
  const { queue, events } = plainClient(name);
  await events.waitUntilReady();
  const retrying = { attempts: 3, backoff: { type: 'fixed', delay: 50 } };
  const bad: [string, unknown, RegExp][] = [
    ['generate', { kind: 'generate', prompt_ids: [1, 999] }, /^\[invalid_argument\/token_out_of_range\] prompt\[1\] = 999/],
    ['generate', { kind: 'generate', prompt: 'text' }, /tokenizer_missing.*send token ids/],
    ['whatever', { kind: 'dance' }, /invalid_kind/],
    ['generate', null, /invalid_payload/],
    ['fill-mask', { input_ids: [1, 2], mask_index: 0 }, /failed_precondition\/task_unsupported/],
  ];
  for (const [jobName, data, reason] of bad) {
    const job = await queue.add(jobName, data, retrying);
    await assert.rejects(job.waitUntilFinished(events, 10_000), { message: reason });
    const after = (await queue.getJob(job.id!))!;
    assert.equal(await after.getState(), 'failed');
    assert.equal(after.attemptsMade, 1, 'a non-retryable failure must not be retried');
    assert.match(after.failedReason, reason);
  }
  // The kind can come from the job name alone.
  const ok = await queue.add('generate', { prompt_ids: gpt2Case.input_ids, max_tokens: 3, temperature: 0 });
  assert.deepEqual(((await ok.waitUntilFinished(events, 10_000)) as GenerateResultBody).choices[0].token_ids, gpt2Case.output_ids.slice(0, 3));
});

test('a transient pipeline failure is retried with backoff and then succeeds', async () => {
  const name = queueName('retry');
  let failures = 0;
  const flaky: Stepper = {
    async step(id: string, input: PipelineStep) {
      if (failures++ === 0) throw new StrataError('stage_unreachable', 'stage 1 is restarting', 'unavailable');
      return gpt2.step(id, input);
    },
    end: (id) => gpt2.end(id),
  };
  await worker(name, flaky);
  const rq = await RequestQueue.open({ redisUrl: redis.url, prefix, queueName: name, log: quiet });
  cleanups.push(() => rq.close());
  const { jobId, result } = await rq.submit({ kind: 'generate', prompt_ids: gpt2Case.input_ids, max_tokens: 4, temperature: 0 });
  const out = (await result) as GenerateResultBody;
  assert.deepEqual(out.choices[0].token_ids, gpt2Case.output_ids.slice(0, 4));
  const job = (await rq.getJob(jobId))!;
  assert.equal(job.attemptsMade, 2);
});

test('priorities: lower runs first; unprioritized jobs before all of them', async () => {
  const name = queueName('prio');
  const rq = await RequestQueue.open({ redisUrl: redis.url, prefix, queueName: name, log: quiet });
  cleanups.push(() => rq.close());
  // Queue first, then start a one-at-a-time worker that records which prompt each session served.
  const order: number[] = [];
  const recording: Stepper = {
    async step(id, input) {
      if (input.inputIds && input.inputIds.dims[1] > 1) order.push(Number((input.inputIds.data as BigInt64Array)[0]));
      return gpt2.step(id, input);
    },
    end: (id) => gpt2.end(id),
  };
  const job = (first: number, priority?: number) => rq.submit({ kind: 'generate', prompt_ids: [first, 7], max_tokens: 1, temperature: 0 }, { priority });
  const subs = [await job(30, 30), await job(10, 10), await job(1), await job(20, 20)];
  await worker(name, recording, { concurrency: 1 });
  await Promise.all(subs.map((s) => s.result));
  assert.deepEqual(order, [1, 10, 20, 30]);
});

test('text prompts and stop strings with a tokenizer; streamed text adds up to the final text', async () => {
  const tokenizer = await byteLevelTokenizer(gpt2.spec);
  const prompt = 'Hello, world';
  const ids = tokenizer.encode(prompt);
  assert.deepEqual(ids, [...Buffer.from(prompt)]);
  const ref = (await generate(gpt2, ids, { maxNewTokens: 24, eosTokenId: 0 })).outputIds;
  const fullText = tokenizer.decode(ref, { skipSpecialTokens: true });

  const name = queueName('text');
  await worker(name, gpt2, { tokenizer });
  const rq = await RequestQueue.open({ redisUrl: redis.url, prefix, queueName: name, log: quiet });
  cleanups.push(() => rq.close());

  const full = (await (await rq.submit({ kind: 'generate', prompt, max_tokens: 24, temperature: 0 })).result) as GenerateResultBody;
  assert.deepEqual(full.choices[0].token_ids, ref);
  assert.equal(full.choices[0].text, fullText);

  // A stop string from the middle of that text: the answer ends before it, generation ends once it appeared.
  const k = [...Array(fullText.length - 2).keys()].find((i) => i >= 3 && !fullText.slice(i, i + 2).includes('\uFFFD') && fullText.indexOf(fullText.slice(i, i + 2)) === i)!;
  assert.ok(k !== undefined, `no usable stop string in ${JSON.stringify(fullText)}`);
  const stop = fullText.slice(k, k + 2);
  const stopAfter = ref.findIndex((_, j) => tokenizer.decode(ref.slice(0, j + 1), { skipSpecialTokens: true }).includes(stop)) + 1;
  const streamed: TokenProgress[] = [];
  const sub = await rq.submit({ kind: 'generate', prompt, max_tokens: 24, temperature: 0, stop: [stop, 'never-there'] }, { onProgress: (p) => streamed.push(p) });
  const out = (await sub.result) as GenerateResultBody;
  assert.equal(out.choices[0].text, fullText.slice(0, k));
  assert.equal(out.choices[0].finish_reason, 'stop');
  assert.deepEqual(out.choices[0].token_ids, ref.slice(0, stopAfter));
  assert.deepEqual(out.prompt_ids, ids);
  assert.equal(streamed.map((p) => p.text).join(''), out.choices[0].text, 'the stream never shows text past the stop string');
  assert.deepEqual(streamed.flatMap((p) => p.tokens), out.choices[0].token_ids);
});

test('close() lets the active job finish before returning', async () => {
  const name = queueName('close');
  const slow: Stepper = {
    async step(id, input) {
      await new Promise((r) => setTimeout(r, 25));
      return gpt2.step(id, input);
    },
    end: (id) => gpt2.end(id),
  };
  const w = await startQueueWorker({ redisUrl: redis.url, prefix, queueName: name, pipeline: slow, spec: gpt2.spec, tokenizer: null, log: quiet });
  const rq = await RequestQueue.open({ redisUrl: redis.url, prefix, queueName: name, log: quiet });
  cleanups.push(() => rq.close());
  let started!: () => void;
  const active = new Promise<void>((r) => (started = r));
  const sub = await rq.submit({ kind: 'generate', prompt_ids: gpt2Case.input_ids, max_tokens: 12, temperature: 0 }, { onProgress: () => started() });
  await active;
  await w.close();
  const job = (await rq.getJob(sub.jobId)) as Job;
  assert.equal(await job.getState(), 'completed');
  assert.deepEqual((job.returnvalue as GenerateResultBody).choices[0].token_ids, gpt2Case.output_ids);
  assert.deepEqual(((await sub.result) as GenerateResultBody).choices[0].token_ids, gpt2Case.output_ids);
});

test('maxmemory-policy other than noeviction is warned about', async () => {
  const lines: string[] = [];
  const log = pino({ level: 'info' }, new Writable({ write(chunk, _enc, cb) { lines.push(String(chunk)); cb(); } }));
  const fake = (policy: string) => ({ config: async () => ['maxmemory-policy', policy] }) as unknown as Redis;
  assert.equal(await checkEvictionPolicy(fake('allkeys-lru'), log), 'allkeys-lru');
  assert.equal(lines.length, 1);
  assert.match(lines[0], /"level":40.*noeviction/);
  assert.equal(await checkEvictionPolicy(fake('noeviction'), log), 'noeviction');
  assert.equal(lines.length, 1);
  // And the real server answers too.
  const real = new Redis(redis.url);
  try {
    assert.equal(typeof (await checkEvictionPolicy(real, quiet)), 'string');
  } finally {
    real.disconnect();
  }
});

test('failure reasons carry kind and code for the API and stay readable for anyone else', () => {
  const e = parseFailure(formatFailure(new StrataError('prompt_too_long', 'prompt too long; shorten it', 'invalid_argument')));
  assert.deepEqual([e.kind, e.code, e.message], ['invalid_argument', 'prompt_too_long', 'prompt too long; shorten it']);
  const plain = parseFailure('something broke');
  assert.deepEqual([plain.kind, plain.code, plain.message], ['internal', 'job_failed', 'something broke']);
});

