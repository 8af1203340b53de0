import type { FastifyInstance } from 'fastify';
import { bad, resolveJob } from './jobs/validate.ts';
import type { EmbedResultBody } from './jobs/types.ts';
import { JOB_ID_HEADER, type RouteContext } from './context.ts';
import { asObject, rethrow } from './errors.ts';

/** POST /v1/embeddings (OpenAI shape): mean-pooled last hidden states, as floats or base64 float32. */
export function registerEmbeddings(app: FastifyInstance, ctx: RouteContext): void {
  app.post('/v1/embeddings', async (req, reply) => {
    const o = asObject(req.body);
    ctx.checkModel(o);
    const key = ctx.idempotencyKey(req.headers, o);
    const format = o.encoding_format ?? 'float';
    if (format !== 'float' && format !== 'base64') throw bad('invalid_field', 'encoding_format must be "float" or "base64"');
    const dModel = ctx.opts.spec.dModel;
    if (o.dimensions !== undefined && o.dimensions !== null && o.dimensions !== dModel) throw bad('unsupported_field', `dimensions is fixed at ${dModel} for this model; leave it out`);
    const r = resolveJob({ kind: 'embed', input: o.input as string }, ctx.model);
    if (r.kind !== 'embed') throw new Error('unreachable');
    const { jobId, result } = await ctx.submit({ kind: 'embed', input: r.inputs }, ctx.priorityOf(o), key);
    reply.header(JOB_ID_HEADER, jobId);
    const out = (await result.catch(rethrow)) as EmbedResultBody;
    return {
      object: 'list', model: ctx.opts.modelName, usage: out.usage,
      data: out.data.map((v, index) => ({
        object: 'embedding', index,
        embedding: format === 'base64' ? Buffer.from(Float32Array.from(v).buffer).toString('base64') : v,
      })),
    };
  });
}
