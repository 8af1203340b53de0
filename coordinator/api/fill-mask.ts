import type { FastifyInstance } from 'fastify';
import { bad, resolveJob } from './jobs/validate.ts';
import type { FillMaskResultBody } from './jobs/types.ts';
import { JOB_ID_HEADER, type RouteContext } from './context.ts';
import { asObject, rethrow } from './errors.ts';

/** POST /v1/fill-mask: HF task shape {inputs, parameters: {top_k}}, or {input_ids, mask_index}. */
export function registerFillMask(app: FastifyInstance, ctx: RouteContext): void {
  app.post('/v1/fill-mask', async (req, reply) => {
    const o = asObject(req.body);
    ctx.checkModel(o);
    const key = ctx.idempotencyKey(req.headers, o);
    if (Array.isArray(o.inputs)) throw bad('batch_unsupported', 'inputs holds several texts; send one request per text');
    const params = (o.parameters ?? {}) as Record<string, unknown>;
    if (typeof params !== 'object') throw bad('invalid_field', 'parameters must be an object');
    if (params.targets !== undefined) throw bad('unsupported_field', 'parameters.targets is not supported; leave it out');
    const r = resolveJob({ kind: 'fill-mask', inputs: o.inputs as string, input_ids: o.input_ids as number[], mask_index: o.mask_index as number, top_k: (params.top_k ?? o.top_k) as number }, ctx.model);
    if (r.kind !== 'fill-mask') throw new Error('unreachable');
    const { jobId, result } = await ctx.submit({ kind: 'fill-mask', input_ids: r.ids, mask_index: r.maskIndex, top_k: r.topK }, ctx.priorityOf(o), key);
    reply.header(JOB_ID_HEADER, jobId);
    const out = (await result.catch(rethrow)) as FillMaskResultBody;
    return out.candidates.map((c) => ({ ...(c.sequence !== undefined ? { sequence: c.sequence } : {}), score: c.score, token: c.token, ...(c.token_str !== undefined ? { token_str: c.token_str } : {}) }));
  });
}
