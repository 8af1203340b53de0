import { generate } from '../model/generation.ts';
import type { RemotePipeline } from '../coordinator/remote-pipeline.ts';
import type { LoadCluster } from './load.ts';
import type { Progress } from './progress.ts';

/**
 * `--recover`: a worker of a serving pipeline is killed with SIGKILL mid-generation, as the OOM killer or an operator
 * would. The supervisor restarts it at its address, it loads its stage from the (warm) stage cache, and the pipeline
 * replays the lost KV caches. Every request must still produce the fault-free run's greedy tokens.
 */
export interface RecoveryReport {
  requests: number;
  newTokens: number;
  /** The stage index killed (the last: it holds the head). */
  killed: number;
  killedAfterTokens: number;
  /** SIGKILL → the restarted worker's stage serving again (restart backoff + process start + cache-hit load). */
  toServingMs: number;
  /** How long the coordinator's pipeline was broken (its own recovery timer). */
  pipelineRecoveredMs: number;
  /** Requests whose output equals the fault-free run's. */
  identical: number;
  /** Requests that differ: the first generated index where they do, and both tokens there. */
  diverged: { request: number; at: number; faultFree: number; withFault: number }[];
  /** A second fault-free run: requests equal to the first (batching differs between runs; this is the noise floor). */
  faultFreeRepeatIdentical: number;
  /** Wall time of the fault-free run and of the run with the fault. */
  faultFreeMs: number;
  withFaultMs: number;
}

export async function runRecovery(o: { pipeline: RemotePipeline; cluster: LoadCluster; vocab: number; recoveries: number[]; progress: Progress; newTokens: number; seed: number; requests?: number }): Promise<RecoveryReport> {
  const n = o.requests ?? 3;
  const prompts = Array.from({ length: n }, (_, r) => Array.from({ length: 6 + r }, (_, j) => (o.seed * 31 + r * 7919 + j * 104729) % o.vocab));
  const run = async (onToken?: () => void) => Promise.all(prompts.map((p) => generate(o.pipeline, p, { maxNewTokens: o.newTokens, eosTokenId: null, onToken }).then((g) => g.outputIds)));
  o.progress.phase(`recovery: ${n} requests × ${o.newTokens} tokens, fault-free`);
  let t0 = performance.now();
  const base = await run();
  const faultFreeMs = performance.now() - t0;
  const same = (a: number[][]) => a.map((ids, r) => ids.length === base[r].length && ids.every((x, j) => x === base[r][j]));
  o.progress.phase('recovery: fault-free again (how deterministic is a run at all)');
  const repeat = same(await run()).filter(Boolean).length;

  const victim = o.cluster.addresses.length - 1;
  const afterTokens = Math.max(1, Math.floor((n * o.newTokens) / 3));
  let killedAt = 0;
  let servingAt = 0;
  o.cluster.onLoad((i, p) => {
    if (i === victim && killedAt && p.phase === 'serving' && !servingAt) servingAt = performance.now();
  });
  let produced = 0;
  o.progress.phase(`recovery: the same requests; worker ${victim} (pid ${o.cluster.pid(victim)}) gets SIGKILL after ${afterTokens} tokens`);
  t0 = performance.now();
  const withFault = await run(() => {
    if (++produced === afterTokens) {
      killedAt = performance.now();
      process.kill(o.cluster.pid(victim), 'SIGKILL');
    }
  });
  const withFaultMs = performance.now() - t0;
  const identical = same(withFault).filter(Boolean).length;
  const diverged = withFault.flatMap((ids, r) => {
    const at = ids.findIndex((x, j) => x !== base[r][j]);
    return at < 0 ? [] : [{ request: r, at, faultFree: base[r][at], withFault: ids[at] }];
  });
  const report: RecoveryReport = {
    requests: n, newTokens: o.newTokens, killed: victim, killedAfterTokens: afterTokens,
    toServingMs: servingAt ? servingAt - killedAt : NaN, pipelineRecoveredMs: o.recoveries.at(-1) ?? NaN, identical, diverged, faultFreeRepeatIdentical: repeat, faultFreeMs, withFaultMs,
  };
  o.progress.phase(`recovery: serving again ${(report.toServingMs / 1000).toFixed(1)} s after the kill; ${identical}/${n} outputs identical`);
  return report;
}
