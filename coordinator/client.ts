/**
 * A small client for strata's HTTP API (what `strata submit` / `strata status` use): completions, streamed or
 * not, and job look-ups. Errors are typed: `ApiClientError` with the HTTP status (0 when nothing answered) and the
 * API's `code` and message.
 */

export const JOB_ID_HEADER = 'x-strata-job-id';

export class ApiClientError extends Error {
  constructor(
    /** HTTP status; 0 when the server did not answer. */
    readonly status: number,
    readonly code: string,
    message: string,
    /** The job the request created or followed, when known. */
    readonly jobId?: string,
  ) {
    super(message);
    this.name = 'ApiClientError';
  }
}

export interface CompletionChoice {
  index: number;
  text: string;
  token_ids: number[];
  finish_reason: string | null;
}
export interface CompletionResponse {
  id: string;
  object: string;
  created: number;
  model: string;
  choices: CompletionChoice[];
  usage?: { prompt_tokens: number; completion_tokens?: number; total_tokens: number };
}

export interface ClientOptions {
  /** Base URL, e.g. http://127.0.0.1:8080 (a trailing slash or /v1 is fine). */
  url: string;
  /** Bearer token (STRATA_API_TOKEN on the server). */
  apiToken?: string;
  /** Per-request deadline for non-streamed calls (default 10 min, as the API waits for a job). */
  timeoutMs?: number;
}

/** The job id a completion answer names: the header, else the OpenAI id `cmpl-<job id>`. */
export function jobIdOf(res: Response, body?: { id?: unknown }): string | undefined {
  const h = res.headers.get(JOB_ID_HEADER);
  if (h) return h;
  return typeof body?.id === 'string' && body.id.startsWith('cmpl-') ? body.id.slice(5) : undefined;
}

export class StrataClient {
  readonly base: string;

  constructor(private readonly opts: ClientOptions) {
    let u: URL;
    try {
      u = new URL(opts.url);
    } catch {
      throw new ApiClientError(0, 'invalid_url', `--url ${JSON.stringify(opts.url)} is not a URL; give the API's address, e.g. http://127.0.0.1:8080`);
    }
    if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new ApiClientError(0, 'invalid_url', `--url must be http:// or https://, got ${u.protocol}`);
    this.base = u.toString().replace(/\/+$/, '').replace(/\/v1$/, '');
  }

  private headers(extra: Record<string, string> = {}): Record<string, string> {
    return { ...(this.opts.apiToken ? { authorization: `Bearer ${this.opts.apiToken}` } : {}), ...extra };
  }

  /** fetch, with "nothing answers" turned into a clear error. */
  private async fetch(path: string, init: RequestInit & { timeoutMs?: number }): Promise<Response> {
    const signal = init.signal ?? (init.timeoutMs ? AbortSignal.timeout(init.timeoutMs) : undefined);
    try {
      return await fetch(`${this.base}${path}`, { ...init, signal });
    } catch (e) {
      const err = e as Error & { cause?: { code?: string; message?: string } };
      const code = err.cause?.code ?? (err.name === 'TimeoutError' ? 'ETIMEDOUT' : undefined);
      const why = code === 'ECONNREFUSED' ? 'connection refused'
        : code === 'ENOTFOUND' || code === 'EAI_AGAIN' ? 'host not found'
        : code === 'ETIMEDOUT' || err.name === 'TimeoutError' ? 'timed out'
        : code === 'ECONNRESET' || code === 'UND_ERR_SOCKET' ? 'connection reset'
        : (err.cause?.message ?? err.message);
      throw new ApiClientError(0, 'unreachable', `${this.base} is not answering (${why}); check --url and that the coordinator runs (strata up / strata coordinator)`);
    }
  }

  /** Turns a non-2xx answer into an ApiClientError carrying the API's own message. */
  private async failure(res: Response, jobId?: string): Promise<ApiClientError> {
    const text = await res.text().catch(() => '');
    try {
      const e = (JSON.parse(text) as { error?: { message?: string; code?: string } }).error;
      if (e?.message) return new ApiClientError(res.status, e.code ?? `http_${res.status}`, e.message, jobId);
    } catch {
      /* not the API's JSON */
    }
    return new ApiClientError(res.status, `http_${res.status}`, `HTTP ${res.status} ${res.statusText}${text ? `: ${text.slice(0, 300)}` : ''}`, jobId);
  }

  async models(): Promise<{ data: { id: string; max_model_len?: number }[] }> {
    const res = await this.fetch('/v1/models', { headers: this.headers(), timeoutMs: 15_000 });
    if (!res.ok) throw await this.failure(res);
    return res.json() as Promise<{ data: { id: string; max_model_len?: number }[] }>;
  }

  async job(id: string): Promise<Record<string, unknown>> {
    const res = await this.fetch(`/v1/jobs/${encodeURIComponent(id)}`, { headers: this.headers(), timeoutMs: 15_000 });
    if (!res.ok) throw await this.failure(res, id);
    return res.json() as Promise<Record<string, unknown>>;
  }

  /** A non-streamed completion; `idempotencyKey` makes a retry follow the first job instead of running again. */
  async complete(body: Record<string, unknown>, idempotencyKey?: string): Promise<{ jobId?: string; response: CompletionResponse }> {
    const res = await this.fetch('/v1/completions', {
      method: 'POST',
      headers: this.headers({ 'content-type': 'application/json', ...(idempotencyKey ? { 'idempotency-key': idempotencyKey } : {}) }),
      body: JSON.stringify({ ...body, stream: false }),
      timeoutMs: this.opts.timeoutMs ?? 600_000,
    });
    const headerId = res.headers.get(JOB_ID_HEADER) ?? undefined;
    if (!res.ok) throw await this.failure(res, headerId);
    const response = (await res.json()) as CompletionResponse;
    return { jobId: jobIdOf(res, response), response };
  }

  /**
   * A streamed completion: resolves once the API accepted the job (with its id), then yields each SSE chunk as
   * it arrives. An error event in the stream throws ApiClientError.
   */
  async stream(body: Record<string, unknown>, idempotencyKey?: string): Promise<{ jobId?: string; chunks: AsyncGenerator<CompletionResponse> }> {
    const res = await this.fetch('/v1/completions', {
      method: 'POST',
      headers: this.headers({ 'content-type': 'application/json', accept: 'text/event-stream', ...(idempotencyKey ? { 'idempotency-key': idempotencyKey } : {}) }),
      body: JSON.stringify({ ...body, stream: true }),
    });
    const jobId = res.headers.get(JOB_ID_HEADER) ?? undefined;
    if (!res.ok) throw await this.failure(res, jobId);
    if (!res.body) throw new ApiClientError(res.status, 'empty_stream', 'the API answered without a body', jobId);
    return { jobId, chunks: readSse(res.body, jobId) };
  }
}

/** Parses `data: …` events (blank-line separated) until `data: [DONE]`. */
async function* readSse(body: ReadableStream<Uint8Array>, jobId: string | undefined): AsyncGenerator<CompletionResponse> {
  const decoder = new TextDecoder();
  let buf = '';
  let done = false;
  for await (const part of body as unknown as AsyncIterable<Uint8Array>) {
    buf += decoder.decode(part, { stream: true });
    let end: number;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const data = event.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart()).join('\n');
      if (!data) continue;
      if (data === '[DONE]') {
        done = true;
        continue;
      }
      const obj = JSON.parse(data) as CompletionResponse & { error?: { message?: string; code?: string } };
      if (obj.error) throw new ApiClientError(200, obj.error.code ?? 'stream_error', obj.error.message ?? 'the stream reported an error', jobId);
      yield obj;
    }
  }
  if (!done) throw new ApiClientError(200, 'stream_cut', `the stream ended before [DONE]${jobId ? `; the job may still finish: strata status ${jobId}` : ''}`, jobId);
}
