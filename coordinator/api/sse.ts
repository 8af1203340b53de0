import type { FastifyReply } from 'fastify';
import { StrataError } from '../../model/errors.ts';
import type { RowLogprobs } from '../../model/logprobs.ts';
import type { GenerateResultBody, JobPayload, TokenProgress, Usage } from './jobs/types.ts';
import { JOB_ID_HEADER, type RouteContext } from './context.ts';
import { asStrataError, strataErrorBody } from './errors.ts';

/** What one choice adds in one SSE event: only what no earlier event of this stream showed. */
export interface ChoiceDelta {
  index: number;
  tokens: number[];
  text: string;
  finish: string | null;
  /** One per token, when the job asked for logprobs. */
  logprobs?: RowLogprobs[];
  /** The first event of a choice: nothing of it was shown before (echo puts the prompt here). */
  first: boolean;
  /** With echo and logprobs, on the first event: the prompt's (the first null). */
  promptLogprobs?: (RowLogprobs | null)[];
}

/** How a route shapes its events (completions and chat differ only here). */
export interface StreamFormat {
  /** The response id (`cmpl-…`, `chatcmpl-…`) for a job id. */
  id(jobId: string): string;
  /** Events sent once the stream is open, before any token (chat: each choice's role). */
  opening?(id: string): unknown[];
  delta(id: string, d: ChoiceDelta): unknown;
  usage(id: string, usage: Usage): unknown;
}

export interface StreamJob {
  payload: JobPayload;
  priority: number | undefined;
  key: string | undefined;
  /** How many choices the job returns. */
  choices: number;
  includeUsage: boolean;
  format: StreamFormat;
}

/**
 * Runs a generate job and streams it as SSE `data:` events ending with `data: [DONE]`. Deltas carry offsets: an
 * overlap is trimmed (a retried or re-run attempt starts again at offset 0 and, greedy or seeded from the job id,
 * draws the same tokens), a gap (a lost event, or following a job that was already running) is skipped and filled
 * from the final result. An overlap that disagrees with what was shown (a re-run that drew other tokens) cannot be
 * taken back: the stream ends with a stream_restarted error instead.
 */
export async function streamJob(reply: FastifyReply, ctx: RouteContext, job: StreamJob): Promise<void> {
  const sent = Array.from({ length: job.choices }, () => ({ ids: [] as number[], text: 0, shown: false }));
  let id = '';
  let jobId = '';
  let open = false;
  let diverged = false;
  const early: TokenProgress[] = [];
  const raw = reply.raw;
  const live = () => !raw.destroyed && !raw.writableEnded;
  const write = (obj: unknown) => live() && raw.write(`data: ${JSON.stringify(obj)}\n\n`);

  const emit = (p: Omit<TokenProgress, 'attempt' | 'restart'>, finish: string | null) => {
    const s = sent[p.index];
    if (!s || diverged) return;
    const { offset, tokens } = p;
    if (offset <= s.ids.length) {
      const overlap = tokens.slice(0, s.ids.length - offset);
      if (overlap.some((t, i) => t !== s.ids[offset + i])) {
        diverged = true;
        write(strataErrorBody(new StrataError('stream_restarted', `job ${jobId} was run again from the start (its coordinator was lost or a stage failed) and produced other tokens than this stream already sent; read the complete result from GET /v1/jobs/${jobId}`, 'unavailable')));
        return;
      }
    }
    const skip = s.ids.length - offset;
    const newTokens = offset <= s.ids.length ? tokens.slice(skip) : [];
    const newText = p.text_offset <= s.text ? p.text.slice(s.text - p.text_offset) : '';
    if (newTokens.length === 0 && newText.length === 0 && finish === null) return;
    const first = !s.shown;
    const newLogprobs = p.logprobs && offset <= s.ids.length ? p.logprobs.slice(skip) : undefined;
    s.ids.push(...newTokens);
    s.text += newText.length;
    s.shown = true;
    write(job.format.delta(id, {
      index: p.index, tokens: newTokens, text: newText, finish, first,
      ...(newLogprobs ? { logprobs: newLogprobs } : {}),
      ...(first && p.prompt_logprobs ? { promptLogprobs: p.prompt_logprobs } : {}),
    }));
  };
  const onProgress = (p: TokenProgress) => {
    if (!open) early.push(p);
    else emit(p, null);
  };

  const { jobId: created, result, abandon } = await ctx.submit(job.payload, job.priority, job.key, onProgress);
  jobId = created;
  id = job.format.id(jobId);
  reply.hijack();
  raw.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive', 'x-accel-buffering': 'no', [JOB_ID_HEADER]: jobId });
  open = true;
  for (const e of job.format.opening?.(id) ?? []) write(e);
  for (const p of early.splice(0)) onProgress(p);
  // A client that hangs up stops being followed; its job still runs to completion (and stays queryable).
  raw.on('close', () => { if (!raw.writableFinished) abandon(); });
  try {
    const out = (await result) as GenerateResultBody;
    for (const c of out.choices) {
      emit({ index: c.index, offset: 0, tokens: c.token_ids, text_offset: 0, text: c.text ?? '', logprobs: c.logprobs?.tokens, prompt_logprobs: c.logprobs?.prompt }, c.finish_reason);
    }
    if (job.includeUsage && !diverged) write(job.format.usage(id, out.usage));
  } catch (e) {
    if (!diverged) write(strataErrorBody(asStrataError(e)));
  }
  if (live()) raw.end('data: [DONE]\n\n');
}
