/**
 * The queue's overhead, measured: the same greedy requests on the same 2-worker gRPC pipeline, once through the
 * HTTP API + BullMQ queue (startCoordinatorService, fetch with stream: true, tokens read from the SSE stream) and
 * once directly (generate() on the RemotePipeline), interleaved, several repetitions; medians and ratios.
 *
 *   node --import tsx test/bench-http.ts [--preset gpt2-small|gpt2-tiny] [--reps 7] [--prompt 16] [--new 32] [--concurrency 1,4]
 *
 * gpt2-small is a synthetic GPT-2-small-shaped checkpoint (model/synthetic.ts PRESETS, cached under
 * STRATA_CACHE_DIR); gpt2-tiny is the test fixture. Redis: REDIS_URL when it answers, else a private redis-server.
 * Not part of npm test.
 */
import { parseArgs } from 'node:util';
import { randomUUID } from 'node:crypto';
import { pino } from 'pino';
import { loadModelSpec } from '../model/config.ts';
import { evenSplit } from '../model/range.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { generate } from '../model/generation.ts';
import { PRESETS } from '../model/synthetic.ts';
import { RemotePipeline } from '../coordinator/remote-pipeline.ts';
import { startCoordinatorService } from '../coordinator/service.ts';
import { prebuildStages, prepareModel } from '../bench/runner.ts';
import { silentProgress, createProgress } from '../bench/progress.ts';
import { median } from '../bench/stats.ts';
import { startLocalCluster } from '../bin/local-cluster.ts';
import { fixtureDir } from './helpers/fixtures.ts';
import { redisUrlForTests } from './helpers/redis.ts';

const { values: args } = parseArgs({
  options: {
    preset: { type: 'string', default: 'gpt2-small' },
    reps: { type: 'string', default: '7' },
    prompt: { type: 'string', default: '16' },
    new: { type: 'string', default: '32' },
    concurrency: { type: 'string', default: '1,4' },
    workers: { type: 'string', default: '2' },
  },
});
const REPS = Number(args.reps);
const PROMPT = Number(args.prompt);
const NEW = Number(args.new);
const LEVELS = args.concurrency!.split(',').map(Number);
const K = Number(args.workers);

interface Sample {
  /** Request start → first generated token seen by the caller. */
  ttftMs: number;
  /** Request start → last token. */
  totalMs: number;
  tokens: number;
  ids: number[];
}

const now = () => performance.now();
const log = (msg: string) => process.stderr.write(`${msg}\n`);

async function main() {
  const progress = process.stderr.isTTY ? createProgress() : silentProgress;
  let modelDir: string;
  let label: string;
  let bench: ReturnType<typeof prepareModel> | undefined;
  if (args.preset === 'gpt2-tiny') {
    modelDir = fixtureDir('gpt2-tiny');
    label = 'gpt2-tiny fixture (4 blocks, d 64, vocab 256)';
  } else {
    const shape = PRESETS[args.preset!];
    if (!shape) throw new Error(`unknown preset ${args.preset}; one of gpt2-tiny, ${Object.keys(PRESETS).join(', ')}`);
    bench = prepareModel(shape, progress);
    modelDir = bench.dir;
    label = `synthetic ${args.preset} (${shape.blocks} blocks, d ${shape.dModel}, ${shape.heads} heads, vocab ${shape.vocab}, float32)`;
  }
  const spec = loadModelSpec(modelDir);
  const ranges = evenSplit(spec.blocks, K);
  if (bench) {
    log('building stage graphs (cached after the first run) …');
    prebuildStages(bench, ranges, progress);
  }
  const ck = Checkpoint.open(modelDir);
  const fingerprint = ck.fingerprint();
  ck.close();

  log(`starting ${K} workers …`);
  const cluster = await startLocalCluster(modelDir, K);
  const redis = await redisUrlForTests();
  const pipeline = await RemotePipeline.connect(cluster.workers.map((w) => w.address), { spec, fingerprint, ranges });
  const queueName = `strata-bench-http-${randomUUID().slice(0, 8)}`;
  const svc = await startCoordinatorService({
    pipeline, spec, tokenizer: null, redisUrl: redis.url, host: '127.0.0.1', port: 0, queueName, concurrency: 16, maxQueued: 0,
    modelName: 'bench', log: pino({ level: 'silent' }), pipelineInfo: () => pipeline.describe(),
  });

  const prompt = (i: number) => Array.from({ length: PROMPT }, (_, j) => (17 * i + 31 * j + 7) % spec.vocab);

  const direct = async (ids: number[]): Promise<Sample> => {
    const t0 = now();
    let first = 0;
    let last = 0;
    const { outputIds } = await generate(pipeline, ids, {
      maxNewTokens: NEW, eosTokenId: null, sampling: { temperature: 0 },
      onToken: () => {
        last = now();
        if (!first) first = last;
      },
    });
    return { ttftMs: first - t0, totalMs: last - t0, tokens: outputIds.length, ids: outputIds };
  };

  const http = async (ids: number[]): Promise<Sample> => {
    const t0 = now();
    const res = await fetch(`${svc.url}/v1/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: ids, max_tokens: NEW, temperature: 0, ignore_eos: true, stream: true }),
    });
    if (!res.ok) throw new Error(`HTTP ${res.status}: ${await res.text()}`);
    let first = 0;
    let last = 0;
    const out: number[] = [];
    const decoder = new TextDecoder();
    let buf = '';
    for await (const part of res.body as unknown as AsyncIterable<Uint8Array>) {
      buf += decoder.decode(part, { stream: true });
      let end: number;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const data = buf.slice(6, end);
        buf = buf.slice(end + 2);
        if (data === '[DONE]') continue;
        const chunk = JSON.parse(data) as { error?: unknown; choices: { token_ids: number[] }[] };
        if (chunk.error) throw new Error(JSON.stringify(chunk.error));
        const got = chunk.choices[0]?.token_ids ?? [];
        if (got.length > 0) {
          last = now();
          if (!first) first = last;
          out.push(...got);
        }
      }
    }
    return { ttftMs: first - t0, totalMs: last - t0, tokens: out.length, ids: out };
  };

  interface Row { level: number; path: string; ttft: number[]; decode: number[]; e2e: number[]; total: number[] }
  const rows: Row[] = [];
  try {
    log('warming up …');
    for (const run of [direct, http]) await Promise.all(Array.from({ length: Math.max(...LEVELS) }, (_, i) => run(prompt(1000 + i))));

    for (const level of LEVELS) {
      const acc = { direct: { ttft: [] as number[], decode: [] as number[], e2e: [] as number[], total: [] as number[] }, http: { ttft: [] as number[], decode: [] as number[], e2e: [] as number[], total: [] as number[] } };
      for (let rep = 0; rep < REPS; rep++) {
        // Interleaved, and the order alternates so neither path always runs on a warmer machine.
        const order = rep % 2 === 0 ? (['direct', 'http'] as const) : (['http', 'direct'] as const);
        const results: Partial<Record<'direct' | 'http', Sample[]>> = {};
        for (const path of order) {
          const run = path === 'direct' ? direct : http;
          const t0 = now();
          const samples = await Promise.all(Array.from({ length: level }, (_, i) => run(prompt(rep * 100 + i))));
          const wall = now() - t0;
          results[path] = samples;
          const a = acc[path];
          for (const s of samples) {
            a.ttft.push(s.ttftMs);
            // Per request: decode rate after the first token; e2e: all tokens over the request's whole time.
            a.decode.push(((s.tokens - 1) * 1000) / (s.totalMs - s.ttftMs));
          }
          // Aggregate: every token of the level's requests over the wall time they took together.
          a.e2e.push((samples.reduce((n, s) => n + s.tokens, 0) * 1000) / wall);
          a.total.push(wall);
        }
        for (let i = 0; i < level; i++) {
          const d = results.direct![i].ids.join(',');
          if (d !== results.http![i].ids.join(',')) throw new Error(`greedy outputs differ between the paths (rep ${rep}, request ${i})`);
          if (results.direct![i].tokens !== NEW || results.http![i].tokens !== NEW) throw new Error('a request generated fewer tokens than asked');
        }
      }
      rows.push({ level, path: 'direct', ...acc.direct }, { level, path: 'http', ...acc.http });
    }
  } finally {
    await svc.queue.queue.obliterate({ force: true }).catch(() => {});
    await svc.close();
    pipeline.close();
    await cluster.stop();
    await redis.stop();
  }

  // ---- Report ----
  const f = (v: number, d = 1) => (Number.isFinite(v) ? v.toFixed(d) : '-');
  const lines: string[] = [];
  lines.push(`HTTP + BullMQ queue vs direct generate() — ${label}`);
  lines.push(`${K} worker processes over gRPC on loopback (${ranges.map((r) => `[${r.first}, ${r.last})`).join(' ')}), prompt ${PROMPT} tokens, ${NEW} new tokens, greedy; ${REPS} interleaved repetitions; medians`);
  lines.push(`node ${process.version}, ${(await import('node:os')).availableParallelism()} cores; Redis ${redis.url.replace(/\/\/[^@/]*@/, '//***@')}`);
  lines.push('');
  lines.push('| concurrent requests | path | TTFT ms | decode tok/s per request | aggregate tok/s | wall ms per round |');
  lines.push('|---:|---|---:|---:|---:|---:|');
  for (const r of rows) {
    lines.push(`| ${r.level} | ${r.path === 'http' ? 'HTTP + queue (SSE)' : 'direct generate()'} | ${f(median(r.ttft))} | ${f(median(r.decode))} | ${f(median(r.e2e))} | ${f(median(r.total), 0)} |`);
  }
  lines.push('');
  lines.push('| concurrent requests | TTFT HTTP / direct | TTFT added ms | decode tok/s HTTP / direct | aggregate tok/s HTTP / direct |');
  lines.push('|---:|---:|---:|---:|---:|');
  for (const level of LEVELS) {
    const d = rows.find((r) => r.level === level && r.path === 'direct')!;
    const h = rows.find((r) => r.level === level && r.path === 'http')!;
    lines.push(`| ${level} | ${f(median(h.ttft) / median(d.ttft), 2)} | ${f(median(h.ttft) - median(d.ttft))} | ${f(median(h.decode) / median(d.decode), 3)} | ${f(median(h.e2e) / median(d.e2e), 3)} |`);
  }
  process.stdout.write(`${lines.join('\n')}\n`);
}

await main();
process.exit(0);
