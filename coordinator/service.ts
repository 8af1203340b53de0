import type { FastifyInstance } from 'fastify';
import { pino, type Logger } from 'pino';
import type { ModelSpec } from '../model/config.ts';
import type { StrataTokenizer } from '../model/tokenizer.ts';
import type { ChatTemplate } from '../model/chat-template.ts';
import type { ServingPipeline } from './api/jobs/types.ts';
import { buildApi, type StageInfo } from './api/index.ts';
import { RequestQueue, redisUrlFromEnv, startQueueWorker, type QueueWorkerHandle } from './queue.ts';

/**
 * The coordinator as one service: the queue consumer running jobs on the pipeline, and the HTTP API feeding the
 * same queue. What `strata up` and `strata coordinator` start.
 */
export interface CoordinatorServiceOptions {
  pipeline: ServingPipeline;
  spec: ModelSpec;
  tokenizer: StrataTokenizer | null;
  /** Default `REDIS_URL`, else redis://127.0.0.1:6379. */
  redisUrl?: string;
  /** Default 8080; 0 = any free port. */
  port?: number;
  /** Default `STRATA_HOST`, else 0.0.0.0. */
  host?: string;
  pipelineInfo: () => { stages: StageInfo[] };
  /** Default: every stage in pipelineInfo() is healthy. */
  health?: () => boolean;
  /** Merged into /health's body: why it is 503 (e.g. which stage is still loading). */
  healthDetail?: () => Record<string, unknown>;
  /** Default `STRATA_API_TOKEN`. */
  authToken?: string;
  /** Jobs run at once (default 8). */
  concurrency?: number;
  /** Name clients pass as `model` (default the config's model_type). */
  modelName?: string;
  queueName?: string;
  prefix?: string;
  maxQueued?: number;
  /** A chat template overriding the tokenizer's (--chat-template FILE). */
  chatTemplate?: ChatTemplate;
  /** Job lock / stalled-job recovery (see QueueWorkerOptions; defaults from `STRATA_JOB_*`). */
  lockDurationMs?: number;
  stalledIntervalMs?: number;
  maxStalledCount?: number;
  log?: Logger;
}

export interface CoordinatorService {
  /** Where the API listens (a 0.0.0.0 bind is reported as 127.0.0.1). */
  url: string;
  app: FastifyInstance;
  queue: RequestQueue;
  worker: QueueWorkerHandle;
  /** Stops taking requests, lets active jobs finish, releases Redis. Waiting jobs stay queued for another replica. */
  close(): Promise<void>;
}

export async function startCoordinatorService(opts: CoordinatorServiceOptions): Promise<CoordinatorService> {
  const log = opts.log ?? pino({ name: 'strata-coordinator', level: process.env.STRATA_LOG_LEVEL ?? 'info' });
  const redisUrl = opts.redisUrl ?? redisUrlFromEnv();
  const q = { redisUrl, queueName: opts.queueName, prefix: opts.prefix, log };
  // The worker first: it fails fast, naming REDIS_URL, when Redis is not there at startup.
  const worker = await startQueueWorker({
    ...q, pipeline: opts.pipeline, spec: opts.spec, tokenizer: opts.tokenizer, concurrency: opts.concurrency,
    lockDurationMs: opts.lockDurationMs, stalledIntervalMs: opts.stalledIntervalMs, maxStalledCount: opts.maxStalledCount,
  });
  let queue: RequestQueue | undefined;
  let app: FastifyInstance | undefined;
  try {
    queue = await RequestQueue.open(q);
    app = await buildApi({
      queue, spec: opts.spec, tokenizer: opts.tokenizer, modelName: opts.modelName ?? opts.spec.modelType,
      pipelineInfo: opts.pipelineInfo,
      health: opts.health ?? (() => opts.pipelineInfo().stages.every((s) => s.healthy)), healthDetail: opts.healthDetail,
      authToken: opts.authToken, maxQueued: opts.maxQueued, chatTemplate: opts.chatTemplate, canEmbed: typeof opts.pipeline.embed === 'function', logger: log,
    });
    const host = opts.host ?? process.env.STRATA_HOST ?? '0.0.0.0';
    await app.listen({ port: opts.port ?? 8080, host });
    const { port } = app.server.address() as { port: number };
    const shown = host === '0.0.0.0' || host === '::' ? '127.0.0.1' : host.includes(':') ? `[${host}]` : host;
    const url = `http://${shown}:${port}`;
    log.info({ url, queue: queue.name }, 'coordinator API listening');

    // Stop accepting HTTP first, then let active jobs finish (their requests get answers), then release whoever
    // still waits on a queued job (503: the job stays in Redis for another replica). Callers run this on SIGTERM.
    let closing: Promise<void> | null = null;
    const close = () => (closing ??= (async () => {
      const appClosed = app!.close();
      await worker.close();
      await queue!.close();
      await appClosed;
      log.info('coordinator stopped');
    })());
    return { url, app, queue, worker, close };
  } catch (e) {
    await app?.close().catch(() => {});
    await queue?.close().catch(() => {});
    await worker.close().catch(() => {});
    throw e;
  }
}
