// One process of bench/linear-share.ts: batch-1 greedy decode steps of a model's one-row stage graph (every block,
// built or taken from the cache) and of its copy without linear layers, interleaved round by round on the same
// options a worker uses; given `altBlock`, the same stage quantized in blocks of that size too (int8's
// STRATA_INT8_BLOCK=64), in the same rounds. Prints one JSON line: { stepMs, withoutLinearsMs, altStepMs? } (number[]).
import { rmSync } from 'node:fs';
import { dirname } from 'node:path';
import { performance } from 'node:perf_hooks';
import { loadModelSpec } from '../model/config.ts';
import { activationDType, type StageDType } from '../model/dtype.ts';
import { prepareStage } from '../model/stage-cache.ts';
import { Stage } from '../model/stage.ts';
import { StageSession } from '../model/executor.ts';
import { writeWithoutLinears } from './linear-share.ts';

const args: { model: string; dtype: StageDType; threads: number; rounds: number; steps: number; cacheDir?: string; altBlock?: number } = JSON.parse(process.argv[2]);
const spec = loadModelSpec(args.model);
const range = { first: 0, last: spec.blocks };
const prepared = prepareStage(args.model, range, { dtype: args.dtype, rows: 1, cacheDir: args.cacheDir });
const copy = writeWithoutLinears(prepared.path);
const open = async (path: string) => new Stage(spec, range, await StageSession.create(path, { threads: args.threads }), activationDType(args.dtype), { rows: 1 });
const full = await open(prepared.path);
const bare = await open(copy.graph);
rmSync(dirname(copy.graph), { recursive: true, force: true }); // ORT has read the graph; the weights stay mapped
const alt = args.altBlock ? await open(prepareStage(args.model, range, { dtype: args.dtype, rows: 1, cacheDir: args.cacheDir, quantBlockSize: args.altBlock }).path) : null;

const i64 = (rows: number[][]) => ({ dtype: 'int64' as const, dims: [rows.length, rows[0].length], data: BigInt64Array.from(rows.flat(), BigInt) });
/** A 16-token prompt, then `steps` greedy steps fed fixed ids (the copy's argmax means nothing); ms of all but the first two. */
async function decode(stage: Stage, out: number[]): Promise<void> {
  const cache = stage.emptyCache(1);
  const seq = Array.from({ length: 16 }, (_, i) => 1 + ((i * 7919) % (spec.vocab - 1)));
  await stage.step({ inputIds: i64([seq]), positionIds: i64([seq.map((_, i) => i)]), attentionMask: i64([seq.map(() => 1)]), logitPositions: { dtype: 'int64', dims: [1], data: BigInt64Array.of(BigInt(seq.length - 1)) } }, cache, 'greedy');
  for (let s = 0; s < args.steps + 2; s++) {
    const t0 = performance.now();
    await stage.step({ inputIds: i64([[seq[(s * 31) % seq.length]]]), positionIds: i64([[seq.length + s]]), attentionMask: i64([Array(seq.length + s + 1).fill(1)]) }, cache, 'greedy');
    if (s >= 2) out.push(performance.now() - t0);
  }
  stage.closeCache(cache);
}

const stepMs: number[] = [];
const withoutLinearsMs: number[] = [];
const altStepMs: number[] = [];
for (let r = 0; r < args.rounds; r++) {
  // Odd rounds run the copy first, so neither always follows the other.
  if (r % 2) await decode(bare, withoutLinearsMs);
  if (alt && r % 2) await decode(alt, altStepMs);
  await decode(full, stepMs);
  if (alt && !(r % 2)) await decode(alt, altStepMs);
  if (!(r % 2)) await decode(bare, withoutLinearsMs);
}
await full.close();
await bare.close();
await alt?.close();
process.stdout.write(JSON.stringify({ stepMs, withoutLinearsMs, ...(alt ? { altStepMs } : {}) }) + '\n');
