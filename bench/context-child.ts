// One process of `strata bench --suite context`: decode steps of one stage holding the whole model, at several
// context lengths and batch sizes. It uses only the Stage API both stage runtimes share (LocalPipeline.load,
// emptyCache, step, stepBatch), so the same file also runs inside a git worktree of the previous runtime.
// Prints one JSON line: { rows: [{ prompt, batch, stepMs[], hostDeviceBytes, kvBytes }], weightBytes }.
import { performance } from 'node:perf_hooks';
import { LocalPipeline } from '../model/local-pipeline.ts';

interface Args {
  model: string;
  threads: number;
  prompts: number[];
  batches: number[];
  steps: number;
  device?: string;
  dtype?: string;
  /** Graph rows (--max-batch); the runtime's default when absent. */
  maxBatch?: number;
}

const args: Args = JSON.parse(process.argv[2]);
const i64 = (rows: number[][]) => ({ dtype: 'int64' as const, dims: [rows.length, rows[0].length], data: BigInt64Array.from(rows.flat(), BigInt) });
const p = await LocalPipeline.load(args.model, 1, { threads: args.threads, ...(args.dtype && args.dtype !== 'float32' ? { dtype: args.dtype } : {}), ...(args.device && args.device !== 'cpu' ? { device: args.device } : {}), ...(args.maxBatch ? { maxBatch: args.maxBatch } : {}) } as never);
const stage = p.stages[0] as any;
const spec = p.spec;
let seed = 12345;
const rnd = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) % (spec.vocab - 1)) + 1;
const rows: unknown[] = [];
for (const P of args.prompts) {
  for (const B of args.batches) {
    const prompt = Math.min(P, spec.maxPositions - args.steps - 3); // room for the decode steps
    const caches = Array.from({ length: B }, () => stage.emptyCache(1));
    const seqs = caches.map(() => Array.from({ length: prompt }, rnd));
    for (const [b, c] of caches.entries()) {
      await stage.step({ inputIds: i64([seqs[b]]), positionIds: i64([seqs[b].map((_, i) => i)]), attentionMask: i64([seqs[b].map(() => 1)]), logitPositions: { dtype: 'int64', dims: [1], data: BigInt64Array.of(BigInt(prompt - 1)) } }, c);
    }
    const stepMs: number[] = [];
    let hostDeviceBytes = 0;
    let kvBytes = 0;
    for (let s = 0; s < args.steps + 2; s++) {
      const inputs = seqs.map((seq) => ({ inputIds: i64([[rnd()]]), positionIds: i64([[seq.length]]), attentionMask: i64([[...seq, 0].map(() => 1)]) }));
      const t0 = performance.now();
      if (B === 1) await stage.step(inputs[0], caches[0]);
      else await stage.stepBatch(inputs, caches);
      const ms = performance.now() - t0;
      seqs.forEach((seq, b) => seq.push(Number((inputs[b].inputIds.data as BigInt64Array)[0])));
      if (s < 2) continue; // warm-up
      stepMs.push(ms);
      const t = stage.session.lastTransfer; // absent from the previous runtime (CPU only: nothing crosses)
      hostDeviceBytes += t ? t.hostToDevice + t.deviceToHost : 0;
      kvBytes += t ? t.kvBytes : 0;
    }
    for (const c of caches) stage.closeCache?.(c);
    rows.push({ prompt, batch: B, stepMs, hostDeviceBytes: hostDeviceBytes / args.steps, kvBytes: kvBytes / args.steps });
  }
}
await p.close();
// The stage's weight bytes as built (absent from the previous runtime): what dtype actually ran.
const weightBytes = (p as unknown as { prepared?: { paramBytes: number }[] }).prepared?.[0]?.paramBytes ?? null;
process.stdout.write(JSON.stringify({ rows, weightBytes }) + '\n');
