import type { Family, ModelSpec } from '../model/config.ts';
import { StrataError } from '../model/errors.ts';
import { bytesPerWeight, WEIGHT_DTYPES, type StageDType } from '../model/dtype.ts';
import { embedReadParams, keyPrefix, stageParamCount, stageWeights, type StageWeights } from '../model/layout.ts';
import type { BlockRange } from '../model/range.ts';

/**
 * The partition planner: which worker runs which contiguous block range.
 *
 * Cost model: decode is bound by reading weights once per token, so a stage's time per
 * token is (bytes of weights it reads) / (worker speed). The embedding table is a row
 * gather (cheap to run, but it must sit in memory); the LM head is a full matmul over the
 * vocabulary (read in full every step). The plan minimises the bottleneck (slowest stage),
 * which bounds pipeline throughput, subject to every stage fitting its worker's memory.
 */

export type PlanDtype = StageDType;
/**
 * Bytes per weight in each stage dtype. int8/int4 count their codes plus one float32 scale and one zero point per
 * 32-weight block (int8: 1.156 bytes; int4: 0.641); the few tensors that stay float32 there (norms, biases, position tables: under 1 % of a
 * GPT's weights) are counted at the same rate, so quantized footprints read up to ~1 % low.
 */
export const DTYPE_BYTES: Record<PlanDtype, number> = Object.fromEntries(WEIGHT_DTYPES.map((d) => [d, bytesPerWeight(d)])) as Record<PlanDtype, number>;

export interface WorkerCapacity {
  id: string;
  /** Memory the stage may use, in bytes (Infinity = unlimited). */
  memoryBytes: number;
  /** Relative speed (memory bandwidth), default 1. */
  speed?: number;
}

export interface StageAssignment {
  worker: string;
  range: BlockRange;
  paramBytes: number;
  /** params + activation/KV reserve */
  memoryBytes: number;
  /** estimated relative time per token: weight bytes read per token / worker speed */
  cost: number;
}

export interface StagePlan {
  model: { family: Family; blocks: number; dModel: number; vocab: number };
  dtype: PlanDtype;
  stages: StageAssignment[];
  bottleneck: number;
  explanation: string[];
}

export interface PlanOptions {
  dtype?: PlanDtype;
  /** Bytes every stage keeps free beyond its weights (activations, KV cache). Default 0. */
  kvReserveBytes?: number;
  /** At most this many stages (default: one per worker). */
  maxStages?: number;
}

/** The family's key prefix, as if every key were there: only used to build refs, the counts do not depend on it. */
const prefixOf = (spec: ModelSpec): string => keyPrefix(spec, () => true);
const count = (sw: Partial<StageWeights>): number => stageParamCount({ embed: null, blocks: [], head: null, ...sw });

/** Elements read per token for an embedding: one token row, one position row, and the rest (a norm) whole. */
const gatherParams = embedReadParams;

/**
 * Exact footprint of one stage straight from the layout: `params` it holds (tied head counted
 * once when embeddings share the stage, again on a split last stage) and `readParams` it
 * reads per token (all of it except the embedding table, of which it reads only a row).
 */
export function stageFootprint(spec: ModelSpec, range: BlockRange): { params: number; readParams: number } {
  const sw = stageWeights(spec, range, prefixOf(spec));
  const readParams = count({ ...sw, embed: null }) + (sw.embed ? gatherParams(sw.embed) : 0);
  return { params: stageParamCount(sw), readParams };
}

/**
 * The same footprint for every range [k, i), in O(1) per range: per-block counts plus the
 * embedding and head ends (re-counted together to keep the tied-head dedup exact).
 */
function footprintTables(spec: ModelSpec) {
  const B = spec.blocks;
  const prefix = prefixOf(spec);
  const blockSum = [0];
  for (let i = 0; i < B; i++) blockSum.push(blockSum[i] + count({ blocks: stageWeights(spec, { first: i, last: i + 1 }, prefix).blocks }));
  const embed = stageWeights(spec, { first: 0, last: 1 }, prefix).embed!;
  const head = stageWeights(spec, { first: B - 1, last: B }, prefix).head!;
  const embedP = count({ embed }), headP = count({ head }), bothP = count({ embed, head }), gatherP = gatherParams(embed);
  return {
    embedP, headP, tied: embedP + headP > bothP,
    params: (k: number, i: number) =>
      blockSum[i] - blockSum[k] + (k === 0 && i === B ? bothP : (k === 0 ? embedP : 0) + (i === B ? headP : 0)),
    readParams: (k: number, i: number) => blockSum[i] - blockSum[k] + (k === 0 ? gatherP : 0) + (i === B ? headP : 0),
  };
}

/**
 * dp[s][j][i] = best value of covering blocks [0, i) with exactly s stages on a subsequence of
 * workers 0..j-1 (skipping a worker is allowed; stages stay in worker order). `combine` folds a
 * new stage's cost into the prefix value; `allowed` rejects stages (memory, bottleneck cap).
 * O(S·W·B²) — about 2·10⁷ steps at the 100-block / 64-worker limits.
 */
function solve(
  S: number, W: number, B: number,
  cost: (k: number, i: number, w: number) => number | null,
  combine: (prev: number, c: number) => number,
) {
  const at = (s: number, j: number, i: number) => (s * (W + 1) + j) * (B + 1) + i;
  const value = new Float64Array((S + 1) * (W + 1) * (B + 1)).fill(Infinity);
  const choice = new Int16Array(value.length).fill(-2); // -1 = worker skipped, k = stage covers [k, i)
  for (let j = 0; j <= W; j++) value[at(0, j, 0)] = 0;
  for (let s = 1; s <= S; s++) {
    for (let j = s; j <= W; j++) {
      for (let i = s; i <= B; i++) {
        // Worker j-1 takes [k, i). Strict '<' with k ascending: ties go to the longest stage
        // for the later worker, and using a worker beats skipping it — deterministic.
        let best = Infinity, arg = -2;
        for (let k = s - 1; k < i; k++) {
          const prev = value[at(s - 1, j - 1, k)];
          if (prev === Infinity) continue;
          const c = cost(k, i, j - 1);
          if (c === null) continue;
          const v = combine(prev, c);
          if (v < best) { best = v; arg = k; }
        }
        const skip = value[at(s, j - 1, i)];
        if (skip < best) { best = skip; arg = -1; }
        value[at(s, j, i)] = best;
        choice[at(s, j, i)] = arg;
      }
    }
  }
  const backtrack = (s: number): { worker: number; range: BlockRange }[] => {
    const out: { worker: number; range: BlockRange }[] = [];
    for (let j = W, i = B; s > 0; j--) {
      const k = choice[at(s, j, i)];
      if (k === -1) continue;
      out.unshift({ worker: j - 1, range: { first: k, last: i } });
      i = k;
      s--;
    }
    return out;
  };
  return { best: (s: number) => value[at(s, W, B)], backtrack };
}

export function planPartition(spec: ModelSpec, workers: WorkerCapacity[], opts: PlanOptions = {}): StagePlan {
  const dtype = opts.dtype ?? 'float32';
  const bytes = DTYPE_BYTES[dtype];
  if (!bytes) throw new StrataError('plan_bad_dtype', `dtype "${dtype}" is not supported; use ${WEIGHT_DTYPES.join(', ')}`);
  const reserve = opts.kvReserveBytes ?? 0;
  if (!(reserve >= 0) || !Number.isFinite(reserve)) throw new StrataError('plan_bad_reserve', `kvReserveBytes must be a finite number ≥ 0 (got ${reserve})`);
  if (workers.length === 0) throw new StrataError('plan_no_workers', 'no workers given: a plan needs at least one worker');
  const ids = new Set<string>();
  for (const w of workers) {
    if (!(w.memoryBytes > 0)) throw new StrataError('plan_bad_worker', `worker ${w.id}: memory must be > 0 bytes (got ${w.memoryBytes})`);
    const sp = w.speed ?? 1;
    if (!(sp > 0) || !Number.isFinite(sp)) throw new StrataError('plan_bad_worker', `worker ${w.id}: speed must be a finite number > 0 (got ${w.speed})`);
    if (ids.has(w.id)) throw new StrataError('plan_bad_worker', `worker id "${w.id}" appears twice; worker ids must be unique`);
    ids.add(w.id);
  }
  const { maxStages } = opts;
  if (maxStages !== undefined && !(Number.isInteger(maxStages) && maxStages >= 1)) {
    throw new StrataError('plan_bad_max_stages', `maxStages must be an integer ≥ 1 (got ${maxStages})`);
  }

  const B = spec.blocks, W = workers.length;
  const S = Math.min(W, B, maxStages ?? Infinity);
  const fp = footprintTables(spec);
  const speed = workers.map((w) => w.speed ?? 1);
  // Integer element counts × bytes are exact; the one division by speed makes costs bit-identical
  // between the DP and the final assignment, so the bottleneck cap below compares exactly.
  const fits = (k: number, i: number, w: number) => fp.params(k, i) * bytes + reserve <= workers[w].memoryBytes;
  const costOf = (k: number, i: number, w: number) => (fp.readParams(k, i) * bytes) / speed[w];

  // Phase 1: the least bottleneck for each stage count; use the most stages that fit (≤ S).
  const p1 = solve(S, W, B, (k, i, w) => (fits(k, i, w) ? costOf(k, i, w) : null), Math.max);
  let stagesUsed = S;
  while (stagesUsed > 0 && p1.best(stagesUsed) === Infinity) stagesUsed--;
  if (stagesUsed === 0) throw doesNotFit(spec, workers, dtype, reserve, fp, S);
  const bottleneck = p1.best(stagesUsed);

  // Phase 2: many partitions share that bottleneck; among them pick the most even one
  // (least sum of squared stage costs), so non-bottleneck stages are not left lopsided.
  const p2 = solve(stagesUsed, W, B, (k, i, w) => {
    if (!fits(k, i, w)) return null;
    const c = costOf(k, i, w);
    return c <= bottleneck ? c / bottleneck : null;
  }, (prev, c) => prev + c * c);

  const stages: StageAssignment[] = p2.backtrack(stagesUsed).map(({ worker, range }) => {
    const { params, readParams } = stageFootprint(spec, range);
    return { worker: workers[worker].id, range, paramBytes: params * bytes, memoryBytes: params * bytes + reserve, cost: (readParams * bytes) / speed[worker] };
  });
  const plan: StagePlan = {
    model: { family: spec.family, blocks: B, dModel: spec.dModel, vocab: spec.vocab },
    dtype, stages, bottleneck: Math.max(...stages.map((s) => s.cost)), explanation: [],
  };
  plan.explanation = explain(spec, plan, workers, fp, { S, maxStages, reserve });
  return plan;
}

function doesNotFit(spec: ModelSpec, workers: WorkerCapacity[], dtype: PlanDtype, reserve: number, fp: ReturnType<typeof footprintTables>, S: number): StrataError {
  const bytes = DTYPE_BYTES[dtype], B = spec.blocks;
  const need = fp.params(0, B) * bytes + reserve * S;
  const total = workers.reduce((a, w) => a + w.memoryBytes, 0);
  const largest = Math.max(...workers.map((w) => w.memoryBytes));
  const firstMin = fp.params(0, 1) * bytes + reserve, lastMin = fp.params(B - 1, B) * bytes + reserve;
  const hint = [dtype === 'float32' ? 'use --dtype float16 (halves the weights) or int8 (about 29 %)' : dtype === 'float16' ? 'use --dtype int8 or int4 (weight-only quantized)' : null, 'add workers or give them more memory', reserve > 0 ? 'lower the KV reserve' : null].filter(Boolean).join(', or ');
  return new StrataError(
    'plan_does_not_fit',
    `${spec.family} (${B} blocks, ${fmtParams(fp.params(0, B))} params) does not fit ${workers.length} worker(s) in ${dtype}: ` +
      `it needs ${fmtBytes(need)} (weights${reserve > 0 ? ` + ${fmtBytes(reserve)} reserve per stage` : ''}) and the workers offer ${fmtBytes(total)} ` +
      `(largest ${fmtBytes(largest)}); the smallest first stage (embeddings + 1 block) needs ${fmtBytes(firstMin)} and the smallest last stage (1 block + LM head) ${fmtBytes(lastMin)}. ` +
      `To fix: ${hint}.`,
    'failed_precondition',
  );
}

function explain(spec: ModelSpec, plan: StagePlan, workers: WorkerCapacity[], fp: ReturnType<typeof footprintTables>, o: { S: number; maxStages?: number; reserve: number }): string[] {
  const bytes = DTYPE_BYTES[plan.dtype];
  const { stages } = plan;
  const K = stages.length, B = spec.blocks;
  const n = (s: StageAssignment) => s.range.last - s.range.first;
  const lines = [
    `${spec.family}: ${B} blocks, ${fmtParams(fp.params(0, B))} params, ${fmtBytes(fp.params(0, B) * bytes)} of ${plan.dtype} weights over ${K} stage(s)`,
    'stage cost = weight bytes read per token ÷ worker speed (decode reads every weight once per token); the plan minimises the slowest stage',
  ];
  if (K > 1) {
    lines.push(`stage 0 carries the embeddings (${fmtBytes(fp.embedP * bytes)} of memory, but only a row gather per token)`);
    const others = stages.slice(0, -1).map(n);
    const fewer = n(stages[K - 1]) < Math.min(...others) ? ' so it gets fewer blocks' : '';
    const copy = fp.tied ? ', its own copy of the tied embedding matrix' : '';
    lines.push(`last stage carries the LM head (${fmtBytes(fp.headP * bytes)}${copy}, read in full every token)${fewer}`);
  }
  const speeds = new Set(workers.map((w) => w.speed ?? 1));
  if (speeds.size > 1) lines.push('faster workers get more blocks: their cost per block is lower');
  const used = new Set(stages.map((s) => s.worker));
  const unused = workers.filter((w) => !used.has(w.id)).map((w) => w.id);
  if (unused.length) {
    const why = K < o.S ? 'no plan using them fits in memory' : o.maxStages !== undefined && o.maxStages < Math.min(workers.length, B) ? `maxStages is ${o.maxStages}` : `the model has only ${B} blocks`;
    lines.push(`unused worker(s): ${unused.join(', ')} (${why})`);
  }
  const bi = stages.findIndex((s) => s.cost === plan.bottleneck);
  const total = stages.reduce((a, s) => a + s.cost, 0);
  lines.push(`bottleneck: stage ${bi} (${stages[bi].worker}) reads ${fmtBytes(plan.bottleneck * (workers.find((w) => w.id === stages[bi].worker)!.speed ?? 1))} per token, ${pct(plan.bottleneck / total)} of the pipeline's per-token time`);
  const tight = stages.map((s) => ({ s, w: workers.find((w) => w.id === s.worker)! })).filter(({ w }) => Number.isFinite(w.memoryBytes));
  if (tight.length) {
    const t = tight.reduce((a, b) => (b.s.memoryBytes / b.w.memoryBytes > a.s.memoryBytes / a.w.memoryBytes ? b : a));
    lines.push(`tightest memory: ${t.s.worker} uses ${fmtBytes(t.s.memoryBytes)} of ${fmtBytes(t.w.memoryBytes)} (${pct(t.s.memoryBytes / t.w.memoryBytes)})`);
  }
  lines.push(o.reserve > 0 ? `each stage reserves ${fmtBytes(o.reserve)} for activations / KV cache` : 'no activation / KV-cache reserve (set kvReserveBytes / --kv-reserve to keep room for it)');
  return lines;
}

export const fmtBytes = (b: number): string =>
  !Number.isFinite(b) ? 'unlimited' : b >= 1e9 ? `${(b / 1e9).toFixed(2)} GB` : b >= 1e6 ? `${(b / 1e6).toFixed(1)} MB` : b >= 1e3 ? `${(b / 1e3).toFixed(1)} kB` : `${b} B`;
const fmtParams = (p: number): string => (p >= 1e9 ? `${(p / 1e9).toFixed(2)}B` : p >= 1e6 ? `${(p / 1e6).toFixed(1)}M` : `${p}`);
const pct = (x: number): string => `${(100 * x).toFixed(1)}%`;

/** Human table: one row per stage, then the explanation. */
export function formatPlan(plan: StagePlan): string {
  const total = plan.stages.reduce((a, s) => a + s.cost, 0);
  const rows = [
    ['stage', 'worker', 'blocks', 'n', 'params', 'memory', 'time share  '],
    ...plan.stages.map((s, i) => [
      String(i), s.worker, `[${s.range.first}, ${s.range.last})`, String(s.range.last - s.range.first),
      fmtBytes(s.paramBytes), fmtBytes(s.memoryBytes), pct(s.cost / total) + (s.cost === plan.bottleneck ? ' *' : '  '),
    ]),
  ];
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  const right = new Set([3, 4, 5, 6]);
  const table = rows.map((r) => r.map((cell, c) => (right.has(c) ? cell.padStart(widths[c]) : cell.padEnd(widths[c]))).join('  ').trimEnd());
  const { family, blocks, dModel, vocab } = plan.model;
  return [
    `plan: ${family}, ${blocks} blocks, d_model ${dModel}, vocab ${vocab}, ${plan.dtype}  (* = bottleneck)`,
    ...table,
    '',
    ...plan.explanation.map((l) => `- ${l}`),
  ].join('\n');
}
