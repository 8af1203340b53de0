import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { LocalPipeline } from '../model/local-pipeline.ts';
import { generate } from '../model/generation.ts';
import type { StrataTokenizer } from '../model/tokenizer.ts';
import type { CoordinatorService } from '../coordinator/service.ts';
import { StrataClient } from '../coordinator/client.ts';
import { expected } from './helpers/fixtures.ts';
import { freePort } from './helpers/redis.ts';
import { startGpt2Service, type Gpt2Service } from './helpers/service.ts';

// `strata submit` / `strata status` as a user runs them (the real CLI in a child process) against a real service:
// LocalPipeline on gpt2-tiny with a byte-level tokenizer, real Redis + BullMQ, bearer auth on.

const STRATA = fileURLToPath(new URL('../bin/strata.js', import.meta.url));
const gpt2Case = expected('gpt2-tiny').generate![0]; // [229, 49, 46, 89, 242] → [9, 5, 5, 156, 62, 62, 62, 62, 62, 62, 9, 62]
const TOKEN = 'submit-test-token';

let redis: { url: string; stop: () => Promise<void> };
let gpt2: LocalPipeline;
let tokenizer: StrataTokenizer;
let svc: CoordinatorService;
const dir = mkdtempSync(join(tmpdir(), 'strata-submit-'));

let service: Gpt2Service;

before(async () => {
  service = await startGpt2Service('submit', { authToken: TOKEN });
  ({ redis, gpt2, tokenizer, svc } = service);
});

after(async () => service?.close());

function strata(args: string[], env: Record<string, string> = {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [STRATA, ...args], { env: { ...process.env, STRATA_API_TOKEN: '', STRATA_URL: '', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

const auth = ['--api-token', TOKEN];

test('submit --ids streams the greedy tokens to stdout, the job id to stderr; status prints that job', async () => {
  const r = await strata(['submit', '--url', svc.url, ...auth, '--ids', gpt2Case.input_ids.join(','), '--max-tokens', '12', '--temperature', '0']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout, `${gpt2Case.output_ids.join(' ')}\n`);
  const jobId = /^job (\S+)$/m.exec(r.stderr)?.[1];
  assert.ok(jobId, r.stderr);
  assert.match(r.stderr, /finish_reason length, 12 tokens/);

  const s = await strata(['status', '--url', svc.url, ...auth, jobId!]);
  assert.equal(s.code, 0, s.stderr);
  const job = JSON.parse(s.stdout);
  assert.equal(job.id, jobId);
  assert.equal(job.state, 'completed');
  assert.deepEqual(job.result.choices[0].token_ids, gpt2Case.output_ids);
  // The completion id works too.
  assert.equal(JSON.parse((await strata(['status', '--url', svc.url, ...auth, `cmpl-${jobId}`])).stdout).id, jobId);
});

test('the stream arrives in pieces, and --prompt prints text', async () => {
  const client = new StrataClient({ url: svc.url, apiToken: TOKEN });
  const { jobId, chunks } = await client.stream({ prompt: gpt2Case.input_ids, max_tokens: 12, temperature: 0 });
  assert.ok(jobId);
  let n = 0;
  const ids: number[] = [];
  for await (const c of chunks) {
    n++;
    ids.push(...c.choices[0].token_ids);
  }
  assert.ok(n >= 2, `${n} chunk(s)`);
  assert.deepEqual(ids, gpt2Case.output_ids);

  const prompt = 'Hello, world';
  const want = tokenizer.decode((await generate(gpt2, tokenizer.encode(prompt), { maxNewTokens: 10, eosTokenId: null })).outputIds, { skipSpecialTokens: true });
  const r = await strata(['submit', '--url', `${svc.url}/v1/`, ...auth, '--prompt', prompt, '--max-tokens', '10', '--temperature', '0']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout, `${want}\n`);
});

test('submit --file: results in input order, one per line, with job ids and errors; a job_id line is not run twice', async () => {
  const file = join(dir, 'prompts.jsonl');
  const out = join(dir, 'results.jsonl');
  const lines = [
    JSON.stringify({ prompt: gpt2Case.input_ids, max_tokens: 12 }),
    JSON.stringify({ prompt: 'Hello', max_tokens: 3, temperature: 0 }),
    '{"prompt": [1, 2,',
    '',
    JSON.stringify({ prompt: [1, 999], max_tokens: 2 }),
    JSON.stringify({ prompt: gpt2Case.input_ids, max_tokens: 4, job_id: 'batch-fixed-1' }),
    JSON.stringify({ prompt: [7, 8, 9], max_tokens: 2, n: 2, temperature: 1, seed: 5 }),
  ];
  writeFileSync(file, lines.join('\n') + '\n');
  const r = await strata(['submit', '--url', svc.url, ...auth, '--file', file, '--out', out, '--concurrency', '3', '--temperature', '0']);
  assert.equal(r.code, 1, `some lines failed, so exit 1: ${r.stderr}`);
  assert.match(r.stderr, /6 requests, 4 ok, 2 failed/);
  const results = readFileSync(out, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  assert.deepEqual(results.map((x) => x.line), [1, 2, 3, 5, 6, 7]);
  assert.deepEqual(results[0].choices[0].token_ids, gpt2Case.output_ids, '--temperature 0 is the default for lines without one');
  assert.ok(results[0].job_id && results[0].id === `cmpl-${results[0].job_id}`);
  assert.equal(results[1].choices[0].text, tokenizer.decode(results[1].choices[0].token_ids, { skipSpecialTokens: true }));
  assert.equal(results[2].error.code, 'invalid_line');
  assert.equal(results[3].error.status, 400);
  assert.equal(results[3].error.code, 'token_out_of_range');
  assert.match(results[3].error.message, /prompt\[1\] = 999/);
  assert.equal(results[4].job_id, 'batch-fixed-1');
  assert.deepEqual(results[4].choices[0].token_ids, gpt2Case.output_ids.slice(0, 4));
  assert.equal(results[5].choices.length, 2);

  // The same file again: the job_id line gets its stored answer, the job ran once.
  const again = await strata(['submit', '--url', svc.url, ...auth, '--file', file, '--concurrency', '2', '--temperature', '0', '--no-progress']);
  const second = again.stdout.trim().split('\n').map((l) => JSON.parse(l));
  assert.equal(second[4].job_id, 'batch-fixed-1');
  assert.deepEqual(second[4].choices, results[4].choices);
  const job = await new StrataClient({ url: svc.url, apiToken: TOKEN }).job('batch-fixed-1');
  assert.equal(job.attemptsStarted, 1);
});

test('clear errors, exit 2: nothing listening, a 4xx with the API\'s message, no token, unknown job, bad usage', async () => {
  const dead = `http://127.0.0.1:${await freePort()}`;
  const [refused, invalid, noToken, unknown, usage, batchRefused] = await Promise.all([
    strata(['submit', '--url', dead, '--ids', '1,2']),
    strata(['submit', '--url', svc.url, ...auth, '--ids', '1,999', '--max-tokens', '2']),
    strata(['submit', '--url', svc.url, '--ids', '1,2']),
    strata(['status', '--url', svc.url, ...auth, 'no-such-job']),
    strata(['submit', '--url', svc.url, ...auth, '--max-tokens', '2']),
    strata(['submit', '--url', dead, '--file', join(dir, 'prompts.jsonl')]),
  ]);
  for (const r of [refused, invalid, noToken, unknown, usage, batchRefused]) assert.equal(r.code, 2, r.stderr);
  assert.match(refused.stderr, new RegExp(`${dead.replace(/[.]/g, '\\.')} is not answering \\(connection refused\\)`));
  assert.match(batchRefused.stderr, /is not answering \(connection refused\)/);
  assert.match(invalid.stderr, /prompt\[1\] = 999 is not a token id.*\(HTTP 400, token_out_of_range\)/);
  assert.match(noToken.stderr, /missing or wrong API token.*\(HTTP 401/);
  assert.match(unknown.stderr, /no job no-such-job.*\(HTTP 404, job_not_found\)/);
  assert.match(usage.stderr, /give one of --prompt/);
  for (const r of [refused, invalid, noToken, unknown, usage]) assert.equal(r.stdout, '');
});

