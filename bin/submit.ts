import type { Command } from 'commander';
import { randomBytes } from 'node:crypto';
import { createWriteStream, readFileSync, type WriteStream } from 'node:fs';
import cliProgress from 'cli-progress';
import { ApiClientError, StrataClient, type CompletionResponse } from '../coordinator/client.ts';

/**
 * `strata submit` and `strata status`: a client of the HTTP API. One request streams its tokens to stdout as they
 * arrive; a JSONL file of requests runs with bounded concurrency and a progress bar, its results written in input
 * order; `status` prints a job. Errors say what to do and exit 2.
 */

interface SubmitOptions {
  url: string;
  apiToken?: string;
  prompt?: string;
  ids?: string;
  file?: string;
  out?: string;
  concurrency: string;
  retries: string;
  maxTokens?: string;
  temperature?: string;
  topK?: string;
  topP?: string;
  seed?: string;
  stop?: string[];
  stopTokenIds?: string;
  model?: string;
  jobId?: string;
  format?: 'text' | 'ids';
  json?: boolean;
  progress: boolean;
}

const DEFAULT_URL = () => process.env.STRATA_URL ?? 'http://127.0.0.1:8080';

class UsageError extends Error {}

const number = (flag: string, v: string | undefined, integer = false): number | undefined => {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n) || (integer && !Number.isInteger(n))) throw new UsageError(`${flag} must be ${integer ? 'an integer' : 'a number'}, got "${v}"`);
  return n;
};

const idList = (flag: string, v: string): number[] => {
  const ids = v.split(',').map((s) => s.trim()).filter((s) => s !== '').map(Number);
  if (ids.length === 0 || ids.some((x) => !Number.isInteger(x))) throw new UsageError(`${flag} must be comma-separated integers, got "${v}"`);
  return ids;
};

/** Request fields the flags set (OpenAI names); in a batch they are defaults each line may override. */
function fieldsFromFlags(o: SubmitOptions): Record<string, unknown> {
  const f: Record<string, unknown> = {
    max_tokens: number('--max-tokens', o.maxTokens, true),
    temperature: number('--temperature', o.temperature),
    top_k: number('--top-k', o.topK, true),
    top_p: number('--top-p', o.topP),
    seed: number('--seed', o.seed, true),
    stop: o.stop && o.stop.length > 0 ? o.stop : undefined,
    stop_token_ids: o.stopTokenIds !== undefined ? idList('--stop-token-ids', o.stopTokenIds) : undefined,
    model: o.model,
  };
  for (const k of Object.keys(f)) if (f[k] === undefined) delete f[k];
  return f;
}

function fail(e: unknown): never {
  if (e instanceof UsageError) console.error(`strata: ${e.message}`);
  else if (e instanceof ApiClientError) {
    const where = e.status > 0 ? ` (HTTP ${e.status}${e.code ? `, ${e.code}` : ''})` : '';
    console.error(`strata: ${e.message}${where}`);
    if (e.jobId && e.status !== 404) console.error(`strata: job ${e.jobId}: look it up with strata status --url … ${e.jobId}`);
  } else console.error(`strata: ${(e as Error)?.stack ?? String(e)}`);
  process.exit(2);
}

// ---- One request: stream to stdout ---------------------------------------------------------------------------

async function submitOne(o: SubmitOptions, client: StrataClient): Promise<void> {
  if ((o.prompt === undefined) === (o.ids === undefined)) throw new UsageError('give one of --prompt "text", --ids 1,2,3 or --file requests.jsonl');
  const body: Record<string, unknown> = { ...fieldsFromFlags(o), prompt: o.prompt ?? idList('--ids', o.ids!) };
  const key = o.jobId;
  if (o.json) {
    const { jobId, response } = await client.complete(body, key);
    process.stdout.write(`${JSON.stringify({ job_id: jobId, ...response })}\n`);
    return;
  }
  // Text when the prompt was text, ids when it was ids (a model without a tokenizer answers with ids only).
  const format = o.format ?? (o.prompt !== undefined ? 'text' : 'ids');
  const { jobId, chunks } = await client.stream({ ...body, stream_options: { include_usage: true } }, key);
  if (jobId) console.error(`job ${jobId}`);
  let count = 0;
  let finish: string | null = null;
  let usage: CompletionResponse['usage'];
  let choices = 1;
  for await (const chunk of chunks) {
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      choices = Math.max(choices, c.index + 1);
      if (format === 'text') {
        if (c.text) process.stdout.write(c.text);
      } else if (c.token_ids.length > 0) process.stdout.write(`${count > 0 ? ' ' : ''}${c.token_ids.join(' ')}`);
      count += c.token_ids.length;
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  process.stdout.write('\n');
  const tokens = usage?.completion_tokens ?? count;
  console.error(`finish_reason ${finish ?? 'unknown'}, ${tokens} token${tokens === 1 ? '' : 's'}${choices > 1 ? ` over ${choices} choices` : ''}${jobId ? `; strata status --url ${client.base} ${jobId}` : ''}`);
}

// ---- A batch file: bounded concurrency, results in input order -----------------------------------------------

interface BatchResult {
  line: number;
  job_id?: string;
  id?: string;
  choices?: CompletionResponse['choices'];
  usage?: CompletionResponse['usage'];
  error?: { status: number; code: string; message: string };
}

const RETRYABLE = new Set([0, 429, 502, 503, 504]);

async function submitBatch(o: SubmitOptions, client: StrataClient): Promise<number> {
  if (o.prompt !== undefined || o.ids !== undefined) throw new UsageError('--file runs the requests in the file; leave out --prompt / --ids');
  const concurrency = number('--concurrency', o.concurrency, true)!;
  const retries = number('--retries', o.retries, true)!;
  if (concurrency < 1) throw new UsageError('--concurrency must be at least 1');
  if (retries < 0) throw new UsageError('--retries must be >= 0');
  let text: string;
  try {
    text = readFileSync(o.file === '-' ? 0 : o.file!, 'utf8');
  } catch (e) {
    throw new UsageError(`cannot read ${o.file}: ${(e as Error).message}`);
  }
  const defaults = fieldsFromFlags(o);
  // Blank lines are skipped; `line` in each result is the 1-based line number in the file.
  const requests = text.split('\n').map((l, i) => ({ line: i + 1, raw: l.trim() })).filter((r) => r.raw !== '');
  if (requests.length === 0) throw new UsageError(`${o.file} holds no requests (one JSON object per line)`);

  // Fail fast when the API is not there (or refuses the token) rather than once per line.
  await client.models();

  let out: WriteStream | NodeJS.WriteStream = process.stdout;
  if (o.out && o.out !== '-') {
    out = createWriteStream(o.out);
    await new Promise<void>((resolve, reject) => (out as WriteStream).once('open', () => resolve()).once('error', (e) => reject(new UsageError(`cannot write ${o.out}: ${e.message}`))));
  }
  const run = randomBytes(6).toString('hex');
  const bar = o.progress
    ? new cliProgress.SingleBar({
      stream: process.stderr, hideCursor: true, etaBuffer: 50,
      format: 'strata submit |{bar}| {value}/{total} | ok {ok} | failed {failed} | {rate} req/s | ETA {eta_formatted}',
    }, cliProgress.Presets.shades_classic)
    : null;
  let ok = 0;
  let failed = 0;
  const t0 = Date.now();
  bar?.start(requests.length, 0, { ok, failed, rate: '0.0' });

  const done = new Map<number, BatchResult>();
  let flushed = 0;
  const flush = () => {
    while (done.has(flushed)) {
      out.write(`${JSON.stringify(done.get(flushed))}\n`);
      done.delete(flushed++);
    }
  };

  const runOne = async (i: number): Promise<BatchResult> => {
    const { line, raw } = requests[i];
    let req: Record<string, unknown>;
    try {
      const parsed = JSON.parse(raw) as unknown;
      if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) throw new Error('not a JSON object');
      req = { ...defaults, ...(parsed as Record<string, unknown>) };
    } catch (e) {
      return { line, error: { status: 0, code: 'invalid_line', message: `line ${line} is not a JSON object: ${(e as Error).message}` } };
    }
    delete req.stream;
    // A job_id in the line is its idempotency key; otherwise one per line for this run, so retries never duplicate.
    const key = typeof req.job_id === 'string' ? undefined : `b${run}-${line}`;
    for (let attempt = 0; ; attempt++) {
      try {
        const { jobId, response } = await client.complete(req, key);
        return { line, job_id: jobId, id: response.id, choices: response.choices, usage: response.usage };
      } catch (e) {
        const err = e instanceof ApiClientError ? e : new ApiClientError(0, 'client_error', (e as Error).message);
        if (RETRYABLE.has(err.status) && attempt < retries) {
          await new Promise((r) => setTimeout(r, Math.min(500 * 2 ** attempt, 8000)));
          continue;
        }
        return { line, job_id: err.jobId ?? key ?? (req.job_id as string | undefined), error: { status: err.status, code: err.code, message: err.message } };
      }
    }
  };

  let next = 0;
  await Promise.all(Array.from({ length: Math.min(concurrency, requests.length) }, async () => {
    while (next < requests.length) {
      const i = next++;
      const result = await runOne(i);
      if (result.error) failed++;
      else ok++;
      done.set(i, result);
      flush();
      bar?.update(ok + failed, { ok, failed, rate: ((ok + failed) / Math.max(0.001, (Date.now() - t0) / 1000)).toFixed(1) });
    }
  }));
  bar?.stop();
  if (out !== process.stdout) await new Promise<void>((r) => (out as WriteStream).end(r));
  console.error(`strata submit: ${requests.length} requests, ${ok} ok, ${failed} failed in ${((Date.now() - t0) / 1000).toFixed(1)} s${o.out && o.out !== '-' ? `; results in ${o.out}` : ''}`);
  return failed > 0 ? 1 : 0;
}

// ---- Commands --------------------------------------------------------------------------------------------------

const collect = (v: string, prev: string[] = []) => [...prev, v];

export function registerSubmitCommands(program: Command): void {
  program
    .command('submit')
    .description('send completion requests to a strata API: one (tokens stream to stdout) or a JSONL file of them (--file)')
    .option('--url <url>', 'the API (STRATA_URL)', DEFAULT_URL())
    .option('--api-token <token>', 'bearer token the API requires (STRATA_API_TOKEN)', process.env.STRATA_API_TOKEN)
    .option('--prompt <text>', 'prompt text (the model needs a tokenizer)')
    .option('--ids <ids>', 'prompt token ids, comma-separated')
    .option('--file <path>', 'JSONL: one request per line with OpenAI completion fields ("-" = stdin)')
    .option('--out <path>', 'with --file: where results go, one JSON per input line in input order (default stdout)')
    .option('--concurrency <n>', 'with --file: requests in flight at once', '8')
    .option('--retries <n>', 'with --file: retries of a request the API could not take (429/503/unreachable)', '3')
    .option('--max-tokens <n>', 'tokens to generate (in a batch: the default for lines without max_tokens)')
    .option('--temperature <t>', 'sampling temperature; 0 = greedy (the API\'s default is 1, as OpenAI\'s)')
    .option('--top-k <k>', 'sample from the k most likely tokens')
    .option('--top-p <p>', 'nucleus sampling mass')
    .option('--seed <s>', 'sampling seed (reproducible output)')
    .option('--stop <text>', 'stop string (repeatable)', collect)
    .option('--stop-token-ids <ids>', 'stop after any of these token ids, comma-separated')
    .option('--model <name>', 'model name to check against the server\'s')
    .option('--job-id <key>', 'idempotency key: resubmitting the same key returns the same job instead of running it again')
    .option('--format <format>', 'single request: print "text" or token "ids" (default: text for --prompt, ids for --ids)')
    .option('--json', 'single request: wait for the whole answer and print it as one JSON object (with job_id)')
    .option('--no-progress', 'with --file: no progress bar')
    .action(async (o: SubmitOptions) => {
      try {
        if (o.format !== undefined && o.format !== 'text' && o.format !== 'ids') throw new UsageError(`--format must be text or ids, got "${o.format}"`);
        const client = new StrataClient({ url: o.url, apiToken: o.apiToken });
        if (o.file !== undefined) process.exitCode = await submitBatch(o, client);
        else await submitOne(o, client);
      } catch (e) {
        fail(e);
      }
    });

  program
    .command('status')
    .description('print a job of a strata API (state, result or error, attempts) as JSON')
    .argument('<job-id>', 'the job id (printed by strata submit; the x-strata-job-id header; the completion id without "cmpl-")')
    .option('--url <url>', 'the API (STRATA_URL)', DEFAULT_URL())
    .option('--api-token <token>', 'bearer token the API requires (STRATA_API_TOKEN)', process.env.STRATA_API_TOKEN)
    .action(async (jobId: string, o: { url: string; apiToken?: string }) => {
      try {
        const client = new StrataClient({ url: o.url, apiToken: o.apiToken });
        const id = jobId.startsWith('cmpl-') ? jobId.slice(5) : jobId;
        process.stdout.write(`${JSON.stringify(await client.job(id), null, 2)}\n`);
      } catch (e) {
        fail(e);
      }
    });
}
