import type { FastifyReply } from 'fastify';
import { statusOf as catalogueStatus } from '../../model/error-codes.ts';
import { isStrataError, StrataError } from '../../model/errors.ts';

/** The API's error shape, {error: {message, type, code}}, with the HTTP status of the code in the catalogue. */

const TYPE: Record<number, string> = {
  400: 'invalid_request_error', 401: 'authentication_error', 404: 'not_found_error', 408: 'timeout', 413: 'invalid_request_error', 414: 'invalid_request_error', 415: 'invalid_request_error',
  422: 'invalid_request_error', 429: 'rate_limit_error', 500: 'server_error', 501: 'not_implemented', 503: 'service_unavailable', 504: 'timeout',
};

/** The HTTP status of the error's code in the catalogue (model/error-codes.ts). */
export const statusOf = (e: StrataError): number => catalogueStatus(e).http;

export const errorBody = (status: number, code: string, message: string) => ({
  error: { message, type: TYPE[status] ?? (status < 500 ? 'invalid_request_error' : 'server_error'), code },
});

/** The body of a typed error, as a response or as an SSE event. */
export const strataErrorBody = (e: StrataError) => errorBody(statusOf(e), e.code, e.message);

export function sendError(reply: FastifyReply, e: StrataError): FastifyReply {
  return reply.code(statusOf(e)).send(strataErrorBody(e));
}

/** Framework messages quote the URL or the body; a 5 kB path must not come back in full. */
export const clip = (message: string, max = 300) => (message.length > max ? `${message.slice(0, max)}…` : message);

export function asObject(body: unknown): Record<string, unknown> {
  if (!body || typeof body !== 'object' || Array.isArray(body)) {
    throw new StrataError('invalid_body', 'the request body must be a JSON object (Content-Type: application/json)', 'invalid_argument');
  }
  return body as Record<string, unknown>;
}

/** Any failure as a typed error: job failures come back typed already; anything else is internal. */
export function asStrataError(e: unknown): StrataError {
  return isStrataError(e) ? e : new StrataError('internal_error', (e as Error)?.message ?? String(e), 'internal');
}

export function rethrow(e: unknown): never {
  throw asStrataError(e);
}
