import type { Command } from 'commander';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { createServer } from 'node:net';
import { basename, resolve } from 'node:path';
import pino from 'pino';
import { Redis } from 'ioredis';
import { loadModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { isStrataError, StrataError } from '../model/errors.ts';
import { loadTokenizer } from '../model/tokenizer.ts';
import type { WeightDType } from '../model/stage-graph.ts';
import { parseStageDType } from '../model/dtype.ts';
import { chainMsOption } from './worker.ts';
import { decodeStepsOption, DEFAULT_DECODE_STEPS, RemotePipeline } from '../coordinator/remote-pipeline.ts';
import { MAX_DECODE_STEPS } from '../model/generation.ts';
import { startCoordinatorService } from '../coordinator/service.ts';
import { observeStageForward, observeStageTransfer, watchKvSlots } from '../coordinator/metrics.ts';
import { WorkerSupervisor } from './supervisor.ts';
import { availableMemory, checkDtypeOnDevice, checkStageFits, memoryLimitFromFlag } from '../model/memory.ts';
import { parseDevice } from '../model/executor.ts';
import { planPartition } from '../coordinator/planner.ts';
import type { ModelSpec } from '../model/config.ts';
import { LoadBoard, PendingPipeline } from '../coordinator/load-board.ts';
import { createLoadDisplay } from './progress-bar.ts';
import { availableParallelism } from 'node:os';
import { BUILTIN_MODEL } from './run-commands.ts';
import { loadCredentials, tlsFromEnv } from '../transport/grpc/tls.ts';
import { loadChatTemplateFile } from '../model/chat-template.ts';
import type { StrataTokenizer } from '../model/tokenizer.ts';

const log = pino({ name: 'strata' }, pino.destination(2));

interface ServeOptions {
  model: string;
  port: string;
  host: string;
  redis: string;
  dtype: WeightDType;
  apiToken?: string;
  concurrency: string;
  decodeSteps?: string;
  spares?: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  chatTemplate?: string;
}

/**
 * Serves the API + queue at once, then connects to the workers (retrying while they start, as pods do in any
 * order) and configures them; until they have loaded, /health answers 503 saying which stage is building or loading,
 * /v1/pipeline shows each stage's state, and jobs wait. `showProgress`: a bar or log lines per stage (strata up's
 * supervisor shows its own).
 */
async function serve(o: ServeOptions, addresses: string[], onStop: () => Promise<void> = async () => {}, showProgress = true) {
  const decodeSteps = decodeStepsOption(o.decodeSteps);
  const spec = loadModelSpec(o.model);
  const ck = Checkpoint.open(o.model);
  const fingerprint = ck.fingerprint();
  ck.close();
  const tokenizer = await loadTokenizer(o.model, spec);
  const chatTemplate = o.chatTemplate ? loadChatTemplateFile(o.chatTemplate) : undefined;
  const credentials = loadCredentials(tlsFromEnv(o))?.client;
  const display = createLoadDisplay((obj, msg) => log.info(obj, msg));
  const board = new LoadBoard(addresses, credentials, (i, v) => showProgress && v.load && display.update(`stage ${i}`, v.load)).start();
  const pending = new PendingPipeline<RemotePipeline>();
  const healthy = () => !!pending.pipeline?.isHealthy;
  const service = await startCoordinatorService({
    pipeline: pending, spec, tokenizer, redisUrl: o.redis, port: Number(o.port), host: o.host, authToken: o.apiToken,
    concurrency: Number(o.concurrency), chatTemplate, pipelineInfo: () => pipelineView(pending.pipeline, board), health: healthy,
    healthDetail: () => (healthy() ? {} : { reason: board.reason() ?? (pending.pipeline ? 'the pipeline is recovering from a fault' : 'configuring the pipeline') }),
    log: log.child({ name: 'strata-coordinator' }), modelName: basename(resolve(o.model)),
  });
  let pipeline: RemotePipeline | undefined;
  const stop = async () => {
    log.info('shutting down: finishing active jobs');
    display.stop();
    board.close();
    await service.close();
    pipeline?.close();
    await onStop();
    process.exit(0);
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  for (let attempt = 1; !pipeline; attempt++) {
    try {
      pipeline = await RemotePipeline.connect(addresses, {
        spec, fingerprint, dtype: parseStageDType(o.dtype), log: (obj, msg) => log.info(obj, msg),
        spares: o.spares ? o.spares.split(',').map((a) => a.trim()).filter(Boolean) : [],
        credentials,
        decodeSteps,
        // A chained request's timing covers several steps: the histogram is per step.
        onTiming: (stage, t) => (observeStageForward(stage, t.run_ms / 1000, t.steps || 1, t.ahead === true), observeStageTransfer(stage, t)),
      });
    } catch (e) {
      if (isStrataError(e) && e.kind !== 'unavailable') throw e;
      if (attempt === 1 || attempt % 10 === 0) log.warn({ err: (e as Error).message }, 'waiting for workers');
      await new Promise((r) => setTimeout(r, Math.min(500 * attempt, 5_000)));
    }
  }
  pipeline.startHealthMonitor();
  await board.poll(); // every stage has answered Configure: its state says serving before /health says 200
  pending.set(pipeline);
  const served = pipeline;
  watchKvSlots(() => served.slots);
  display.stop();
  return { service, pipeline, tokenizer, hasChat: !!(chatTemplate ?? tokenizer?.chatTemplate) };
}

/**
 * Before any process starts: the dtype must make sense on the device, and every stage of the plan the coordinator
 * will make must fit a worker's share of memory (--memory-limit-mb, else the host's available memory / K).
 * Returns the per-worker limit the workers are started with.
 */
function checkLocalPlan(spec: ModelSpec, k: number, o: { dtype: WeightDType; device?: string; kvBudgetMb?: string; memoryLimitMb?: string; maxBatch?: string }): number {
  checkDtypeOnDevice(o.dtype, parseDevice(o.device).kind);
  const flag = memoryLimitFromFlag(o.memoryLimitMb);
  const limit = flag ?? Math.floor(availableMemory() / k);
  const kvBudgetBytes = Number(o.kvBudgetMb ?? 2048) * 2 ** 20;
  const plan = planPartition(spec, Array.from({ length: k }, (_, i) => ({ id: `worker ${i}`, memoryBytes: Infinity })), { dtype: o.dtype });
  const where = flag ? 'each worker (--memory-limit-mb)' : `each worker (the host's available memory shared by ${k} workers)`;
  const rows = o.maxBatch === undefined ? undefined : Number(o.maxBatch);
  for (const s of plan.stages) checkStageFits(spec, s.range, o.dtype, { kvBudgetBytes, rows, deviceKind: parseDevice(o.device).kind, limitBytes: limit, where, stages: k });
  return limit;
}

/** /v1/pipeline: the plan's stages with each one's load state; while the workers load, the workers as the LoadBoard sees them. */
function pipelineView(pipeline: RemotePipeline | null, board: LoadBoard) {
  const seen = new Map(board.workers.map((w) => [w.address, w]));
  if (!pipeline) {
    return {
      ready: false,
      stages: board.workers.map((w) => {
        const range = /^\[(\d+), (\d+)\)$/.exec(w.load?.range ?? '');
        return { blocks: (range ? [Number(range[1]), Number(range[2])] : [0, 0]) as [number, number], address: w.address, healthy: false, state: w.state, load: w.load };
      }),
    };
  }
  return {
    ready: true,
    // Sessions the pipeline admits at once (its stages' fewest KV slots; null: no limit) and those waiting for one.
    kv_slots: pipeline.slots,
    stages: pipeline.describe().stages.map((s) => {
      const w = seen.get(s.address);
      return { ...s, state: w?.state ?? (s.healthy ? 'serving' : 'unreachable'), load: w?.load ?? null };
    }),
  };
}

const addServeOptions = (cmd: Command) =>
  cmd
    .option('--port <port>', 'HTTP API port', process.env.STRATA_PORT ?? '8080')
    .option('--host <host>', 'HTTP API bind address', process.env.STRATA_HOST ?? '127.0.0.1')
    .option('--redis <url>', 'Redis for the request queue', process.env.REDIS_URL ?? 'redis://127.0.0.1:6379')
    .option('--dtype <dtype>', 'weight dtype of the stage graphs: float32 | float16 | int8 | int4 (int8/int4: weight-only block-quantized, float32 activations)', process.env.STRATA_DTYPE ?? 'float32')
    .option('--api-token <token>', 'require "Authorization: Bearer <token>" on the API (STRATA_API_TOKEN)', process.env.STRATA_API_TOKEN)
    .option('--concurrency <n>', 'requests taken from the queue at once; at most as many as the stages have KV slots run, the rest wait for one', process.env.STRATA_CONCURRENCY ?? '8')
    .option('--decode-steps <n>', `decode steps per request to a one-stage pipeline, chained by its worker (1-${MAX_DECODE_STEPS}; streamed tokens arrive in bursts of up to n) (STRATA_DECODE_STEPS; default ${DEFAULT_DECODE_STEPS})`, process.env.STRATA_DECODE_STEPS)
    .option('--spares <addresses>', 'standby workers that take over a dead stage, comma-separated host:port', process.env.STRATA_SPARES)
    .option('--tls-cert <pem>', 'mutual TLS to the workers: this node\'s certificate (STRATA_TLS_CERT)')
    .option('--tls-key <pem>', 'mutual TLS: its private key (STRATA_TLS_KEY)')
    .option('--tls-ca <pem>', 'mutual TLS: CA that signs the workers\' certificates (STRATA_TLS_CA)')
    .option('--chat-template <file>', 'Jinja chat template for /v1/chat/completions, overriding tokenizer_config.json\'s (STRATA_CHAT_TEMPLATE)', process.env.STRATA_CHAT_TEMPLATE);

/** The worker options `strata up` passes on to each worker it starts (each with its STRATA_* fallback, as `strata worker`). */
const WORKER_OPTIONS: [flag: string, option: string][] = [['--threads', 'threads'], ['--max-batch', 'maxBatch'], ['--kv-budget-mb', 'kvBudgetMb'], ['--device', 'device'], ['--run-ahead', 'runAhead'], ['--chain-ms', 'chainMs']];
const workerArgs = (o: Record<string, unknown>): string[] => WORKER_OPTIONS.flatMap(([flag, key]) => (o[key] === undefined ? [] : [flag, String(o[key])]));

const fail = (e: unknown) => {
  console.error(`strata: ${isStrataError(e) ? `${e.message} [${e.code}]` : (e as Error).stack}`);
  process.exit(2);
};

export function registerServeCommands(program: Command): void {
  addServeOptions(
    program
      .command('coordinator')
      .description('serve the HTTP API and consume the request queue, driving workers that are already running')
      .requiredOption('--model <dir>', 'Hugging Face model directory (config, tokenizer; must match the workers)', process.env.STRATA_MODEL)
      .requiredOption('--workers <addresses>', 'worker addresses in pipeline order, comma-separated host:port', process.env.STRATA_WORKERS),
  ).action(async (o) => {
    try {
      const addresses = String(o.workers).split(',').map((a: string) => a.trim()).filter(Boolean);
      const { service } = await serve(o, addresses);
      log.info({ url: service.url, workers: addresses }, 'coordinator ready');
    } catch (e) {
      fail(e);
    }
  });

  addServeOptions(
    program
      .command('up')
      .description('start K workers, a coordinator and the HTTP API in the foreground (Ctrl-C stops everything)')
      .option('--model <dir>', 'Hugging Face model directory (default: the built-in tiny GPT-2)', process.env.STRATA_MODEL ?? BUILTIN_MODEL)
      .option('--workers <k>', 'number of worker processes (pipeline stages)', '2')
      .option('--threads <n>', 'ORT intra-op threads per worker (STRATA_THREADS; default: the cores shared equally)', process.env.STRATA_THREADS)
      .option('--max-batch <n>', 'decode steps batched into one ORT run per worker (STRATA_MAX_BATCH)', process.env.STRATA_MAX_BATCH)
      .option('--kv-budget-mb <mb>', 'KV-cache memory budget per worker (STRATA_KV_BUDGET_MB)', process.env.STRATA_KV_BUDGET_MB)
      .option('--run-ahead <on|off>', 'one worker: run each session\'s next decode step before it is asked (STRATA_RUN_AHEAD; default on)', process.env.STRATA_RUN_AHEAD)
      .option('--chain-ms <ms>', 'one worker: answer a request for several decode steps once they have run this long (STRATA_CHAIN_MS; default 50)', process.env.STRATA_CHAIN_MS)
      .option('--memory-limit-mb <mb>', 'memory each worker may use; a plan that needs more is refused before loading (STRATA_MEMORY_LIMIT_MB; default: the host\'s available memory shared by the workers)', process.env.STRATA_MEMORY_LIMIT_MB)
      .option('--device <device>', 'cpu | cuda:N | webgpu for every worker (STRATA_DEVICE); a device that cannot start fails the worker, never a silent fallback', process.env.STRATA_DEVICE),
  ).action(async (o) => {
    let cluster: WorkerSupervisor | undefined;
    let redis: ChildProcess | undefined;
    try {
      const redisUrl = await ensureRedis(o.redis, (child) => (redis = child));
      decodeStepsOption(o.decodeSteps); // bad values fail before any worker starts
      if (o.chainMs !== undefined) chainMsOption(o.chainMs);
      const spec = loadModelSpec(o.model);
      const k = Math.min(Number(o.workers), spec.blocks);
      const memoryLimit = checkLocalPlan(spec, k, o);
      console.error(`strata: starting ${k} workers for ${o.model} …`);
      const tls = tlsFromEnv(o);
      // Each worker gets an equal share of the cores unless --threads says otherwise.
      const threads = o.threads ? [] : ['--threads', String(Math.max(1, Math.floor(availableParallelism() / k)))];
      // More threads than cores in all: ORT's threads must not spin waiting for work (model/executor.ts, ortSpin).
      if (o.threads && k * Number(o.threads) > availableParallelism()) process.env.STRATA_ORT_SPIN ??= '0';
      threads.push('--memory-limit-mb', String(Math.floor(memoryLimit / 2 ** 20)));
      const display = createLoadDisplay((obj, msg) => log.info(obj, msg));
      cluster = new WorkerSupervisor({
        modelDir: o.model, count: k, args: [...threads, ...workerArgs(o), ...(tls.cert ? ['--tls-cert', tls.cert, '--tls-key', tls.key!, '--tls-ca', tls.ca!] : [])],
        log: (level, obj, msg) => log[level](obj, msg),
        onLoad: (i, p) => display.update(`worker ${i}`, p),
        // A worker that keeps dying: stop everything and say why (the supervisor has stopped the workers).
        onFatal: (e) => {
          display.stop();
          redis?.kill('SIGTERM');
          fail(e);
        },
      });
      const workers = await cluster.start();
      const stop = async () => {
        await cluster?.stop();
        redis?.kill('SIGTERM');
      };
      const { service, pipeline, tokenizer, hasChat } = await serve({ ...o, redis: redisUrl }, workers.map((w) => w.address), stop, false);
      printWelcome(service.url, pipeline.describe().stages, spec.causal, tokenizer, hasChat, resolve(o.model) === resolve(BUILTIN_MODEL));
    } catch (e) {
      await cluster?.stop();
      redis?.kill('SIGTERM');
      fail(e);
    }
  });
}

function printWelcome(url: string, stages: { blocks: [number, number]; address: string; pid?: number }[], causal: boolean, tokenizer: StrataTokenizer | null, hasChat: boolean, demo: boolean) {
  const curl = (route: string, body: unknown) => `  curl -s ${url}/${route} -H 'content-type: application/json' -d '${JSON.stringify(body)}'\n`;
  const tries = !causal
    ? [curl('v1/fill-mask', { input_ids: [85, 127, 281, 97, 299, 228], mask_index: 4 })]
    : [
        curl('v1/completions', { prompt: tokenizer ? 'Hello, my name is' : [229, 49, 46, 89, 242], max_tokens: 12 }),
        ...(hasChat && tokenizer ? [curl('v1/chat/completions', { messages: [{ role: 'user', content: 'Say hello.' }], max_tokens: 12 })] : []),
      ];
  process.stdout.write(
    `\nstrata is serving at ${url}\n` +
      stages.map((s, i) => `  stage ${i}: blocks [${s.blocks[0]}, ${s.blocks[1]}) at ${s.address} (pid ${s.pid})`).join('\n') +
      (demo ? `\n\nThis is the built-in demo model (models/demo): GPT-2's real tokenizer and vocabulary with RANDOM weights,\nso its answers are real GPT-2 tokens in no meaningful order. Serve your own with --model DIR.` : '') +
      `\n\nTry:\n${tries.join('')}\n` +
      `Pipeline: ${url}/v1/pipeline   Health: ${url}/health   Metrics: ${url}/metrics\nCtrl-C stops everything.\n`,
  );
}

/** Uses Redis at `url` when it answers; otherwise starts a private redis-server, or says what to install. */
async function ensureRedis(url: string, onChild: (c: ChildProcess) => void): Promise<string> {
  const probe = new Redis(url, { lazyConnect: true, connectTimeout: 1000, maxRetriesPerRequest: 0, retryStrategy: () => null });
  probe.on('error', () => {});
  try {
    await probe.connect();
    await probe.ping();
    return url;
  } catch {
    /* fall through */
  } finally {
    probe.disconnect();
  }
  try {
    execFileSync('redis-server', ['--version'], { stdio: 'ignore' });
  } catch {
    throw new StrataError('redis_missing', `no Redis answers at ${url} and redis-server is not installed: install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis), set REDIS_URL, or run the whole stack with "docker compose up"`, 'unavailable');
  }
  const port = await freePort();
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
  onChild(child);
  const privateUrl = `redis://127.0.0.1:${port}`;
  for (let i = 0; i < 50; i++) {
    const r = new Redis(privateUrl, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
    r.on('error', () => {});
    try {
      await r.connect();
      await r.ping();
      console.error(`strata: no Redis at ${url}; started a private redis-server at ${privateUrl}`);
      return privateUrl;
    } catch {
      await new Promise((res) => setTimeout(res, 100));
    } finally {
      r.disconnect();
    }
  }
  throw new StrataError('redis_start_failed', `started redis-server on port ${port} but it does not answer`, 'unavailable');
}

const freePort = () =>
  new Promise<number>((resolve, reject) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
