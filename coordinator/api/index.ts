import { timingSafeEqual, createHash } from 'node:crypto';
import { STATUS_CODES } from 'node:http';
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply } from 'fastify';
import { isStrataError } from '../../model/errors.ts';
import { createRouteContext, type ApiOptions } from './context.ts';
import { clip, errorBody, sendError } from './errors.ts';
import { registerCompletions } from './completions.ts';
import { registerChat } from './chat.ts';
import { registerEmbeddings } from './embeddings.ts';
import { registerFillMask } from './fill-mask.ts';
import { registerTokenize } from './tokenize.ts';
import { registerOps } from './ops.ts';

/**
 * The HTTP API (OpenAI / vLLM / Hugging Face shapes). Every request is validated completely before it is enqueued,
 * so an invalid request leaves no job behind; then it goes through the queue like any producer's job and the handler
 * follows it through QueueEvents (progress → SSE chunks, completion → the response). One module per route group.
 */

export { JOB_ID_HEADER, type ApiOptions, type StageInfo } from './context.ts';

/** Same length digests, so the comparison takes the same time whatever the guess. */
function tokenMatches(given: string, expected: string): boolean {
  const h = (s: string) => createHash('sha256').update(s).digest();
  return timingSafeEqual(h(given), h(expected));
}

/** Paths that need the API token when one is set: the API itself, not probes or Prometheus. */
const guarded = (url: string) => url.startsWith('/v1/') || url.startsWith('/tokenize') || url.startsWith('/detokenize');

export async function buildApi(opts: ApiOptions): Promise<FastifyInstance> {
  const authToken = opts.authToken ?? process.env.STRATA_API_TOKEN ?? '';
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
      if (!guarded(req.url)) return;
      const m = /^Bearer\s+(.+)$/i.exec(req.headers.authorization ?? '');
      if (!m || !tokenMatches(m[1].trim(), authToken)) {
        return reply.code(401).header('www-authenticate', 'Bearer').send(errorBody(401, 'invalid_api_key', 'missing or wrong API token: send Authorization: Bearer <token>'));
      }
    });
  }

  const ctx = createRouteContext(opts);
  for (const register of [registerCompletions, registerChat, registerEmbeddings, registerFillMask, registerTokenize, registerOps]) register(app, ctx);
  return app;
}
