import type { FastifyInstance } from 'fastify';
import { StrataError } from '../../model/errors.ts';
import { collectProcessMetrics, renderMetrics, metricsContentType } from '../metrics.ts';
import { parseFailure } from '../queue.ts';
import type { RouteContext } from './context.ts';

/** Introspection and operations: /v1/models, /v1/jobs/:id, /v1/pipeline, /health, /metrics. */
export function registerOps(app: FastifyInstance, ctx: RouteContext): void {
  const { queue, spec, modelName } = ctx.opts;
  collectProcessMetrics();

  app.get('/v1/models', async () => ({
    object: 'list',
    data: [{ id: modelName, object: 'model', created: ctx.started, owned_by: 'strata', max_model_len: spec.maxPositions, family: spec.family, causal: spec.causal }],
  }));

  app.get<{ Params: { id: string } }>('/v1/jobs/:id', async (req) => {
    const job = await queue.getJob(req.params.id);
    if (!job) throw new StrataError('job_not_found', `no job ${req.params.id} (finished jobs are kept for a limited time)`, 'not_found');
    const state = await queue.redisCall(() => job.getState());
    const failure = job.failedReason ? parseFailure(job.failedReason) : null;
    return {
      id: job.id, kind: (job.data as { kind?: string })?.kind ?? job.name, state,
      result: job.returnvalue ?? null,
      failedReason: job.failedReason || null,
      error: failure && state === 'failed' ? { code: failure.code, message: failure.message } : null,
      progress: job.progress ?? null,
      // attemptsStarted counts runs (a retry after a failure or a re-run after a stall adds one); stalledCounter the
      // times the job's consumer was lost while running it.
      attemptsMade: job.attemptsMade, attemptsStarted: job.attemptsStarted, stalledCounter: job.stalledCounter, timestamp: job.timestamp, processedOn: job.processedOn ?? null, finishedOn: job.finishedOn ?? null,
    };
  });

  app.get('/v1/pipeline', async () => ctx.opts.pipelineInfo());

  app.get('/health', async (_req, reply) => {
    let pipeline = false;
    try {
      pipeline = ctx.opts.health();
    } catch {
      pipeline = false;
    }
    const redis = await queue.ping();
    const detail = pipeline ? {} : (ctx.opts.healthDetail?.() ?? {});
    return reply.code(pipeline && redis ? 200 : 503).send({ status: pipeline && redis ? 'ok' : 'unavailable', pipeline, redis, ...detail });
  });

  app.get('/metrics', async (_req, reply) => {
    const text = await renderMetrics({ counts: () => queue.counts(), prometheus: () => queue.prometheus() });
    return reply.header('content-type', metricsContentType).send(text);
  });
}
