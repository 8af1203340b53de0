import type { LoadProgress } from '../model/progress.ts';
import type { LoadCluster, LoadLauncher } from '../bench/load.ts';
import type { Progress } from '../bench/progress.ts';
import { WorkerSupervisor } from './supervisor.ts';

/**
 * The load suite's workers: `strata worker` processes under the same supervisor as `strata up` (a worker that dies is
 * restarted at its address, with its exit reported), their load events forwarded to the bench.
 */
export function supervisedLauncher(progress: Progress): LoadLauncher {
  return async (modelDir, k, args): Promise<LoadCluster> => {
    const listeners: ((i: number, p: LoadProgress) => void)[] = [];
    let fatal: Error | null = null;
    const sup = new WorkerSupervisor({
      modelDir, count: k, args, startTimeoutMs: 300_000,
      log: (level, _obj, msg) => level !== 'info' && progress.phase(`  supervisor: ${msg}`),
      onLoad: (i, p) => listeners.forEach((l) => l(i, p)),
      onFatal: (e) => {
        fatal = e;
        progress.phase(`  supervisor gave up: ${e.message}`);
      },
    });
    await sup.start();
    return {
      addresses: sup.workers.map((w) => w.address),
      pid: (i) => {
        if (fatal) throw fatal;
        return sup.workers[i].pid;
      },
      onLoad: (l) => void listeners.push(l),
      stop: () => sup.stop(),
    };
  };
}
