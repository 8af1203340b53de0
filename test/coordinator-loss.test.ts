import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { Queue, Worker, type Job } from 'bullmq';
import { Redis } from 'ioredis';
import { pino } from 'pino';
import { loadModelSpec } from '../model/config.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { generate } from '../model/generation.ts';
import { RequestQueue, type TokenProgress } from '../coordinator/queue.ts';
import { buildApi } from '../coordinator/api/index.ts';
import type { GenerateJob, GenerateResultBody } from '../coordinator/api/jobs/types.ts';
import { expected, fixtureDir, testCacheDir } from './helpers/fixtures.ts';
import { redisUrlForTests, uniqueQueueName } from './helpers/redis.ts';

// Coordinator loss: two coordinator processes consume one queue; one is SIGKILLed while it runs jobs. BullMQ's
// stalled-job check (short lock: 2 s) hands its jobs to the survivor, which re-runs them from the start. Every job
// completes exactly once, with the greedy output of a fault-free run; a client following the progress stream sees
// the restart and shows no token twice; resubmitting a job id (an idempotency key) never runs it again.

const CHILD = fileURLToPath(new URL('./helpers/coordinator-child.ts', import.meta.url));
const prefix = 'strata-test-loss';
const LOCK_MS = 2000;
const STEP_DELAY_MS = 40; // test-only artificial delay per pipeline step (see the helper)
const MAX_TOKENS = 50;
const N = 8;
const quiet = pino({ level: 'silent' });

interface Child {
  proc: ChildProcess;
  url: string;
  name: string;
  running: Set<string>;
  streaming: Set<string>;
  ran: Set<string>;
  completed: Set<string>;
}

let redis: { url: string; stop: () => Promise<void> };
const queueName = uniqueQueueName('loss');
const rerunQueue = uniqueQueueName('loss-rerun');
const children: Child[] = [];
let rq: RequestQueue;

function startChild(name: string): Promise<Child> {
  const proc = spawn(process.execPath, ['--import', 'tsx', CHILD], {
    env: {
      ...process.env, REDIS_URL: redis.url, STRATA_TEST_QUEUE: queueName, STRATA_TEST_PREFIX: prefix, STRATA_JOB_LOCK_MS: String(LOCK_MS),
      STRATA_TEST_CONCURRENCY: '4', STRATA_TEST_STEP_DELAY_MS: String(STEP_DELAY_MS),
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  proc.stderr!.on('data', (d) => (stderr = (stderr + d).slice(-4000)));
  const child: Child = { proc, url: '', name, running: new Set(), streaming: new Set(), ran: new Set(), completed: new Set() };
  children.push(child);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`coordinator ${name} did not start: ${stderr}`)), 30_000);
    proc.once('exit', (code) => reject(new Error(`coordinator ${name} exited (${code}) before it was ready: ${stderr}`)));
    createInterface({ input: proc.stdout! }).on('line', (line) => {
      const msg = JSON.parse(line) as { event: string; url?: string; jobId?: string };
      if (msg.event === 'ready') {
        clearTimeout(timer);
        child.url = msg.url!;
        resolve(child);
      } else if (msg.event === 'active') {
        child.running.add(msg.jobId!);
        child.ran.add(msg.jobId!);
      } else if (msg.event === 'token') child.streaming.add(msg.jobId!);
      else if (msg.event === 'completed') {
        child.completed.add(msg.jobId!);
        child.running.delete(msg.jobId!);
        child.streaming.delete(msg.jobId!);
      }
    });
  });
}

async function until(cond: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

before(async () => {
  testCacheDir(); // the children inherit STRATA_CACHE_DIR and reuse the graphs built here
  redis = await redisUrlForTests();
});

after(async () => {
  for (const c of children) if (c.proc.exitCode === null && c.proc.signalCode === null) c.proc.kill('SIGKILL');
  const connection = new Redis(redis.url);
  for (const name of [queueName, rerunQueue]) await new Queue(name, { connection, prefix }).obliterate({ force: true }).catch(() => {});
  connection.disconnect();
  await rq?.close();
  await redis?.stop();
});

/** A client reading a job's progress stream: keeps what it showed, drops overlaps, notices restarts. */
function streamReader() {
  const shown: number[] = [];
  let restarts = 0;
  let conflicts = 0;
  return {
    shown,
    get restarts() { return restarts; },
    get conflicts() { return conflicts; },
    onProgress(p: TokenProgress) {
      if (p.restart) restarts++;
      if (p.offset > shown.length) return; // a gap: the final result fills it
      const overlap = p.tokens.slice(0, shown.length - p.offset);
      if (overlap.some((t, i) => t !== shown[p.offset + i])) conflicts++;
      shown.push(...p.tokens.slice(shown.length - p.offset));
    },
  };
}

test('a coordinator SIGKILLed during active jobs: its jobs re-run on the other, each completes exactly once', { timeout: 90_000 }, async () => {
  const base = expected('gpt2-tiny').generate![0].input_ids; // 5 tokens: 5 + 50 fit the context of 64
  const prompts = Array.from({ length: N }, (_, i) => base.map((t) => (t + 17 * i) % 256));
  // Fault-free greedy outputs, in this process.
  const solo = await LocalPipeline.load(fixtureDir('gpt2-tiny'), 2);
  const want = await Promise.all(prompts.map(async (p) => (await generate(solo, p, { maxNewTokens: MAX_TOKENS, eosTokenId: solo.spec.eosTokenId })).outputIds));
  await solo.close();

  const [a, b] = await Promise.all([startChild('A'), startChild('B')]);
  rq = await RequestQueue.open({ redisUrl: redis.url, prefix, queueName, log: quiet });
  await rq.events.waitUntilReady();
  const completedEvents = new Map<string, number>();
  rq.events.on('completed', ({ jobId }) => completedEvents.set(jobId, (completedEvents.get(jobId) ?? 0) + 1));

  const payload = (i: number): GenerateJob => ({ kind: 'generate', prompt_ids: prompts[i], max_tokens: MAX_TOKENS, temperature: 0 });
  // A client follows each job's progress events (any BullMQ reader can), by job id.
  const readers = prompts.map(() => streamReader());
  rq.events.on('progress', ({ jobId, data }) => {
    if (jobId.startsWith('loss-')) readers[Number(jobId.slice(5))].onProgress(data as unknown as TokenProgress);
  });
  // Half the jobs come over HTTP as SSE streams to B's API, half from a plain producer; each with its own job id.
  const sse = await Promise.all(prompts.slice(0, N / 2).map((p, i) =>
    fetch(`${b.url}/v1/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': `loss-${i}` },
      body: JSON.stringify({ prompt: p, max_tokens: MAX_TOKENS, temperature: 0, stream: true }),
    })));
  for (const [i, res] of sse.entries()) {
    assert.equal(res.status, 200);
    assert.equal(res.headers.get('x-strata-job-id'), `loss-${i}`);
  }
  const subs = await Promise.all(prompts.map(async (_, i) => (i < N / 2 ? null : rq.submit(payload(i), { jobId: `loss-${i}`, timeoutMs: 60_000 }))));

  // Kill A once it is generating for at least two jobs.
  await until(() => a.streaming.size >= 2, 30_000, 'coordinator A to stream tokens of two jobs');
  const seenRunning = [...a.running];
  a.proc.kill('SIGKILL');
  const t0 = Date.now();

  const results = await Promise.all(subs.map(async (sub, i) => {
    if (sub) return ((await sub.result) as GenerateResultBody).choices[0];
    // The SSE stream on B: chunks add up to the whole continuation, each token once, no error event.
    const events = (await sse[i].text()).split('\n\n').filter((e) => e.trim()).map((e) => e.slice(6));
    assert.equal(events.pop(), '[DONE]');
    const chunks = events.map((e) => JSON.parse(e) as { error?: unknown; choices: { token_ids: number[]; finish_reason: string | null }[] });
    assert.ok(chunks.every((c) => !c.error), JSON.stringify(chunks.find((c) => c.error)));
    return { token_ids: chunks.flatMap((c) => c.choices[0].token_ids), finish_reason: chunks.at(-1)!.choices[0].finish_reason };
  }));
  const recoveredIn = Date.now() - t0;
  await new Promise((r) => setTimeout(r, 500)); // a duplicate completion would arrive by now

  // The jobs A lost: those it was seen running, plus any it took in the instant before it died.
  const lost: string[] = [];
  for (let i = 0; i < N; i++) if (((await rq.getJob(`loss-${i}`)) as Job).stalledCounter > 0) lost.push(`loss-${i}`);
  for (const id of seenRunning) assert.ok(lost.includes(id), `job ${id} was running on A when it died but did not stall`);
  for (const id of lost) assert.ok(!a.completed.has(id), `job ${id} completed on A and stalled too`);
  for (let i = 0; i < N; i++) {
    const id = `loss-${i}`;
    assert.deepEqual(results[i].token_ids, want[i], `job ${id}: greedy output differs from the fault-free run`);
    assert.equal(results[i].finish_reason, 'length');
    assert.equal(completedEvents.get(id), 1, `job ${id} completed ${completedEvents.get(id) ?? 0} times`);
    const job = (await rq.getJob(id)) as Job;
    assert.equal(await job.getState(), 'completed');
    assert.deepEqual((job.returnvalue as GenerateResultBody).choices[0].token_ids, want[i]);
    if (lost.includes(id)) {
      // One run on A (lost when A died), one on B from the start.
      assert.equal(job.attemptsStarted, 2, `job ${id} was running on A: started ${job.attemptsStarted} times`);
      assert.equal(job.stalledCounter, 1, `job ${id} was running on A: stalled ${job.stalledCounter} times`);
      assert.ok(b.ran.has(id), `job ${id} was not re-run on B`);
    } else {
      assert.equal(job.attemptsStarted, 1, `job ${id} did not stall yet started ${job.attemptsStarted} times`);
    }
    assert.equal(job.attemptsMade, 1, 'one processing attempt finished (a stall is not a failed attempt)');
    // The client's view of the stream: every token once, in order, whatever happened.
    assert.equal(readers[i].conflicts, 0);
    assert.deepEqual(readers[i].shown, want[i].slice(0, readers[i].shown.length));
    if (lost.includes(id) && readers[i].shown.length > 0) assert.ok(readers[i].restarts >= 1, `job ${id}: the re-run's stream did not say restart`);
  }
  assert.ok(seenRunning.length >= 2, `A had ${seenRunning.length} jobs running when it was killed`);
  const restarted = lost.filter((id) => readers[Number(id.slice(5))].restarts > 0).length;
  console.log(`${N} jobs, ${lost.length} lost with coordinator A (${lost.join(', ')}), all completed once; recovery + rest took ${recoveredIn} ms (lock ${LOCK_MS} ms); ${restarted} streams showed the restart`);

  // Resubmitting a job id follows the finished job: its stored result, no second run.
  const last = `loss-${N - 1}`;
  const counts = await rq.counts();
  const again = await rq.submit(payload(N - 1), { jobId: last });
  assert.equal(again.existing, true);
  assert.deepEqual(((await again.result) as GenerateResultBody).choices[0].token_ids, want[N - 1]);
  // A plain BullMQ add with the same id is a no-op too.
  await rq.queue.add('generate', payload(N - 1), { jobId: last });
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(await rq.counts(), counts);
  assert.equal(((await rq.getJob(last)) as Job).attemptsStarted, lost.includes(last) ? 2 : 1);
  assert.equal(completedEvents.get(last), 1);
  // A different request under a used id is refused.
  await assert.rejects(rq.submit(payload(1), { jobId: last }), { code: 'idempotency_key_reused' });
  // The same over HTTP for a job that came over HTTP (and re-ran, when A had it): the stored answer at once.
  const replay = await fetch(`${b.url}/v1/completions`, {
    method: 'POST', headers: { 'content-type': 'application/json', 'idempotency-key': 'loss-0' },
    body: JSON.stringify({ prompt: prompts[0], max_tokens: MAX_TOKENS, temperature: 0, n: 1 }),
  });
  assert.equal(replay.status, 200);
  assert.deepEqual((await replay.json()).choices[0].token_ids, want[0]);
  assert.deepEqual(await rq.counts(), counts);
  assert.equal(completedEvents.get('loss-0'), 1);

  // Over HTTP (on the survivor): Idempotency-Key → one job, however often (and however concurrently) it is sent.
  const post = (body: object, headers: Record<string, string> = {}) =>
    fetch(`${b.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) });
  const body = { prompt: prompts[2], max_tokens: 8, temperature: 0, stream: false };
  const twice = await Promise.all([post(body, { 'idempotency-key': 'http-key-1' }), post(body, { 'idempotency-key': 'http-key-1' })]);
  for (const res of twice) {
    assert.equal(res.status, 200);
    assert.equal(res.headers.get('x-strata-job-id'), 'http-key-1');
    const out = await res.json();
    assert.equal(out.id, 'cmpl-http-key-1');
    assert.deepEqual(out.choices[0].token_ids, want[2].slice(0, 8));
  }
  const third = await post({ ...body, job_id: 'http-key-1' });
  assert.equal(third.status, 200);
  assert.equal(((await rq.getJob('http-key-1')) as Job).attemptsStarted, 1);
  const other = await post({ ...body, max_tokens: 9 }, { 'idempotency-key': 'http-key-1' });
  assert.equal(other.status, 422);
  assert.equal((await other.json()).error.code, 'idempotency_key_reused');
  const badKey = await post(body, { 'idempotency-key': '12345' });
  assert.equal(badKey.status, 400);
  assert.equal((await badKey.json()).error.code, 'invalid_job_id');

  b.proc.kill('SIGTERM');
  await new Promise((r) => b.proc.once('exit', r));
});

test('SSE across a re-run: the overlap is not sent twice; a re-run that disagrees ends the stream with stream_restarted', { timeout: 30_000 }, async () => {
  // A stand-in consumer whose first run streams 3 tokens and fails (as a run lost with its coordinator would
  // stop); BullMQ runs the job again and the second run streams from offset 0, marked restart.
  const queue = await RequestQueue.open({ redisUrl: redis.url, prefix, queueName: rerunQueue, log: quiet });
  const app = await buildApi({ queue, spec: loadModelSpec(fixtureDir('gpt2-tiny')), tokenizer: null, modelName: 'm', pipelineInfo: () => ({ stages: [] }), health: () => true });
  await app.listen({ port: 0, host: '127.0.0.1' });
  const url = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`;
  const connection = new Redis(redis.url, { maxRetriesPerRequest: null });
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
  const worker = new Worker(rerunQueue, async (job: Job) => {
    const diverge = (job.data as GenerateJob).prompt_ids![0] === 2;
    const delta = (offset: number, tokens: number[]): TokenProgress => ({ index: 0, offset, tokens, text_offset: 0, text: '', attempt: job.attemptsStarted, ...(offset === 0 && job.attemptsStarted > 1 ? { restart: true } : {}) });
    if (job.attemptsStarted === 1) {
      await job.updateProgress(delta(0, [1, 2]) as unknown as object);
      await job.updateProgress(delta(2, [3]) as unknown as object);
      await sleep(200);
      throw new Error('[unavailable/stage_unavailable] the run was lost');
    }
    const ids = diverge ? [1, 9, 9, 9, 9] : [1, 2, 3, 4, 5];
    await job.updateProgress(delta(0, ids.slice(0, 4)) as unknown as object);
    await sleep(100);
    return { kind: 'generate', prompt_ids: [1], choices: [{ index: 0, token_ids: ids, finish_reason: 'length' }], usage: { prompt_tokens: 1, completion_tokens: 5, total_tokens: 6 } };
  }, { connection, prefix });
  try {
    const stream = async (first: number) => {
      const res = await fetch(`${url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: [first, 5], max_tokens: 5, temperature: 0, stream: true }) });
      assert.equal(res.status, 200);
      const events = (await res.text()).split('\n\n').filter((e) => e.trim()).map((e) => e.slice(6));
      assert.equal(events.pop(), '[DONE]');
      return { jobId: res.headers.get('x-strata-job-id')!, chunks: events.map((e) => JSON.parse(e) as { error?: { code: string; message: string }; choices?: { token_ids: number[] }[] }) };
    };
    const same = await stream(1);
    assert.deepEqual(same.chunks.flatMap((c) => c.choices?.[0].token_ids ?? []), [1, 2, 3, 4, 5]);
    assert.ok(same.chunks.every((c) => !c.error));
    assert.ok(same.chunks.length >= 3, 'tokens of the first run were streamed before it failed');

    const other = await stream(2);
    const error = other.chunks.at(-1)!.error!;
    assert.equal(error.code, 'stream_restarted');
    assert.match(error.message, new RegExp(`GET /v1/jobs/${other.jobId}`));
    assert.deepEqual(other.chunks.flatMap((c) => c.choices?.[0].token_ids ?? []), [1, 2, 3], 'nothing of the disagreeing re-run was sent');
    const job = await (await fetch(`${url}/v1/jobs/${other.jobId}`)).json();
    assert.equal(job.state, 'completed');
    assert.deepEqual(job.result.choices[0].token_ids, [1, 9, 9, 9, 9]);
    assert.equal(job.attemptsStarted, 2);
  } finally {
    await worker.close();
    connection.disconnect();
    await app.close();
    await queue.close();
  }
});
