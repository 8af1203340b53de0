import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { writeSyntheticModel } from '../model/synthetic.ts';
import { prepareAndOpen, prepareStage } from '../model/stage-cache.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { forwardLogits } from '../model/generation.ts';
import { StrataError } from '../model/errors.ts';
import { readSpans, readSpansInBackground, stageWeightSpans } from '../model/stage-prefetch.ts';
import { StageSession } from '../model/executor.ts';
import type { LoadProgress } from '../model/progress.ts';
import { StageLoadState } from '../worker/load-state.ts';
import { freePort, startPrivateRedis, type PrivateRedis } from './helpers/redis.ts';

// Loading a stage: progress events, the disk cache (hits, corrupt entries), and the loading states the API shows.
// A synthetic GPT-2 (4 blocks, d 384, ≈42 MB) so a build takes long enough to watch.

const STRATA = fileURLToPath(new URL('../bin/strata.js', import.meta.url));
let root: string;
let model: string;

before(() => {
  root = mkdtempSync(join(tmpdir(), 'strata-loading-'));
  model = join(root, 'model');
  writeSyntheticModel(model, { family: 'gpt2', blocks: 4, dModel: 384, heads: 6, vocab: 8000, maxPositions: 128 });
});

after(() => rmSync(root, { recursive: true, force: true }));

const build = (cacheDir: string, events: LoadProgress[] = []) =>
  prepareStage(model, { first: 0, last: 4 }, { cacheDir, rows: 1, onProgress: (_m, p) => p && events.push(p) });

test('build progress events arrive in order, bytes never go back, and the last is 100 % with the weight bytes', () => {
  const events: LoadProgress[] = [];
  const stage = build(mkdtempSync(join(root, 'cache-')), events);
  assert.equal(stage.built, true);
  assert.ok(events.length >= 2, `${events.length} events`);
  assert.ok(events.every((e) => e.phase === 'building' && e.range === '[0, 4)'));
  assert.equal(events[0].doneBytes, 0);
  const total = events[0].totalBytes;
  const file = join(model, 'model.safetensors');
  const headerLen = Number(readFileSync(file).readBigUInt64LE(0));
  assert.equal(total, statSync(file).size - 8 - headerLen, 'total = the checkpoint bytes of every tensor (this stage is the whole model)');
  for (let i = 1; i < events.length; i++) {
    assert.ok(events[i].doneBytes >= events[i - 1].doneBytes, 'bytes done never decrease');
    assert.ok(events[i].tensors >= events[i - 1].tensors, 'tensors done never decrease');
  }
  const last = events.at(-1)!;
  assert.equal(last.doneBytes, total);
  assert.equal(last.tensors, last.tensorsTotal);
  assert.equal(last.etaMs, 0);
  assert.equal(last.weightBytes, stage.paramBytes);
  assert.equal(events.filter((e) => e.weightBytes !== undefined).length, 1, 'only the last event marks the build done');
});

test("the ORT load's estimate never goes back when the process's memory falls, and only serving says 100 %", async () => {
  // Resident memory as a load sees it: rising while ORT reads the weights, falling when it frees what it packed from.
  const rss = [1000, 1400, 1800, 1500, 1300, 1900, 2600];
  let i = 0;
  const events: LoadProgress[] = [];
  const state = new StageLoadState((p) => events.push(p), 5, () => rss[Math.min(i++, rss.length - 1)]);
  state.building({ phase: 'building', range: '[0, 2)', doneBytes: 10, totalBytes: 10, tensors: 1, tensorsTotal: 1, elapsedMs: 1, bytesPerSec: 1, etaMs: 0, weightBytes: 1000 });
  await new Promise((r) => setTimeout(r, 80));
  state.serving('[0, 2)');
  const loading = events.filter((e) => e.phase === 'loading').map((e) => e.doneBytes);
  assert.ok(loading.length >= 4, `loading events: ${loading}`);
  assert.deepEqual(loading, [...loading].sort((a, b) => a - b), `loading went back: ${loading}`);
  assert.ok(Math.max(...loading) < 1000, 'an estimate never claims 100 %');
  assert.deepEqual(events.at(-1), { ...events.at(-1), phase: 'serving', doneBytes: 1000, totalBytes: 1000 });
});

test('a cache hit does not rebuild: no build, the files untouched, one cached event at 100 %', () => {
  const cacheDir = mkdtempSync(join(root, 'cache-'));
  const first = build(cacheDir);
  const weights = join(first.path, '..', 'weights.bin');
  const before = statSync(weights).mtimeMs;
  const events: LoadProgress[] = [];
  const again = build(cacheDir, events);
  assert.equal(again.built, false);
  assert.equal(again.path, first.path);
  assert.equal(statSync(weights).mtimeMs, before);
  assert.deepEqual(events.map((e) => [e.phase, e.cached, e.doneBytes === e.totalBytes]), [['building', true, true]]);
});

test("the worker's background read covers every byte the stage reads, and a missing file costs only the overlap", async () => {
  const spans = stageWeightSpans(build(mkdtempSync(join(root, 'cache-'))).path);
  const total = spans.reduce((n, [, , length]) => n + length, 0);
  assert.ok(total > 10e6, 'the stage graph and its weights');
  assert.equal(readSpans(spans), total);
  assert.equal(await readSpansInBackground(spans), total, 'the same bytes on a thread of its own');
  assert.equal(await readSpansInBackground([...spans, [join(root, 'gone.bin'), 0, 4096]]), 0, 'resolves, not rejects');
});

test('a half-written or corrupt cache entry is rebuilt, not loaded', () => {
  const cacheDir = mkdtempSync(join(root, 'cache-'));
  const first = build(cacheDir);
  const dir = join(first.path, '..');
  const weights = join(dir, 'weights.bin');
  const size = statSync(weights).size;
  const corruptions: [string, () => void][] = [
    ['weights.bin cut short (a killed copy)', () => truncateSync(weights, Math.floor(size / 2))],
    ['no meta.json (a build killed before its marker)', () => rmSync(join(dir, 'meta.json'))],
    ['meta.json not marked complete', () => writeFileSync(join(dir, 'meta.json'), JSON.stringify({ ...JSON.parse(readFileSync(join(dir, 'meta.json'), 'utf8')), complete: false }))],
    ['meta.json not JSON', () => writeFileSync(join(dir, 'meta.json'), '{"paramBytes": 12')],
    ['stage.onnx missing', () => rmSync(first.path)],
  ];
  for (const [what, corrupt] of corruptions) {
    corrupt();
    const again = build(cacheDir);
    assert.equal(again.built, true, `${what}: rebuilt`);
    assert.equal(statSync(weights).size, size, `${what}: whole again`);
    assert.equal(build(cacheDir).built, false, `${what}: and then a hit`);
  }
});

test('a complete cache entry ONNX Runtime refuses (its bytes changed at the same size) is rebuilt once, then serves', async () => {
  const cacheDir = mkdtempSync(join(root, 'cache-'));
  const ids = [5, 17, 33];
  const load = async (messages: string[] = []) => {
    const p = await LocalPipeline.load(model, 1, { cacheDir, maxBatch: 1, onProgress: (m) => messages.push(m) });
    try {
      return { logits: await forwardLogits(p, ids), built: p.prepared[0].built };
    } finally {
      await p.close();
    }
  };
  const first = await load();
  const graph = prepareStage(model, { first: 0, last: 4 }, { cacheDir, rows: 1 }).path;
  const bytes = readFileSync(graph);
  bytes.fill(0xff, 0, 64); // no longer an ONNX model, and meta.json's sizes still match
  writeFileSync(graph, bytes);
  const messages: string[] = [];
  const again = await load(messages);
  assert.equal(again.built, true, 'rebuilt');
  assert.ok(messages.some((m) => /did not load .*rebuilding it/.test(m)), messages.join('\n'));
  assert.deepEqual(again.logits, first.logits);
  assert.equal((await load()).built, false, 'then a cache hit');
  // The worker reads the graph's weight spans before ORT opens it: a graph that fails there is rebuilt the same way.
  writeFileSync(graph, bytes);
  const worker = await prepareAndOpen(model, { first: 0, last: 4 }, { cacheDir, rows: 1 }, async (p) => (readSpans(stageWeightSpans(p.path)), StageSession.create(p.path)));
  assert.equal(worker.prepared.built, true, 'rebuilt after a corrupt graph met the worker\'s pre-read');
  await worker.opened.release();
  // A fresh build that ORT refuses is not retried: that is a bug to report, not a cache to clear.
  await assert.rejects(() => prepareAndOpen(model, { first: 0, last: 4 }, { cacheDir: mkdtempSync(join(root, 'cache-')), rows: 1 }, async () => {
    throw new StrataError('stage_graph_invalid', 'refused');
  }), /refused/);
});

test('/v1/pipeline shows each stage building or loading while the workers load, /health says why it is 503, then both serve', { timeout: 180_000 }, async () => {
  const redis: PrivateRedis = await startPrivateRedis();
  const port = await freePort();
  // A model big enough (≈140 MB) that building and loading its stages outlast a few 50 ms polls on any machine.
  const big = join(root, 'big-model');
  writeSyntheticModel(big, { family: 'gpt2', blocks: 4, dModel: 768, heads: 12, vocab: 8000, maxPositions: 128 });
  const up = spawn(process.execPath, [STRATA, 'up', '--model', big, '--workers', '2', '--port', String(port), '--redis', redis.url, '--threads', '1'], {
    stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, STRATA_CACHE_DIR: mkdtempSync(join(root, 'cache-')) },
  });
  let err = '';
  up.stderr!.on('data', (d) => (err = (err + d).slice(-6000)));
  const base = `http://127.0.0.1:${port}`;
  const states = new Set<string>();
  let loadingHealth: { status: number; body: { reason?: string } } | null = null;
  try {
    const deadline = Date.now() + 150_000;
    for (;;) {
      assert.ok(Date.now() < deadline, `never served; stderr:\n${err}`);
      assert.equal(up.exitCode, null, `strata up exited: ${err}`);
      const view = await fetch(`${base}/v1/pipeline`).then((r) => r.json() as Promise<{ ready: boolean; stages: { state: string; load: LoadProgress | null }[] }>, () => null);
      if (view) {
        view.stages.forEach((s) => states.add(s.state.replace(/\d+ %/, 'N %')));
        const loading = view.stages.some((s) => /^(building|loading) \d+ %$/.test(s.state));
        const health = await fetch(`${base}/health`);
        const body = await health.json();
        if (loading && health.status === 503 && !loadingHealth) loadingHealth = { status: health.status, body };
        if (view.ready && view.stages.every((s) => s.state === 'serving') && health.status === 200) break;
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.ok(states.has('building N %') || states.has('loading N %'), `saw only ${[...states].join(', ')}`);
    assert.ok(loadingHealth, 'a 503 while a stage loaded');
    assert.match(loadingHealth.body.reason ?? '', /stage \d \(127\.0\.0\.1:\d+\) (building|loading) \[\d, \d\): \d+ % of/);
    const final = (await (await fetch(`${base}/v1/pipeline`)).json()) as { kv_slots: { capacity: number; waiting: number }; stages: { blocks: number[]; load: LoadProgress }[] };
    assert.deepEqual(final.stages.map((s) => s.load.phase), ['serving', 'serving']);
    assert.ok(Number.isInteger(final.kv_slots.capacity) && final.kv_slots.capacity > 0, `the stages' KV slots: ${JSON.stringify(final.kv_slots)}`);
    assert.equal(final.kv_slots.waiting, 0);
    const metrics = await (await fetch(`${base}/metrics`)).text();
    assert.ok(metrics.includes(`strata_kv_slots ${final.kv_slots.capacity}\n`) && metrics.includes('strata_requests_waiting_for_kv_slot 0\n'), 'the KV-slot gauges on /metrics');
    assert.equal(final.stages[0].blocks[0], 0);
    assert.equal(final.stages[0].blocks[1], final.stages[1].blocks[0]);
  } finally {
    if (up.exitCode === null) {
      const exited = new Promise((r) => up.once('exit', r));
      up.kill('SIGTERM');
      await exited;
    }
    await redis.stop();
  }
});
