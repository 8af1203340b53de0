import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { normalizeConfig, type ModelSpec } from '../model/config.ts';
import { stageParamCount, stageWeights } from '../model/layout.ts';
import { StrataError } from '../model/errors.ts';
import { formatPlan, planPartition, stageFootprint, DTYPE_BYTES, type StagePlan, type WorkerCapacity } from '../coordinator/planner.ts';
import { parseSize, parseWorkers } from '../bin/plan.ts';
import { createRng } from '../model/sampling.ts';

const CONFIGS = fileURLToPath(new URL('./configs', import.meta.url));
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const load = (file: string): ModelSpec => normalizeConfig(JSON.parse(readFileSync(`${CONFIGS}/${file}`, 'utf8')));
const biomedlm = load('biomedlm.config.json');
const gptj = load('gpt-j-6b.gptneo-rotary.config.json');
const clinicalbert = load('clinicalbert.config.json');
const GB = 1e9;
const ws = (...mem: (number | [number, number])[]): WorkerCapacity[] =>
  mem.map((m, i) => (Array.isArray(m) ? { id: `w${i}`, memoryBytes: m[0], speed: m[1] } : { id: `w${i}`, memoryBytes: m }));
const sizes = (p: StagePlan) => p.stages.map((s) => s.range.last - s.range.first);
const prefix = (spec: ModelSpec) => (spec.family === 'distilbert' ? 'distilbert.' : 'transformer.');

/** Coverage, contiguity, worker order, memory, and exact counts from the layout. */
function checkInvariants(spec: ModelSpec, workers: WorkerCapacity[], plan: StagePlan, reserve = 0) {
  let next = 0, lastWorker = -1;
  for (const s of plan.stages) {
    assert.equal(s.range.first, next, 'contiguous, starts where the previous stage ended');
    assert.ok(s.range.last > s.range.first, 'every used worker gets ≥ 1 block');
    next = s.range.last;
    const wi = workers.findIndex((w) => w.id === s.worker);
    assert.ok(wi > lastWorker, 'stages follow worker (pipeline) order, each worker once');
    lastWorker = wi;
    const params = stageParamCount(stageWeights(spec, s.range, prefix(spec)));
    assert.equal(s.paramBytes, params * DTYPE_BYTES[plan.dtype]);
    assert.equal(s.memoryBytes, s.paramBytes + reserve);
    assert.ok(s.memoryBytes <= workers[wi].memoryBytes, `${s.worker} fits its memory`);
  }
  assert.equal(next, spec.blocks, 'every block assigned');
  assert.equal(plan.bottleneck, Math.max(...plan.stages.map((s) => s.cost)));
}

const uneven: [string, ModelSpec, WorkerCapacity[]][] = [
  ['BioMedLM', biomedlm, ws(3 * GB, [6 * GB, 1.5], 4 * GB, [2 * GB, 0.7])],
  ['GPT-J', gptj, ws(10 * GB, [14 * GB, 2], 8 * GB)],
  ['ClinicalBERT', clinicalbert, ws([0.6 * GB, 1], [0.2 * GB, 3], 1 * GB, [0.5 * GB, 0.5])],
];

for (const [name, spec, workers] of uneven) {
  test(`${name}: invariants on uneven workers, float32 and float16`, () => {
    for (const dtype of ['float32', 'float16'] as const) {
      const plan = planPartition(spec, workers, { dtype });
      checkInvariants(spec, workers, plan);
      assert.equal(plan.stages.length, workers.length, 'uses every worker');
      assert.deepEqual(plan.model, { family: spec.family, blocks: spec.blocks, dModel: spec.dModel, vocab: spec.vocab });
      assert.ok(plan.explanation.some((l) => l.includes('bottleneck')));
    }
  });
  test(`${name}: deterministic`, () => {
    assert.deepEqual(planPartition(spec, workers, { dtype: 'float16' }), planPartition(spec, workers, { dtype: 'float16' }));
  });
}

test('GPT-J: 2 workers 16GB fp16 → [0,15) [15,28): the LM head costs the last stage a block', () => {
  const plan = planPartition(gptj, ws(16 * GB, 16 * GB), { dtype: 'float16' });
  assert.deepEqual(plan.stages.map((s) => s.range), [{ first: 0, last: 15 }, { first: 15, last: 28 }]);
  assert.ok(plan.explanation.some((l) => /LM head.*fewer blocks/.test(l)));
  // 4 equal unlimited workers: the last stage still gets fewer blocks than any other.
  const four = sizes(planPartition(gptj, ws(Infinity, Infinity, Infinity, Infinity)));
  assert.ok(four[3] < Math.min(...four.slice(0, 3)), `last stage fewer blocks: ${four}`);
});

test('ClinicalBERT: the 119547×768 tied MLM head pushes blocks off the last stage', () => {
  const head = 119547 * 768;
  const block = stageFootprint(clinicalbert, { first: 2, last: 3 }).params;
  assert.ok(head > 10 * block, `head ${head} ≫ block ${block}`);
  const plan = planPartition(clinicalbert, ws(Infinity, Infinity));
  assert.deepEqual(sizes(plan), [5, 1]);
  // Split: the last stage holds its own copy of the tied matrix.
  assert.ok(plan.stages[1].paramBytes > head * 4 && plan.stages[0].paramBytes > head * 4);
  // One stage: the tied matrix is counted once.
  const one = planPartition(clinicalbert, ws(Infinity));
  assert.equal(one.stages[0].paramBytes, stageParamCount(stageWeights(clinicalbert, { first: 0, last: 6 }, 'distilbert.')) * 4);
  assert.ok(one.stages[0].paramBytes < plan.stages[0].paramBytes + plan.stages[1].paramBytes - head * 4 + 1);
});

test('a faster worker gets more blocks', () => {
  const equal = sizes(planPartition(biomedlm, ws(Infinity, Infinity, Infinity)));
  const fastMid = sizes(planPartition(biomedlm, ws(Infinity, [Infinity, 2], Infinity)));
  assert.ok(fastMid[1] > equal[1] && fastMid[1] > fastMid[0] && fastMid[1] > fastMid[2], `${equal} vs ${fastMid}`);
  const fastLast = sizes(planPartition(gptj, ws(Infinity, [Infinity, 3])));
  assert.ok(fastLast[1] > fastLast[0], `even with the head, a 3× last worker takes more: ${fastLast}`);
});

test('memory limits are respected and bind: a small first worker gets few blocks', () => {
  const workers = ws(1.5 * GB, 16 * GB, 16 * GB);
  const plan = planPartition(biomedlm, workers);
  checkInvariants(biomedlm, workers, plan);
  assert.ok(sizes(plan)[0] <= 3, `w0 holds embeddings + ≤ 3 blocks in 1.5 GB: ${sizes(plan)}`);
  // The reserve counts against every stage.
  const reserve = 0.5 * GB;
  const withReserve = planPartition(biomedlm, workers, { kvReserveBytes: reserve });
  checkInvariants(biomedlm, workers, withReserve, reserve);
  assert.ok(sizes(withReserve)[0] < sizes(plan)[0]);
});

test('memory bound is exact: a stage fits in exactly its bytes, not one byte less (tied head counted once)', () => {
  for (const spec of [biomedlm, gptj, clinicalbert]) {
    const need = stageParamCount(stageWeights(spec, { first: 0, last: spec.blocks }, prefix(spec))) * 2 + 1000;
    assert.equal(planPartition(spec, ws(need), { dtype: 'float16', kvReserveBytes: 1000 }).stages[0].memoryBytes, need);
    assert.throws(() => planPartition(spec, ws(need - 1), { dtype: 'float16', kvReserveBytes: 1000 }), { code: 'plan_does_not_fit' });
  }
});

test('a worker too small for any stage is left out (prefer all workers otherwise); maxStages caps stages', () => {
  const workers = ws(16 * GB, 0.1 * GB, 16 * GB);
  const plan = planPartition(gptj, workers, { dtype: 'float16' });
  assert.deepEqual(plan.stages.map((s) => s.worker), ['w0', 'w2']);
  assert.ok(plan.explanation.some((l) => l.includes('unused worker(s): w1')));
  const capped = planPartition(biomedlm, ws(Infinity, Infinity, Infinity, Infinity), { maxStages: 2 });
  assert.equal(capped.stages.length, 2);
  assert.equal(planPartition(clinicalbert, ws(...Array(9).fill(Infinity))).stages.length, 6, 'at most one stage per block');
});

test('impossible plan → plan_does_not_fit (failed_precondition), suggesting fp16 and more workers', () => {
  const small = ws(8 * GB, 8 * GB);
  assert.throws(() => planPartition(gptj, small, { dtype: 'float32' }), (e: unknown) => {
    assert.ok(e instanceof StrataError);
    assert.equal(e.code, 'plan_does_not_fit');
    assert.equal(e.kind, 'failed_precondition');
    assert.match(e.message, /24\.2\d GB/); // needed
    assert.match(e.message, /16\.00 GB/); // available
    assert.match(e.message, /float16/);
    assert.match(e.message, /add workers/);
    return true;
  });
  checkInvariants(gptj, small, planPartition(gptj, small, { dtype: 'float16' }));
  // Enough memory in total but no single worker can hold the head: still does not fit.
  assert.throws(() => planPartition(clinicalbert, ws(...Array(6).fill(0.2 * GB))), { code: 'plan_does_not_fit' });
  assert.throws(() => planPartition(gptj, []), { code: 'plan_no_workers' });
  assert.throws(() => planPartition(gptj, ws([GB, 0])), { code: 'plan_bad_worker' });
});

test('float16 halves paramBytes (same ranges)', () => {
  for (const spec of [biomedlm, gptj, clinicalbert]) {
    const workers = ws(Infinity, [Infinity, 1.3], Infinity);
    const f32 = planPartition(spec, workers, { dtype: 'float32' });
    const f16 = planPartition(spec, workers, { dtype: 'float16' });
    assert.deepEqual(f16.stages.map((s) => s.range), f32.stages.map((s) => s.range));
    f16.stages.forEach((s, i) => assert.equal(s.paramBytes * 2, f32.stages[i].paramBytes));
  }
});

// ---- exact optimality against brute force on small random cases ----

/** Every ordered worker subset × every composition of the blocks: most stages first, then least bottleneck. */
function bruteForce(spec: ModelSpec, workers: WorkerCapacity[], bytes: number, maxStages = Infinity): { stages: number; bottleneck: number } | null {
  const B = spec.blocks, W = workers.length;
  const memo = new Map<number, ReturnType<typeof stageFootprint>>();
  const footprint = (first: number, last: number) => {
    const key = first * 1000 + last;
    if (!memo.has(key)) memo.set(key, stageFootprint(spec, { first, last }));
    return memo.get(key)!;
  };
  let best: { stages: number; bottleneck: number } | null = null;
  for (let mask = 1; mask < 1 << W; mask++) {
    const chosen = workers.filter((_, i) => mask & (1 << i));
    const K = chosen.length;
    if (K > B || K > maxStages) continue;
    const rec = (k: number, first: number, worst: number): void => {
      if (k === K) {
        if (first === B && (!best || K > best.stages || (K === best.stages && worst < best.bottleneck))) best = { stages: K, bottleneck: worst };
        return;
      }
      const maxLast = B - (K - k - 1);
      for (let last = first + 1; last <= maxLast; last++) {
        const { params, readParams } = footprint(first, last);
        if (params * bytes > chosen[k].memoryBytes) continue;
        rec(k + 1, last, Math.max(worst, (readParams * bytes) / (chosen[k].speed ?? 1)));
      }
    };
    rec(0, 0, 0);
  }
  return best;
}

test('exact: matches brute force on small random models and worker sets', () => {
  const rand = createRng(42);
  const pick = <T>(xs: T[]): T => xs[Math.floor(rand() * xs.length)];
  let feasible = 0, infeasible = 0;
  for (let trial = 0; trial < 150; trial++) {
    const family = pick(['gpt2', 'gptj', 'distilbert']);
    const L = 1 + Math.floor(rand() * 7), d = pick([8, 16]), vocab = pick([16, 64, 300]);
    const raw =
      family === 'gpt2' ? { model_type: 'gpt2', n_layer: L, n_embd: d, n_head: 2, n_positions: 32, vocab_size: vocab }
      : family === 'gptj' ? { model_type: 'gptj', n_layer: L, n_embd: d, n_head: 2, n_positions: 32, rotary_dim: 4, vocab_size: vocab }
      : { model_type: 'distilbert', n_layers: L, dim: d, n_heads: 2, hidden_dim: 2 * d, max_position_embeddings: 32, vocab_size: vocab };
    const spec = normalizeConfig(raw);
    const W = 1 + Math.floor(rand() * 4);
    const total = stageFootprint(spec, { first: 0, last: L }).params * 4;
    const workers = ws(...Array.from({ length: W }, () => [rand() < 0.2 ? Infinity : Math.round(total * (0.1 + rand() * 0.8)), pick([0.5, 1, 1, 1.5, 2])] as [number, number]));
    const maxStages = rand() < 0.2 ? 1 + Math.floor(rand() * 3) : undefined;
    const expected = bruteForce(spec, workers, 4, maxStages);
    if (!expected) {
      infeasible++;
      assert.throws(() => planPartition(spec, workers, { maxStages }), { code: 'plan_does_not_fit' }, `trial ${trial}`);
      continue;
    }
    feasible++;
    const plan = planPartition(spec, workers, { maxStages });
    checkInvariants(spec, workers, plan);
    assert.equal(plan.stages.length, expected.stages, `trial ${trial}: stage count`);
    assert.equal(plan.bottleneck, expected.bottleneck, `trial ${trial}: bottleneck`);
  }
  assert.ok(feasible > 50 && infeasible > 5, `both outcomes exercised (${feasible} / ${infeasible})`);
});

test('exact on the real models too: brute force over 3 uneven workers (every range counted from the layout)', () => {
  const cases: [ModelSpec, WorkerCapacity[], 'float32' | 'float16'][] = [
    [biomedlm, ws(3 * GB, [6 * GB, 1.5], [4 * GB, 0.8]), 'float32'],
    [gptj, ws([9 * GB, 1.2], 5 * GB, 8 * GB), 'float16'],
    [clinicalbert, ws(0.45 * GB, [0.1 * GB, 2], 0.5 * GB), 'float32'],
  ];
  for (const [spec, workers, dtype] of cases) {
    const expected = bruteForce(spec, workers, DTYPE_BYTES[dtype]);
    const plan = planPartition(spec, workers, { dtype });
    assert.ok(expected);
    assert.equal(plan.stages.length, expected.stages);
    assert.equal(plan.bottleneck, expected.bottleneck);
  }
});

test('scales to 100 blocks × 64 workers', () => {
  const spec = normalizeConfig({ model_type: 'gpt2', n_layer: 100, n_embd: 64, n_head: 4, n_positions: 64, vocab_size: 1000 });
  const rand = createRng(7);
  const workers = ws(...Array.from({ length: 64 }, () => [Infinity, 0.5 + rand() * 2] as [number, number]));
  const t0 = performance.now();
  const plan = planPartition(spec, workers);
  checkInvariants(spec, workers, plan);
  assert.equal(plan.stages.length, 64);
  assert.ok(performance.now() - t0 < 5000, `took ${performance.now() - t0} ms`);
});

test('formatPlan: a row per stage and the explanation', () => {
  const plan = planPartition(gptj, ws(16 * GB, 16 * GB), { dtype: 'float16' });
  const text = formatPlan(plan);
  assert.match(text, /\[0, 15\)/);
  assert.match(text, /\[15, 28\)/);
  assert.match(text, /GB/);
  for (const line of plan.explanation) assert.ok(text.includes(line));
});

test('parseWorkers / parseSize', () => {
  assert.deepEqual(parseWorkers('3').map((w) => w.memoryBytes), [Infinity, Infinity, Infinity]);
  assert.deepEqual(parseWorkers('16GB,16GB,24GB:1.5'), [
    { id: 'w0', memoryBytes: 16e9, speed: 1 }, { id: 'w1', memoryBytes: 16e9, speed: 1 }, { id: 'w2', memoryBytes: 24e9, speed: 1.5 },
  ]);
  assert.deepEqual(parseWorkers('a=1GiB:2,b=512MB'), [{ id: 'a', memoryBytes: 2 ** 30, speed: 2 }, { id: 'b', memoryBytes: 512e6, speed: 1 }]);
  assert.equal(parseSize('0.5 gb'), 5e8);
  assert.throws(() => parseWorkers('16,16'), { code: 'plan_bad_size' });
  assert.throws(() => parseWorkers('16GB:fast'), { code: 'plan_bad_workers' });
});

// ---- CLI ----

const cli = (...args: string[]) => spawnSync(process.execPath, ['bin/strata.js', 'plan', ...args], { cwd: ROOT, encoding: 'utf8' });

test('CLI: --config --workers 16GB,16GB --dtype float16 --json prints the StagePlan', () => {
  const out = execFileSync(process.execPath, ['bin/strata.js', 'plan', '--config', `${CONFIGS}/gpt-j-6b.gptneo-rotary.config.json`, '--workers', '16GB,16GB', '--dtype', 'float16', '--json'], { cwd: ROOT, encoding: 'utf8' });
  const plan = JSON.parse(out) as StagePlan;
  assert.equal(plan.dtype, 'float16');
  assert.deepEqual(plan.model, { family: 'gptj', blocks: 28, dModel: 4096, vocab: 50400 });
  assert.deepEqual(plan.stages.map((s) => [s.worker, s.range.first, s.range.last]), [['w0', 0, 15], ['w1', 15, 28]]);
  assert.deepEqual(plan, planPartition(gptj, ws(16 * GB, 16 * GB), { dtype: 'float16' }));
});

test('CLI: table output, --model DIR, and errors exit 2 with the message on stderr', () => {
  const table = cli('--model', `${ROOT}test/fixtures/gpt2-tiny`, '--workers', '2');
  assert.equal(table.status, 0, table.stderr);
  assert.match(table.stdout, /stage\s+worker\s+blocks/);
  const tooSmall = cli('--config', `${CONFIGS}/gpt-j-6b.gptneo-rotary.config.json`, '--workers', '8GB,8GB');
  assert.equal(tooSmall.status, 2);
  assert.match(tooSmall.stderr, /plan_does_not_fit/);
  assert.match(tooSmall.stderr, /float16/);
  assert.equal(tooSmall.stdout, '');
  const bad = cli('--config', `${CONFIGS}/biomedlm.config.json`, '--workers', '16XB');
  assert.equal(bad.status, 2);
  assert.match(bad.stderr, /not a size/);
  assert.equal(cli('--workers', '2').status, 2, 'neither --model nor --config');
});
