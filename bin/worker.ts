import type { Command } from 'commander';
import pino from 'pino';
import { StageWorker } from '../worker/server.ts';
import { DEFAULT_CHAIN_MS } from '../worker/thread-protocol.ts';
import { isStrataError, StrataError } from '../model/errors.ts';
import { parseSize } from './plan.ts';
import { loadCredentials, tlsFromEnv } from '../transport/grpc/tls.ts';
import { createLoadDisplay } from './progress-bar.ts';
import { memoryLimitFromFlag } from '../model/memory.ts';

/** An on/off flag's value (also 1/0, true/false), or a typed error naming the flag. */
export function onOff(value: string, flag: string): boolean {
  const v = value.trim().toLowerCase();
  if (['on', '1', 'true'].includes(v)) return true;
  if (['off', '0', 'false'].includes(v)) return false;
  throw new StrataError('flag_invalid', `${flag} must be on or off, got '${value}'`);
}

/** --chain-ms: milliseconds ≥ 0. */
export function chainMsOption(value: string): number {
  const ms = Number(value);
  if (value.trim() === '' || !Number.isFinite(ms) || ms < 0) throw new StrataError('flag_invalid', `--chain-ms must be a number of milliseconds ≥ 0, got '${value}'`);
  return ms;
}

export function registerWorkerCommand(program: Command): void {
  program
    .command('worker')
    .description('serve one pipeline stage over gRPC (the coordinator assigns its block range)')
    .requiredOption('--listen <host:port>', 'address to serve the Stage service on (port 0 = any free port)', process.env.STRATA_LISTEN)
    .requiredOption('--model <dir>', 'Hugging Face model directory (config.json + safetensors)', process.env.STRATA_MODEL)
    .option('--device <device>', 'cpu | cuda:N | webgpu (ORT WebGPU EP: KV stays in GPU memory); a device that cannot start is a typed error (device_unavailable), never a silent fallback', process.env.STRATA_DEVICE ?? 'cpu')
    .option('--threads <n>', 'ORT intra-op threads (default: all cores)', process.env.STRATA_THREADS)
    .option('--cache-dir <dir>', 'stage-graph cache directory (STRATA_CACHE_DIR)')
    .option('--kv-budget-mb <mb>', 'memory for KV slots (each holds one session up to the model context); when all are held, a new session takes the slot of one idle >= STRATA_KV_EVICT_IDLE_MS (10 s) or gets kv_slots_exhausted (429)', process.env.STRATA_KV_BUDGET_MB ?? '2048')
    .option('--session-ttl-s <s>', 'drop sessions idle longer than this', process.env.STRATA_SESSION_TTL_S ?? '600')
    .option('--max-batch <n>', 'decode steps of different sessions batched into one ORT run (1 = no batching)', process.env.STRATA_MAX_BATCH ?? '8')
    .option('--run-ahead <on|off>', 'when this worker is the whole pipeline (one stage): run each session\'s next decode step while its token travels to the coordinator and back, answering from it when the step arrives as predicted (STRATA_RUN_AHEAD)', process.env.STRATA_RUN_AHEAD ?? 'on')
    .option('--chain-ms <ms>', `when this worker is the whole pipeline: answer a request for several decode steps once they have run this long, so streamed tokens arrive at least that often (STRATA_CHAIN_MS)`, process.env.STRATA_CHAIN_MS ?? String(DEFAULT_CHAIN_MS))
    .option('--tls-cert <pem>', 'mutual TLS: this node\'s certificate (STRATA_TLS_CERT)')
    .option('--tls-key <pem>', 'mutual TLS: its private key (STRATA_TLS_KEY)')
    .option('--tls-ca <pem>', 'mutual TLS: CA that signs every peer (STRATA_TLS_CA); peers without such a certificate are refused')
    .option('--memory-limit-mb <mb>', 'refuse (before loading) a stage that needs more memory than this; default: the host\'s available memory (STRATA_MEMORY_LIMIT_MB)', process.env.STRATA_MEMORY_LIMIT_MB)
    .option('--memory <size>', 'memory this worker offers the planner, e.g. 24GB (default: unlimited)', process.env.STRATA_WORKER_MEMORY)
    .option('--speed <x>', 'relative speed this worker reports to the planner', process.env.STRATA_WORKER_SPEED ?? '1')
    .action(async (o) => {
      const log = pino({ name: 'strata-worker' }, pino.destination(2));
      let worker: StageWorker;
      // Load progress: a bar on a terminal, plain log lines otherwise; and one JSON line per change on stdout for a
      // launcher (strata up's supervisor names what a worker was doing when it died).
      const display = createLoadDisplay((obj, msg) => log.info(obj, msg));
      try {
        worker = new StageWorker({
          listen: o.listen, modelDir: o.model, device: o.device, threads: o.threads ? Number(o.threads) : undefined, cacheDir: o.cacheDir,
          kvBudgetBytes: Number(o.kvBudgetMb) * 2 ** 20, sessionTtlMs: Number(o.sessionTtlS) * 1000,
          memoryBytes: o.memory ? parseSize(o.memory) : undefined, memoryLimitBytes: memoryLimitFromFlag(o.memoryLimitMb), speed: Number(o.speed), maxBatch: Number(o.maxBatch),
          runAhead: onOff(o.runAhead, '--run-ahead'), chainMs: chainMsOption(o.chainMs),
          credentials: loadCredentials(tlsFromEnv(o)),
          log: (obj, msg) => log.info(obj, msg),
          onLoad: (p) => {
            display.update('stage', p);
            process.stdout.write(JSON.stringify({ event: 'load', ...p }) + '\n');
          },
        });
      } catch (e) {
        console.error(`strata worker: ${isStrataError(e) ? e.message : (e as Error).stack}`);
        process.exit(2);
      }
      const address = await worker.listen();
      // One machine-readable line on stdout: launchers (strata up, --stages K) wait for it.
      process.stdout.write(JSON.stringify({ event: 'listening', address, pid: process.pid, fingerprint: worker.fingerprint }) + '\n');
      log.info({ address, model: o.model, blocks: worker.spec.blocks }, 'worker listening');
      const stop = async () => {
        await worker.close();
        process.exit(0);
      };
      process.once('SIGINT', stop);
      process.once('SIGTERM', stop);
    });
}
