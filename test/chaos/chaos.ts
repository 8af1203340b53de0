import { loadModelSpec } from '../../model/config.ts';
import { Checkpoint } from '../../model/safetensors.ts';
import { LocalPipeline } from '../../model/local-pipeline.ts';
import { generate } from '../../model/generation.ts';
import { RemotePipeline } from '../../coordinator/remote-pipeline.ts';
import { startWorkerProcess, type LocalWorker } from '../../bin/local-cluster.ts';

export interface ChaosOptions {
  modelDir: string;
  requests: number;
  concurrency: number;
  newTokens: number;
  stages: number;
  spares: number;
  /** Mean milliseconds between kills. */
  killEveryMs: number;
  seed?: number;
  log?: (msg: string) => void;
}

export interface ChaosReport {
  requests: number;
  lost: number;
  wrong: number;
  kills: number;
  restarts: number;
  recoveries: number;
  recoveryMs: { p50: number; max: number };
  latencyMs: { p50: number; p95: number; max: number };
  wallMs: number;
}

const pct = (xs: number[], p: number) => (xs.length ? [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(p * xs.length))] : 0);

/**
 * Real worker processes, SIGKILLed at random during a stream of requests and restarted at their address a little
 * later (as a supervisor or Kubernetes would). Every request must complete with exactly its fault-free output.
 */
export async function runChaos(o: ChaosOptions): Promise<ChaosReport> {
  let seed = o.seed ?? 7;
  const rand = () => ((seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0) / 4294967296);
  const spec = loadModelSpec(o.modelDir);
  const prompts = Array.from({ length: o.requests }, (_, i) => Array.from({ length: 3 + (i % 9) }, () => Math.floor(rand() * spec.vocab)));
  const reference = await LocalPipeline.load(o.modelDir, 1);
  const expected: number[][] = [];
  for (const p of prompts) expected.push((await generate(reference, p, { maxNewTokens: o.newTokens, eosTokenId: null })).outputIds);
  await reference.close();

  const slots: LocalWorker[] = await Promise.all(Array.from({ length: o.stages + o.spares }, () => startWorkerProcess(o.modelDir, ['--threads', '1'])));
  const addresses = slots.map((w) => w.address);
  const recoveryMs: number[] = [];
  const pipeline = await RemotePipeline.connect(addresses.slice(0, o.stages), {
    spec, fingerprint: Checkpoint.open(o.modelDir).fingerprint(), spares: addresses.slice(o.stages),
    recoveryTimeoutMs: 60_000, replaceGraceMs: 3_000, onRecovery: (ms) => recoveryMs.push(ms),
  });
  pipeline.startHealthMonitor(1_000);

  let kills = 0;
  let restarts = 0;
  let done = false;
  // The first kill comes as the first request completes, so that it lands mid-stream however fast the stream runs
  // (a faster decode once finished 24 requests before a first kill timed from the start); the rest at random.
  let firstCompleted: () => void = () => {};
  const firstDone = new Promise<void>((r) => (firstCompleted = r));
  const chaos = (async () => {
    for (let first = true; !done; first = false) {
      await (first ? firstDone : new Promise((r) => setTimeout(r, o.killEveryMs * (0.5 + rand()))));
      if (done) break;
      const i = Math.floor(rand() * slots.length);
      const victim = slots[i];
      if (victim.process.exitCode !== null || victim.process.signalCode !== null) continue;
      victim.process.kill('SIGKILL');
      kills++;
      o.log?.(`chaos: killed worker ${victim.address} (pid ${victim.pid})`);
      // A supervisor restarts it at the same address after a while; the next kill waits for that (one fault at a
      // time, as a rolling failure would be).
      await new Promise((r) => setTimeout(r, 300 + rand() * 1_500));
      try {
        slots[i] = await startWorkerProcess(o.modelDir, ['--threads', '1', '--listen', victim.address]);
        restarts++;
        o.log?.(`chaos: restarted ${victim.address}`);
      } catch (e) {
        o.log?.(`chaos: restart of ${victim.address} failed: ${(e as Error).message}`);
      }
    }
  })();

  const started = Date.now();
  const latency: number[] = [];
  let lost = 0;
  let wrong = 0;
  let next = 0;
  await Promise.all(
    Array.from({ length: o.concurrency }, async () => {
      while (next < prompts.length) {
        const i = next++;
        const t0 = Date.now();
        try {
          const { outputIds } = await generate(pipeline, prompts[i], { maxNewTokens: o.newTokens, eosTokenId: null });
          if (JSON.stringify(outputIds) !== JSON.stringify(expected[i])) wrong++;
        } catch (e) {
          lost++;
          o.log?.(`chaos: request ${i} failed: ${(e as Error).message} ${(e as Error).stack?.split("\n").slice(1, 6).join(" | ")}`);
        }
        latency.push(Date.now() - t0);
        firstCompleted();
      }
    }),
  );
  done = true;
  await chaos;
  pipeline.close();
  slots.forEach((w) => w.process.kill('SIGKILL'));
  return {
    requests: o.requests, lost, wrong, kills, restarts, recoveries: pipeline.recoveries,
    recoveryMs: { p50: pct(recoveryMs, 0.5), max: Math.max(0, ...recoveryMs) },
    latencyMs: { p50: pct(latency, 0.5), p95: pct(latency, 0.95), max: Math.max(0, ...latency) },
    wallMs: Date.now() - started,
  };
}
