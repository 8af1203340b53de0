import { spawn, type ChildProcess } from 'node:child_process';
import { availableParallelism } from 'node:os';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { StrataError } from '../model/errors.ts';

export interface LocalWorker {
  address: string;
  pid: number;
  process: ChildProcess;
}

export interface LocalCluster {
  workers: LocalWorker[];
  stop(): Promise<void>;
}

const STRATA = fileURLToPath(new URL('./strata.js', import.meta.url));

/** Starts one `strata worker` process on loopback and resolves once it prints its listening line. */
export function startWorkerProcess(modelDir: string, args: string[] = [], timeoutMs = 120_000): Promise<LocalWorker> {
  const child = spawn(process.execPath, [STRATA, 'worker', '--listen', '127.0.0.1:0', '--model', modelDir, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr = (stderr + d).slice(-4000)));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new StrataError('worker_start_timeout', `worker did not start within ${timeoutMs} ms: ${stderr.trim()}`, 'unavailable'));
    }, timeoutMs);
    createInterface({ input: child.stdout! }).on('line', (line) => {
      try {
        const msg = JSON.parse(line);
        if (msg.event === 'listening') {
          clearTimeout(timer);
          resolve({ address: msg.address, pid: msg.pid, process: child });
        }
      } catch {
        /* not our line */
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new StrataError('worker_exited', `worker exited with code ${code} before listening: ${stderr.trim()}`, 'unavailable'));
    });
  });
}

/** K workers on loopback, each given an equal share of the cores so they do not oversubscribe them. */
export async function startLocalCluster(modelDir: string, k: number, extraArgs: string[] = []): Promise<LocalCluster> {
  const threads = Math.max(1, Math.floor(availableParallelism() / k));
  const started = await Promise.allSettled(Array.from({ length: k }, () => startWorkerProcess(modelDir, ['--threads', String(threads), ...extraArgs])));
  const workers = started.filter((s): s is PromiseFulfilledResult<LocalWorker> => s.status === 'fulfilled').map((s) => s.value);
  const stop = async () => {
    await Promise.all(
      workers.map(
        (w) =>
          new Promise<void>((resolve) => {
            if (w.process.exitCode !== null || w.process.signalCode !== null) return resolve();
            w.process.once('exit', () => resolve());
            w.process.kill('SIGTERM');
            setTimeout(() => w.process.kill('SIGKILL'), 5_000).unref();
          }),
      ),
    );
  };
  const failed = started.find((s) => s.status === 'rejected') as PromiseRejectedResult | undefined;
  if (failed) {
    await stop();
    throw failed.reason;
  }
  return { workers, stop };
}
