import { timingSafeEqual, createHash } from 'node:crypto';
import { STATUS_CODES } from 'node:http';
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply } from 'fastify';
import type { Logger } from 'pino';
import type { ModelSpec } from '../model/config.ts';
import { isStrataError, StrataError, type ErrorCode } from '../model/errors.ts';
import { statusOf as errorStatus } from '../model/error-codes.ts';
import type { StrataTokenizer } from '../model/tokenizer.ts';
import {
  resolveJob, show, type EmbedResultBody, type FillMaskResultBody, type GenerateResultBody, type JobPayload, type ModelContext,
  type ResolvedGenerate, type TokenProgress,
} from './api-jobs.ts';
import { renderMetrics, metricsContentType } from './metrics.ts';
import { canonical, checkJobId, parseFailure, type RequestQueue } from './queue.ts';

/**
 * The HTTP API (OpenAI / Hugging Face shapes). Every request is validated here, completely, before it is
 * enqueued, so an invalid request leaves no job behind; then it goes through the queue like any producer's job
 * and the handler follows it through QueueEvents (progress → SSE chunks, completion → the response).
 */

export interface StageInfo {
  blocks: [number, number];
  address: string;
  pid?: number;
  healthy: boolean;
  [extra: string]: unknown;
}

export interface ApiOptions {
  queue: RequestQueue;
  spec: ModelSpec;
  tokenizer: StrataTokenizer | null;
  /** The `model` clients name (and /v1/models lists). */
  modelName: string;
  pipelineInfo: () => { stages: StageInfo[] };
  /** Whether the pipeline can serve right now (every stage healthy). */
  health: () => boolean;
  /** Bearer token required on /v1/*; default `STRATA_API_TOKEN`; unset or empty = no auth. */
  authToken?: string;
  /** 429 once this many jobs wait (default `STRATA_MAX_QUEUED`, else 1000; 0 = no limit). */
  maxQueued?: number;
  /** Whether the pipeline computes embeddings (else /v1/embeddings answers 501). */
  canEmbed?: boolean;
  maxN?: number;
  /** How long a request waits for its job (default 10 min; then 504, the job stays queryable). */
  requestTimeoutMs?: number;
  logger?: Logger;
}

// ---- Errors: {error: {message, type, code}} with the status the error's kind implies ---------------------------

const TYPE: Record<number, string> = {
  400: 'invalid_request_error', 401: 'authentication_error', 404: 'not_found_error', 408: 'timeout', 413: 'invalid_request_error', 414: 'invalid_request_error', 415: 'invalid_request_error',
  422: 'invalid_request_error', 429: 'rate_limit_error', 500: 'server_error', 501: 'not_implemented', 503: 'service_unavailable', 504: 'timeout',
};

/** The HTTP status of the error's code in the catalogue (model/error-codes.ts). */
const statusOf = (e: StrataError): number => errorStatus(e).http;

const errorBody = (status: number, code: string, message: string) => ({
  error: { message, type: TYPE[status] ?? (status < 500 ? 'invalid_request_error' : 'server_error'), code },
});

/** The response header naming the job a request created or followed (also embedded in the OpenAI `id`). */
export const JOB_ID_HEADER = 'x-strata-job-id';

function sendError(reply: FastifyReply, e: StrataError): FastifyReply {
  const status = statusOf(e);
  return reply.code(status).send(errorBody(status, e.code, e.message));
}

const bad = (code: ErrorCode, message: string) => new StrataError(code, message, 'invalid_argument');

/** Framework messages quote the URL or the body; a 5 kB path must not come back in full. */
const clip = (message: string, max = 300) => (message.length > max ? `${message.slice(0, max)}…` : message);

function asObject(body: unknown): Record<string, unknown> {
  if (!body || typeof body !== 'object' || Array.isArray(body)) throw bad('invalid_body', 'the request body must be a JSON object (Content-Type: application/json)');
  return body as Record<string, unknown>;
}

/** Same length digests, so the comparison takes the same time whatever the guess. */
function tokenMatches(given: string, expected: string): boolean {
  const h = (s: string) => createHash('sha256').update(s).digest();
  return timingSafeEqual(h(given), h(expected));
}

export async function buildApi(opts: ApiOptions): Promise<FastifyInstance> {
  const { queue, spec, tokenizer, modelName } = opts;
  const authToken = opts.authToken ?? process.env.STRATA_API_TOKEN ?? '';
  const maxQueued = opts.maxQueued ?? (Number(process.env.STRATA_MAX_QUEUED) || 1000);
  const ctx: ModelContext = { spec, tokenizer, canEmbed: opts.canEmbed ?? false, maxN: opts.maxN };
  const started = Math.floor(Date.now() / 1000);

  const app = Fastify({
    bodyLimit: 16 * 1024 * 1024,
    // Job ids (client idempotency keys among them) are up to 128 characters: /v1/jobs/:id must take them.
    routerOptions: { maxParamLength: 256 },
    // Errors Fastify raises before routing (a malformed URL, an over-long path parameter) in the API's shape too.
    frameworkErrors: (e, _req, reply) => {
      const status = e.statusCode && e.statusCode >= 400 && e.statusCode < 500 ? e.statusCode : 400;
      return (reply as FastifyReply).code(status).send(errorBody(status, e.code ?? 'invalid_request', clip(e.message)));
    },
    // And malformed HTTP (before any request exists): a JSON error on the socket, then close it, as Node does.
    clientErrorHandler: (e: Error & { code?: string }, socket) => {
      if (e.code === 'ECONNRESET' || socket.destroyed) return;
      const status = e.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : e.code === 'HPE_HEADER_OVERFLOW' ? 431 : 400;
      const message = status === 408 ? 'the request took too long to arrive' : status === 431 ? 'the request headers are too large' : `malformed HTTP request (${e.code ?? e.message})`;
      const body = JSON.stringify(errorBody(status, status === 400 ? 'bad_http_request' : status === 408 ? 'request_timeout' : 'headers_too_large', message));
      if (socket.writable) socket.write(`HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\nContent-Length: ${Buffer.byteLength(body)}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n${body}`);
      socket.destroy(e);
    },
    ...(opts.logger ? { loggerInstance: opts.logger as FastifyBaseLogger } : { logger: false }),
  });

  app.setErrorHandler((e, _req, reply) => {
    if (isStrataError(e)) return sendError(reply, e);
    const err = e as Error & { statusCode?: number; code?: string };
    // Fastify's own (malformed JSON, body too large, wrong content type) carry a 4xx statusCode.
    const status = err.statusCode;
    if (status && status >= 400 && status < 500) {
      return reply.code(status).send(errorBody(status, err.code ?? 'invalid_request', clip(err.message)));
    }
    reply.log.error({ err }, 'request failed');
    return reply.code(500).send(errorBody(500, 'internal_error', `internal error: ${err.message}`));
  });
  app.setNotFoundHandler((req, reply) => reply.code(404).send(errorBody(404, 'route_not_found', `no route ${req.method} ${req.url}`)));

  if (authToken) {
    app.addHook('onRequest', async (req, reply) => {
      // Probes and Prometheus scrape without credentials; the API itself needs the token.
      if (!req.url.startsWith('/v1/')) return;
      const m = /^Bearer\s+(.+)$/i.exec(req.headers.authorization ?? '');
      if (!m || !tokenMatches(m[1].trim(), authToken)) {
        return reply.code(401).header('www-authenticate', 'Bearer').send(errorBody(401, 'invalid_api_key', 'missing or wrong API token: send Authorization: Bearer <token>'));
      }
    });
  }

  const checkModel = (o: Record<string, unknown>) => {
    if (o.model !== undefined && o.model !== null && o.model !== modelName) {
      throw new StrataError('model_not_found', `model ${show(o.model)} is not served here; this server serves "${modelName}" (GET /v1/models)`, 'not_found');
    }
  };

  /** vLLM's `priority`: lower runs sooner, 0 (default) first. BullMQ: no priority runs before any priority 1..2^21. */
  const priorityOf = (o: Record<string, unknown>): number | undefined => {
    const p = o.priority;
    if (p === undefined || p === null || p === 0) return undefined;
    if (!Number.isInteger(p) || (p as number) < 0 || (p as number) > 2_097_151) throw bad('invalid_field', `priority must be an integer in [0, 2097151] (lower runs sooner), got ${show(p)}`);
    return p as number;
  };

  /** Validates (again, as the consumer will); throws 4xx before anything is enqueued. Back-pressure: checkCapacity. */
  async function admit(payload: JobPayload) {
    return resolveJob(payload, ctx);
  }

  /**
   * The client's idempotency key: the `Idempotency-Key` header or the body's `job_id` (the same if both). It becomes
   * the BullMQ job id, so a resubmission follows the first job (or gets its stored answer) instead of running twice.
   */
  const idempotencyKey = (headers: Record<string, unknown>, o: Record<string, unknown>): string | undefined => {
    const header = headers['idempotency-key'];
    const h = header === undefined ? undefined : checkJobId(Array.isArray(header) ? header[0] : header, 'the Idempotency-Key header');
    const b = o.job_id === undefined || o.job_id === null ? undefined : checkJobId(o.job_id, 'job_id');
    if (h !== undefined && b !== undefined && h !== b) throw bad('invalid_job_id', 'the Idempotency-Key header and job_id differ; send one of them');
    return h ?? b;
  };

  /** 429 once too many jobs wait; checked only when a new job would be added. */
  const checkCapacity = async () => {
    if (maxQueued > 0 && (await queue.waitingCount()) >= maxQueued) {
      throw new StrataError('queue_full', `the request queue holds ${maxQueued} or more waiting jobs; retry later`, 'resource_exhausted');
    }
  };

  /** Two job payloads ask for the same thing when they validate to the same request. */
  const sameRequest = (existing: unknown, payload: JobPayload): boolean => {
    try {
      return canonical(resolveJob(existing, ctx)) === canonical(resolveJob(payload, ctx));
    } catch {
      return false;
    }
  };

  const submit = (payload: JobPayload, priority: number | undefined, jobId: string | undefined, onProgress?: (p: TokenProgress) => void) =>
    queue.submit(payload, { priority, jobId, onProgress, timeoutMs: opts.requestTimeoutMs, beforeAdd: checkCapacity, sameRequest });

  // ---- POST /v1/completions -----------------------------------------------------------------------------------

  app.post('/v1/completions', async (req, reply) => {
    const o = asObject(req.body);
    checkModel(o);
    if (o.stream !== undefined && o.stream !== null && typeof o.stream !== 'boolean') throw bad('invalid_field', 'stream must be true or false');
    const priority = priorityOf(o);
    const key = idempotencyKey(req.headers, o);
    const r = (await admit({ ...(o as object), kind: 'generate' } as JobPayload)) as ResolvedGenerate;
    // The job carries the validated ids, so the consumer runs exactly what was checked here.
    const payload: JobPayload = {
      kind: 'generate', prompt_ids: r.promptIds, max_tokens: r.maxTokens, n: r.n,
      temperature: r.sampling.temperature, top_p: r.sampling.topP, top_k: r.sampling.topK, repetition_penalty: r.sampling.repetitionPenalty,
      seed: r.sampling.seed, stop: r.stop, stop_token_ids: r.stopTokenIds, ignore_eos: r.ignoreEos,
    };
    const created = Math.floor(Date.now() / 1000);
    const includeUsage = (o.stream_options as { include_usage?: unknown } | null | undefined)?.include_usage === true;
    if (o.stream === true) return streamCompletion(reply, payload, priority, key, created, r.n, includeUsage);

    const { jobId, result } = await submit(payload, priority, key);
    reply.header(JOB_ID_HEADER, jobId);
    const out = (await result.catch(rethrow)) as GenerateResultBody;
    return {
      id: `cmpl-${jobId}`, object: 'text_completion', created, model: modelName,
      choices: out.choices.map((c) => ({ index: c.index, text: c.text ?? '', token_ids: c.token_ids, finish_reason: c.finish_reason, logprobs: null })),
      usage: out.usage,
    };
  });

  async function streamCompletion(reply: FastifyReply, payload: JobPayload, priority: number | undefined, key: string | undefined, created: number, n: number, includeUsage: boolean) {
    // What each choice has shown so far: its token ids (to check a re-run against them) and text length.
    const sent = Array.from({ length: n }, () => ({ ids: [] as number[], text: 0 }));
    let id = '';
    let open = false;
    let diverged = false;
    const early: TokenProgress[] = [];
    const raw = reply.raw;
    const live = () => !raw.destroyed && !raw.writableEnded;
    const write = (obj: unknown) => live() && raw.write(`data: ${JSON.stringify(obj)}\n\n`);
    const chunk = (index: number, text: string, tokenIds: number[], finish: string | null) =>
      write({ id, object: 'text_completion', created, model: modelName, choices: [{ index, text, token_ids: tokenIds, finish_reason: finish, logprobs: null }] });
    // Deltas carry offsets: an overlap is trimmed (a retried or re-run attempt starts again at offset 0 and, greedy
    // or seeded from the job id, draws the same tokens), a gap (a lost event, or following a job that was already
    // running) is skipped and filled from the final result. An overlap that disagrees with what was shown (a re-run
    // that drew other tokens) cannot be taken back: the stream ends with a stream_restarted error instead.
    const emit = (index: number, offset: number, tokens: number[], textOffset: number, text: string, finish: string | null) => {
      const s = sent[index];
      if (!s || diverged) return;
      if (offset <= s.ids.length) {
        const overlap = tokens.slice(0, s.ids.length - offset);
        if (overlap.some((t, i) => t !== s.ids[offset + i])) {
          diverged = true;
          const err = new StrataError('stream_restarted', `job ${id.slice(5)} was run again from the start (its coordinator was lost or a stage failed) and produced other tokens than this stream already sent; read the complete result from GET /v1/jobs/${id.slice(5)}`, 'unavailable');
          write(errorBody(statusOf(err), err.code, err.message));
          return;
        }
      }
      const newTokens = offset <= s.ids.length ? tokens.slice(s.ids.length - offset) : [];
      const newText = textOffset <= s.text ? text.slice(s.text - textOffset) : '';
      if (newTokens.length === 0 && newText.length === 0 && finish === null) return;
      s.ids.push(...newTokens);
      s.text += newText.length;
      chunk(index, newText, newTokens, finish);
    };
    const onProgress = (p: TokenProgress) => {
      if (!open) early.push(p);
      else emit(p.index, p.offset, p.tokens, p.text_offset, p.text, null);
    };

    const { jobId, result, abandon } = await submit(payload, priority, key, onProgress);
    id = `cmpl-${jobId}`;
    reply.hijack();
    raw.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive', 'x-accel-buffering': 'no', [JOB_ID_HEADER]: jobId });
    open = true;
    for (const p of early.splice(0)) onProgress(p);
    // A client that hangs up stops being followed; its job still runs to completion (and stays queryable).
    raw.on('close', () => { if (!raw.writableFinished) abandon(); });
    try {
      const out = (await result) as GenerateResultBody;
      for (const c of out.choices) emit(c.index, 0, c.token_ids, 0, c.text ?? '', c.finish_reason);
      if (includeUsage && !diverged) write({ id, object: 'text_completion', created, model: modelName, choices: [], usage: out.usage });
    } catch (e) {
      const err = isStrataError(e) ? e : new StrataError('internal_error', (e as Error).message, 'internal');
      if (!diverged) write(errorBody(statusOf(err), err.code, err.message));
    }
    if (live()) raw.end('data: [DONE]\n\n');
  }

  // ---- POST /v1/embeddings ------------------------------------------------------------------------------------

  app.post('/v1/embeddings', async (req, reply) => {
    const o = asObject(req.body);
    checkModel(o);
    const key = idempotencyKey(req.headers, o);
    const format = o.encoding_format ?? 'float';
    if (format !== 'float' && format !== 'base64') throw bad('invalid_field', 'encoding_format must be "float" or "base64"');
    if (o.dimensions !== undefined && o.dimensions !== null && o.dimensions !== spec.dModel) throw bad('unsupported_field', `dimensions is fixed at ${spec.dModel} for this model; leave it out`);
    const r = await admit({ kind: 'embed', input: o.input as string });
    if (r.kind !== 'embed') throw new Error('unreachable');
    const { jobId, result } = await submit({ kind: 'embed', input: r.inputs }, priorityOf(o), key);
    reply.header(JOB_ID_HEADER, jobId);
    const out = (await result.catch(rethrow)) as EmbedResultBody;
    return {
      object: 'list', model: modelName, usage: out.usage,
      data: out.data.map((v, index) => ({
        object: 'embedding', index,
        embedding: format === 'base64' ? Buffer.from(Float32Array.from(v).buffer).toString('base64') : v,
      })),
    };
  });

  // ---- POST /v1/fill-mask: HF task shape {inputs, parameters: {top_k}}, or {input_ids, mask_index} ------------

  app.post('/v1/fill-mask', async (req, reply) => {
    const o = asObject(req.body);
    checkModel(o);
    const key = idempotencyKey(req.headers, o);
    if (Array.isArray(o.inputs)) throw bad('batch_unsupported', 'inputs holds several texts; send one request per text');
    const params = (o.parameters ?? {}) as Record<string, unknown>;
    if (typeof params !== 'object') throw bad('invalid_field', 'parameters must be an object');
    if (params.targets !== undefined) throw bad('unsupported_field', 'parameters.targets is not supported; leave it out');
    const r = await admit({ kind: 'fill-mask', inputs: o.inputs as string, input_ids: o.input_ids as number[], mask_index: o.mask_index as number, top_k: (params.top_k ?? o.top_k) as number });
    if (r.kind !== 'fill-mask') throw new Error('unreachable');
    const { jobId, result } = await submit({ kind: 'fill-mask', input_ids: r.ids, mask_index: r.maskIndex, top_k: r.topK }, priorityOf(o), key);
    reply.header(JOB_ID_HEADER, jobId);
    const out = (await result.catch(rethrow)) as FillMaskResultBody;
    return out.candidates.map((c) => ({ ...(c.sequence !== undefined ? { sequence: c.sequence } : {}), score: c.score, token: c.token, ...(c.token_str !== undefined ? { token_str: c.token_str } : {}) }));
  });

  // ---- Introspection -----------------------------------------------------------------------------------------

  app.get('/v1/models', async () => ({
    object: 'list',
    data: [{ id: modelName, object: 'model', created: started, owned_by: 'strata', max_model_len: spec.maxPositions, family: spec.family, causal: spec.causal }],
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

  app.get('/v1/pipeline', async () => opts.pipelineInfo());

  app.get('/health', async (_req, reply) => {
    let pipeline = false;
    try {
      pipeline = opts.health();
    } catch {
      pipeline = false;
    }
    const redis = await queue.ping();
    return reply.code(pipeline && redis ? 200 : 503).send({ status: pipeline && redis ? 'ok' : 'unavailable', pipeline, redis });
  });

  app.get('/metrics', async (_req, reply) => {
    const text = await renderMetrics({ counts: () => queue.counts(), prometheus: () => queue.prometheus() });
    return reply.header('content-type', metricsContentType).send(text);
  });

  return app;
}

/** Job failures come back as typed errors already; anything else is internal. */
function rethrow(e: unknown): never {
  if (isStrataError(e)) throw e;
  throw new StrataError('internal_error', (e as Error)?.message ?? String(e), 'internal');
}
