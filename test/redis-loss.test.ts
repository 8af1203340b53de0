import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { buildApi } from '../coordinator/api/index.ts';
import { RequestQueue, startQueueWorker } from '../coordinator/queue.ts';
import { startCoordinatorService } from '../coordinator/service.ts';
import type { GenerateResultBody } from '../coordinator/api/jobs/types.ts';
import { expected, fixtureDir, testCacheDir } from './helpers/fixtures.ts';
import { freePort, redisAnswers } from './helpers/redis.ts';

// Redis loss: the API answers 503 while its Redis is down and recovers by itself when it returns; jobs accepted
// before a Redis crash survive it (AOF) and complete once a consumer runs; a password in REDIS_URL works and never
// reaches a log line or an error message. Each case owns a private redis-server (its own port and data dir).

const gpt2Case = expected('gpt2-tiny').generate![0];
const quiet = pino({ level: 'silent' });
let gpt2: LocalPipeline;
const dirs: string[] = [];
const servers = new Set<ChildProcess>();

before(async () => {
  testCacheDir();
  gpt2 = await LocalPipeline.load(fixtureDir('gpt2-tiny'), 2);
});

after(async () => {
  for (const s of servers) s.kill('SIGKILL');
  await gpt2?.close();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

interface Server {
  url: string;
  /** SIGTERM = Redis's SHUTDOWN (flushes the AOF); SIGKILL = a crash. */
  stop(signal?: NodeJS.Signals): Promise<void>;
}

/** redis-server with AOF in `dir` on `port`; `password` sets requirepass. */
async function startRedis(port: number, dir: string, opts: { password?: string; fsync?: 'always' | 'everysec' } = {}): Promise<Server> {
  const args = ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--appendonly', 'yes', '--appendfsync', opts.fsync ?? 'everysec', '--save', ''];
  if (opts.password) args.push('--requirepass', opts.password);
  const child = spawn('redis-server', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  servers.add(child);
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const url = `redis://${opts.password ? `:${encodeURIComponent(opts.password)}@` : ''}127.0.0.1:${port}`;
  const deadline = Date.now() + 10_000;
  while (!(await redisAnswers(url, 500))) {
    if (child.exitCode !== null || Date.now() > deadline) throw new Error(`redis-server did not start on port ${port} (is it installed?)`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    url,
    async stop(signal = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      await exited;
      servers.delete(child);
    },
  };
}

const tmp = () => {
  const d = mkdtempSync(join(tmpdir(), 'strata-redis-loss-'));
  dirs.push(d);
  return d;
};
const stagesOf = (p: LocalPipeline) => () => ({ stages: p.prepared.map((s) => ({ blocks: [s.range.first, s.range.last] as [number, number], address: 'in-process', healthy: true })) });
const completion = (url: string, max = 4, headers: Record<string, string> = {}) =>
  fetch(`${url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify({ prompt: gpt2Case.input_ids, max_tokens: max, temperature: 0 }) });

test('the API answers 503 while Redis is down and recovers by itself when it returns on the same port', { timeout: 30_000 }, async () => {
  const port = await freePort();
  const dir = tmp();
  let redis = await startRedis(port, dir);
  const svc = await startCoordinatorService({
    redisUrl: redis.url, host: '127.0.0.1', port: 0, log: quiet, tokenizer: null, pipeline: gpt2, spec: gpt2.spec, pipelineInfo: stagesOf(gpt2), modelName: 'gpt2-tiny', queueName: 'strata-loss-a',
  });
  try {
    const ok = await completion(svc.url);
    assert.equal(ok.status, 200);
    assert.deepEqual((await ok.json()).choices[0].token_ids, gpt2Case.output_ids.slice(0, 4));

    await redis.stop('SIGTERM');
    for (let i = 0; i < 3; i++) {
      const t0 = Date.now();
      const down = await completion(svc.url);
      assert.equal(down.status, 503);
      const err = (await down.json()).error;
      assert.equal(err.code, 'queue_unavailable');
      assert.equal(err.type, 'service_unavailable');
      assert.ok(Date.now() - t0 < 3000, `a 503 took ${Date.now() - t0} ms`);
    }
    assert.equal((await fetch(`${svc.url}/health`)).status, 503);
    assert.equal((await fetch(`${svc.url}/v1/jobs/anything`)).status, 503);
    assert.match(await (await fetch(`${svc.url}/metrics`)).text(), /strata_redis_up 0/);

    redis = await startRedis(port, dir);
    const t0 = Date.now();
    let status = 0;
    while (Date.now() - t0 < 15_000) {
      const res = await completion(svc.url);
      status = res.status;
      if (status === 200) {
        assert.deepEqual((await res.json()).choices[0].token_ids, gpt2Case.output_ids.slice(0, 4));
        break;
      }
      await res.body?.cancel();
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.equal(status, 200, 'the API did not recover after Redis came back');
    console.log(`API served again ${Date.now() - t0} ms after Redis came back`);
    assert.equal((await fetch(`${svc.url}/health`)).status, 200);
    // The consumer is back too: several at once, all answered.
    const many = await Promise.all(Array.from({ length: 5 }, () => completion(svc.url, 12)));
    for (const r of many) assert.deepEqual((await r.json()).choices[0].token_ids, gpt2Case.output_ids);
  } finally {
    await svc.close();
    await redis.stop();
  }
});

test('jobs accepted before Redis crashes survive the restart (AOF) and complete once a consumer starts', { timeout: 30_000 }, async () => {
  const port = await freePort();
  const dir = tmp();
  // appendfsync always: every accepted job is on disk before the client hears "accepted", so even SIGKILL loses
  // none (with Redis's default everysec a crash may lose the last second of writes).
  let redis = await startRedis(port, dir, { fsync: 'always' });
  const queueName = 'strata-loss-b';
  const queue = await RequestQueue.open({ redisUrl: redis.url, queueName, log: quiet });
  const app = await buildApi({ queue, spec: gpt2.spec, tokenizer: null, modelName: 'gpt2-tiny', pipelineInfo: stagesOf(gpt2), health: () => true });
  await app.listen({ port: 0, host: '127.0.0.1' });
  const url = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`;
  let worker: Awaited<ReturnType<typeof startQueueWorker>> | undefined;
  try {
    // No consumer yet: three HTTP requests wait for their jobs, two more jobs are fire-and-forget.
    const waiting = Array.from({ length: 3 }, (_, i) => completion(url, 12, { 'idempotency-key': `http-${i}` }));
    const queued = [
      await queue.enqueue({ kind: 'generate', prompt_ids: gpt2Case.input_ids, max_tokens: 6, temperature: 0 }, { jobId: 'plain-0' }),
      await queue.enqueue({ kind: 'generate', prompt_ids: gpt2Case.input_ids, max_tokens: 7, temperature: 0 }, { jobId: 'plain-1' }),
    ];
    const deadline = Date.now() + 5000;
    while ((await queue.waitingCount()) < 5) {
      assert.ok(Date.now() < deadline, 'the jobs were not all queued');
      await new Promise((r) => setTimeout(r, 20));
    }

    await redis.stop('SIGKILL');
    redis = await startRedis(port, dir, { fsync: 'always' });
    worker = await startQueueWorker({ redisUrl: redis.url, queueName, pipeline: gpt2, spec: gpt2.spec, tokenizer: null, log: quiet });

    const answers = await Promise.all(waiting);
    for (const [i, res] of answers.entries()) {
      assert.equal(res.status, 200, `request ${i}`);
      assert.equal(res.headers.get('x-strata-job-id'), `http-${i}`);
      assert.deepEqual((await res.json()).choices[0].token_ids, gpt2Case.output_ids);
    }
    // The producer's fail-fast connection reconnects on its own backoff: wait for it before reading jobs.
    for (const until = Date.now() + 10_000; !(await queue.ping()); ) {
      assert.ok(Date.now() < until, 'the producer did not reconnect to the restarted Redis');
      await new Promise((r) => setTimeout(r, 100));
    }
    for (const [i, id] of queued.entries()) {
      let job = await queue.getJob(id);
      const until = Date.now() + 10_000;
      while (job && (await job.getState()) !== 'completed' && Date.now() < until) {
        await new Promise((r) => setTimeout(r, 50));
        job = await queue.getJob(id);
      }
      assert.ok(job, `job ${id} was lost with the Redis crash`);
      assert.equal(await job.getState(), 'completed');
      assert.deepEqual((job.returnvalue as GenerateResultBody).choices[0].token_ids, gpt2Case.output_ids.slice(0, 6 + i));
    }
  } finally {
    await worker?.close();
    await app.close();
    await queue.close();
    await redis.stop();
  }
});

test('a Redis password in the URL works and never appears in logs or error messages', { timeout: 30_000 }, async () => {
  const password = 'S3cr3t-p@ss:w/rd#42';
  const wrong = 'Wr0ng-p@ss#17';
  const encoded = (p: string) => encodeURIComponent(p);
  const lines: string[] = [];
  const log = pino({ level: 'debug' }, new Writable({ write(chunk, _enc, cb) { lines.push(String(chunk)); cb(); } }));
  const port = await freePort();
  const dir = tmp();
  let redis = await startRedis(port, dir, { password });
  assert.ok(redis.url.includes(encoded(password)));
  const badUrl = redis.url.replace(encoded(password), encoded(wrong));
  const svc = await startCoordinatorService({
    redisUrl: redis.url, host: '127.0.0.1', port: 0, log, tokenizer: null, pipeline: gpt2, spec: gpt2.spec, pipelineInfo: stagesOf(gpt2), modelName: 'gpt2-tiny', queueName: 'strata-loss-c',
  });
  const messages: string[] = [];
  try {
    const ok = await completion(svc.url, 3);
    assert.equal(ok.status, 200);
    assert.deepEqual((await ok.json()).choices[0].token_ids, gpt2Case.output_ids.slice(0, 3));

    // Redis goes away and comes back: warnings are logged (with the URL), then it serves again.
    await redis.stop('SIGTERM');
    const down = await completion(svc.url, 3);
    assert.equal(down.status, 503);
    messages.push(JSON.stringify(await down.json()));
    await new Promise((r) => setTimeout(r, 1000));
    redis = await startRedis(port, dir, { password });
    const t0 = Date.now();
    while ((await completion(svc.url, 3)).status !== 200) {
      assert.ok(Date.now() - t0 < 15_000, 'no recovery');
      await new Promise((r) => setTimeout(r, 200));
    }

    // The wrong password: the consumer refuses to start, the producer answers 503; neither says the password.
    await assert.rejects(startQueueWorker({ redisUrl: badUrl, queueName: 'strata-loss-c', pipeline: gpt2, spec: gpt2.spec, tokenizer: null, log, startupTimeoutMs: 2000 }), (e: Error) => {
      messages.push(e.message);
      return /queue_unavailable|not reachable|Redis/.test(e.message);
    });
    const queue = await RequestQueue.open({ redisUrl: badUrl, queueName: 'strata-loss-c', log });
    const app = await buildApi({ queue, spec: gpt2.spec, tokenizer: null, modelName: 'm', pipelineInfo: stagesOf(gpt2), health: () => true, logger: log });
    const refused = await app.inject({ method: 'POST', url: '/v1/completions', payload: { prompt: [1, 2], max_tokens: 2 } });
    assert.equal(refused.statusCode, 503);
    messages.push(refused.body);
    await app.close();
    await queue.close();
  } finally {
    await svc.close();
    await redis.stop();
  }
  const all = lines.join('') + messages.join('\n');
  assert.ok(lines.length > 5, `only ${lines.length} log lines captured`);
  assert.ok(all.includes('***'), 'no redacted URL was logged, so the redaction was never exercised');
  for (const secret of [password, wrong, encoded(password), encoded(wrong), 'S3cr3t', 'Wr0ng']) {
    assert.ok(!all.includes(secret), `the password (${secret}) appears in a log line or message`);
  }
  if (process.env.DEBUG_LOGS) console.log(lines.join(""));
  console.log(`${lines.length} log lines and ${messages.length} error messages checked: no password`);
});
