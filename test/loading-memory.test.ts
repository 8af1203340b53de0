import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { writeSyntheticModel } from '../model/synthetic.ts';
import { loadModelSpec } from '../model/config.ts';
import { checkStageFits, stageMemory, RUNTIME_BASE_BYTES } from '../model/memory.ts';
import { stageFootprint } from '../coordinator/planner.ts';
import { slotBytes } from '../model/kv-slots.ts';
import { startWorkerProcess } from '../bin/local-cluster.ts';
import { connectStage } from '../transport/registry.ts';
import { loadFromWire } from '../proto/load-codec.ts';

// Memory: the stage memory model, and refusing what does not fit (or float16 on a CPU) before anything loads.

const STRATA = fileURLToPath(new URL('../bin/strata.js', import.meta.url));
const MB = 2 ** 20;
let root: string;
let model: string;

before(() => {
  root = mkdtempSync(join(tmpdir(), 'strata-memory-'));
  model = join(root, 'model');
  writeSyntheticModel(model, { family: 'gpt2', blocks: 4, dModel: 128, heads: 4, vocab: 1000, maxPositions: 64 });
});

after(() => rmSync(root, { recursive: true, force: true }));

test('stage memory = weights in the stage dtype + KV slots within the budget + prefill activations + runtime', () => {
  const spec = loadModelSpec(model);
  const range = { first: 0, last: 2 };
  const m = stageMemory(spec, range, 'float32', { kvBudgetBytes: 1 * MB });
  assert.equal(m.weights, stageFootprint(spec, range).params * 4);
  const slot = slotBytes({ layers: [0, 1], heads: 4, headDim: 32, maxLen: 64, dtype: 'float32' });
  assert.equal(m.kv, Math.floor(MB / slot) * slot, 'whole KV slots, as the stage allocates them');
  assert.ok(m.kv <= MB);
  assert.ok(m.activations > 0);
  assert.ok(m.runtime >= RUNTIME_BASE_BYTES);
  assert.equal(m.batch1Graph, m.weights * 1.1, 'a small decoder stage holds a one-row graph too: its weights again, with the extra');
  assert.equal(m.total, m.weights + m.kv + m.activations + m.runtime + m.batch1Graph);
  assert.equal(stageMemory(spec, range, 'float32', { kvBudgetBytes: MB, rows: 1 }).batch1Graph, 0, 'a one-row graph is the stage graph itself');
  assert.equal(stageMemory(spec, range, 'float32', { kvBudgetBytes: MB, deviceKind: 'webgpu' }).batch1Graph, 0, 'WebGPU stages hold one graph');
  assert.equal(stageMemory(spec, range, 'int8', { kvBudgetBytes: MB }).weights, stageFootprint(spec, range).params * 1.15625);
  // ORT's extra over the weights, as measured per dtype: quantized stages keep a packed copy and the scales too.
  const extra = (d: 'float32' | 'int8' | 'int4') => (({ runtime, weights }) => (runtime - RUNTIME_BASE_BYTES) / weights)(stageMemory(spec, range, d, { kvBudgetBytes: MB }));
  assert.deepEqual([extra('float32'), extra('int8'), extra('int4')].map((x) => +x.toFixed(2)), [0.1, 0.25, 0.45]);
});

test('a stage over the limit is refused with the typed error, its numbers and the ways out', () => {
  const spec = loadModelSpec(model);
  const limit = 150 * MB;
  assert.throws(
    () => checkStageFits(spec, { first: 0, last: 4 }, 'float32', { kvBudgetBytes: 64 * MB, limitBytes: limit, where: 'worker 0', stages: 1 }),
    (e: Error & { code?: string }) => {
      assert.equal(e.code, 'memory_limit_exceeded');
      assert.match(e.message, /needs about \d+ MiB — weights \d+ MiB \(float32\) \+ KV cache 64 MiB \+ activations \d+ MiB \+ runtime \d+ MiB \+ one-row graph \d+ MiB — but worker 0 has 150 MiB/);
      assert.match(e.message, /STRATA_BATCH1_GRAPH=off/);
      assert.match(e.message, /--workers 2 or more/);
      assert.match(e.message, /--dtype int8/);
      assert.match(e.message, /--kv-budget-mb/);
      return true;
    },
  );
  const fits = checkStageFits(spec, { first: 0, last: 4 }, 'float32', { kvBudgetBytes: 64 * MB, limitBytes: 1024 * MB, where: 'worker 0' });
  assert.ok(fits.total <= 1024 * MB);
});

const up = (args: string[], env: Record<string, string> = {}) =>
  spawnSync(process.execPath, [STRATA, 'up', '--model', model, '--workers', '2', '--port', '0', ...args], { encoding: 'utf8', timeout: 60_000, env: { ...process.env, ...env } });

test('strata up refuses a plan over --memory-limit-mb (or STRATA_MEMORY_LIMIT_MB) before starting any worker', () => {
  for (const r of [up(['--memory-limit-mb', '100']), up([], { STRATA_MEMORY_LIMIT_MB: '100' })]) {
    assert.equal(r.status, 2, r.stderr);
    assert.match(r.stderr, /stage \[0, \d\) of gpt2 needs about \d+ MiB .* but each worker \(--memory-limit-mb\) has 100 MiB.*\[memory_limit_exceeded\]/);
    assert.doesNotMatch(r.stderr, /starting 2 workers/);
  }
});

test('strata up refuses --dtype float16 on a CPU, pointing to float32 and int8/int4', () => {
  const r = up(['--dtype', 'float16']);
  assert.equal(r.status, 2, r.stderr);
  assert.match(r.stderr, /float16 on a CPU device.*--dtype float32.*--dtype int8 or int4.*\[float16_on_cpu\]/);
});

test('strata worker refuses a configure over its --memory-limit-mb with the typed error and reports the stage failed', { timeout: 60_000 }, async () => {
  const w = await startWorkerProcess(model, ['--threads', '1', '--memory-limit-mb', '120', '--kv-budget-mb', '64']);
  const link = connectStage(w.address);
  try {
    await assert.rejects(link.configure({ first: 0, last: 4, dtype: 'float32', next_address: '', fingerprint: '' }), (e: Error & { code?: string }) => {
      assert.equal(e.code, 'memory_limit_exceeded');
      assert.match(e.message, /has 120 MiB/);
      return true;
    });
    const load = loadFromWire((await link.info(5_000)).load);
    assert.equal(load?.phase, 'failed');
    assert.match(load?.error ?? '', /needs about/);
    await assert.rejects(link.configure({ first: 0, last: 4, dtype: 'float16', next_address: '', fingerprint: '' }), { code: 'float16_on_cpu' });
  } finally {
    link.close();
    w.process.kill('SIGTERM');
  }
});

test('a worker whose stage fits loads it (the check does not refuse what fits)', { timeout: 60_000 }, async () => {
  const w = await startWorkerProcess(model, ['--threads', '1', '--memory-limit-mb', '2048', '--kv-budget-mb', '16', '--cache-dir', join(root, 'cache')]);
  const link = connectStage(w.address);
  try {
    await link.configure({ first: 0, last: 4, dtype: 'float32', next_address: '', fingerprint: '' });
    assert.equal(loadFromWire((await link.info(5_000)).load)?.phase, 'serving');
  } finally {
    link.close();
    w.process.kill('SIGTERM');
  }
});

