/**
 * A coordinator process for fault tests (test/coordinator-loss.test.ts): startCoordinatorService with a
 * LocalPipeline on the gpt2-tiny fixture. Configured by environment:
 *   REDIS_URL, STRATA_TEST_QUEUE, STRATA_TEST_PREFIX, STRATA_JOB_LOCK_MS (read by the queue worker itself),
 *   STRATA_TEST_CONCURRENCY (default 4), STRATA_TEST_STEP_DELAY_MS (default 0).
 * Prints one JSON line per event on stdout: {"event":"ready","url","pid"}, {"event":"active","jobId"},
 * {"event":"token","jobId"} (first token of each run), {"event":"completed","jobId"}.
 */
import { pino } from 'pino';
import { LocalPipeline } from '../../model/local-pipeline.ts';
import type { PipelineStep, Stepper } from '../../model/generation.ts';
import { startCoordinatorService } from '../../coordinator/service.ts';
import { fixtureDir } from './fixtures.ts';

const say = (obj: object) => process.stdout.write(`${JSON.stringify(obj)}\n`);

const pipeline = await LocalPipeline.load(fixtureDir('gpt2-tiny'), 2, { threads: 1 });

// TEST-ONLY ARTIFICIAL DELAY: each pipeline step sleeps first, so a job lasts long enough (seconds, not
// milliseconds) for the test to kill this process while it is running jobs. Not part of strata.
const delayMs = Number(process.env.STRATA_TEST_STEP_DELAY_MS ?? 0);
const slowed: Stepper = {
  async step(id: string, input: PipelineStep) {
    if (delayMs > 0) await new Promise((r) => setTimeout(r, delayMs));
    return pipeline.step(id, input);
  },
  end: (id: string) => pipeline.end(id),
};

const service = await startCoordinatorService({
  pipeline: slowed,
  spec: pipeline.spec,
  tokenizer: null,
  redisUrl: process.env.REDIS_URL,
  queueName: process.env.STRATA_TEST_QUEUE,
  prefix: process.env.STRATA_TEST_PREFIX,
  host: '127.0.0.1',
  port: 0,
  concurrency: Number(process.env.STRATA_TEST_CONCURRENCY ?? 4),
  modelName: 'gpt2-tiny',
  pipelineInfo: () => ({ stages: pipeline.prepared.map((s) => ({ blocks: [s.range.first, s.range.last] as [number, number], address: 'in-process', pid: process.pid, healthy: true })) }),
  log: pino({ level: process.env.STRATA_LOG_LEVEL ?? 'silent' }, pino.destination(2)),
});

const w = service.worker.worker;
w.on('active', (job) => say({ event: 'active', jobId: job.id }));
w.on('progress', (job, p) => {
  if ((p as { offset?: number }).offset === 0) say({ event: 'token', jobId: job.id });
});
w.on('completed', (job) => say({ event: 'completed', jobId: job.id }));
say({ event: 'ready', url: service.url, pid: process.pid });

const stop = async () => {
  await service.close();
  await pipeline.close();
  process.exit(0);
};
process.once('SIGTERM', stop);
process.once('SIGINT', stop);
