import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { loadModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { StrataError } from '../model/errors.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { forwardLogits, generate, type Stepper } from '../model/generation.ts';
import { CAP_STEP, KvSlots, slotBytes } from '../model/kv-slots.ts';
import { writeSyntheticModel } from '../model/synthetic.ts';
import type { TensorData } from '../model/tensor.ts';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KvStore } from '../worker/kv-store.ts';
import { StageClient } from '../transport/grpc/client.ts';
import { stepToWire } from '../proto/step-codec.ts';
import { RemotePipeline } from '../coordinator/remote-pipeline.ts';
import { SessionGate } from '../coordinator/session-gate.ts';
import { startWorkerProcess, type LocalWorker } from '../bin/local-cluster.ts';
import { expected, fixtureDir, testCacheDir } from './helpers/fixtures.ts';

before(() => testCacheDir());
const dir = fixtureDir('gpt2-tiny');
const spec = loadModelSpec(dir);
const code = (c: string) => (e: unknown) => e instanceof StrataError && e.code === c;
const i64 = (rows: number[][]) => ({ dtype: 'int64' as const, dims: [rows.length, rows[0].length], data: BigInt64Array.from(rows.flat(), BigInt) });
/** Bytes of one slot of the whole gpt2-tiny model (one stage holding every block). */
const SLOT = slotBytes({ layers: Array.from({ length: spec.blocks }, (_, i) => i), heads: spec.heads, headDim: spec.headDim, maxLen: spec.maxPositions, dtype: 'float32' });
const prefill = (ids: number[]) => ({ inputIds: i64([ids]), positionIds: i64([ids.map((_, i) => i)]), attentionMask: i64([ids.map(() => 1)]) });
const solo = async (prompt: number[], n = 6) => {
  const p = await LocalPipeline.load(dir, 1);
  const r = await generate(p, prompt, { maxNewTokens: n, eosTokenId: null });
  await p.close();
  return r.outputIds;
};

describe('KV store over a stage\'s slots: exhaustion, reuse, LRU/TTL eviction', () => {
  test('all slots held by active sessions: a typed error and nothing lost; an idle one gives up its slot; a freed slot is reused', async () => {
    const p = await LocalPipeline.load(dir, 1, { kvBudgetBytes: 3 * SLOT, maxBatch: 2 });
    const stage = p.stages[0];
    assert.equal(stage.slots!.capacity, 3, 'the budget sizes the slot count');
    let now = 0;
    const store = new KvStore(stage, 60_000, 10_000, () => now);
    const held = ['a', 'b', 'c'].map((s) => store.take(s, 0, 1).slots[0]);
    assert.deepEqual([...held].sort(), [0, 1, 2]);
    assert.throws(() => store.take('d', 0, 1), (e: unknown) => code('kv_slots_exhausted')(e) && (e as StrataError).kind === 'resource_exhausted');
    assert.equal(store.sessions, 3, 'a refused session evicts nobody active');
    now = 11_000;
    store.commit('a'); // a is recent again; b is now the least-recently-used idle session
    const d = store.take('d', 0, 1);
    assert.equal(d.slots[0], held[1], 'd took b\'s slot');
    assert.throws(() => store.take('b', 4, 1), code('session_evicted'));
    assert.ok(store.drop('c'));
    assert.equal(store.take('e', 0, 1).slots[0], held[2], 'c\'s freed slot is the next one taken');
    assert.throws(() => store.take('zzz', 5, 1), code('session_unknown'));
    assert.throws(() => store.take('a', 7, 1), code('session_out_of_step'));
    assert.equal(store.bytes, 3 * SLOT);
    now = 200_000;
    assert.deepEqual(store.sweep().sort(), ['a', 'd', 'e']);
    assert.equal(store.sessions, 0);
    assert.equal(stage.slots!.inUse, 0, 'expired sessions free their slots');
    await p.close();
  });

  test('in process: a third session is refused while two hold the slots; once one ends, it runs in the freed slot and matches its solo run', async () => {
    const p = await LocalPipeline.load(dir, 1, { kvBudgetBytes: 2 * SLOT });
    const prompts = expected('gpt2-tiny').generate!.map((g) => g.input_ids);
    await p.step('s1', prefill(prompts[0]));
    await p.step('s2', prefill([5, 6, 7, 8]));
    await assert.rejects(p.step('s3', prefill(prompts[1])), code('kv_slots_exhausted'));
    await p.end('s1');
    const got = await generate(p, prompts[1], { maxNewTokens: 6, eosTokenId: null });
    assert.deepEqual(got.outputIds, await solo(prompts[1]), 'a reused slot (stale contents beyond the session) changes nothing');
    await p.close();
  });

  test(`long sessions: up to n_positions (${spec.maxPositions}) tokens match a full recompute; one past it is prompt_too_long`, async () => {
    const p = await LocalPipeline.load(dir, 1);
    const prompt = Array.from({ length: spec.maxPositions - 12 }, (_, i) => (i * 7 + 3) % spec.vocab);
    const { outputIds } = await generate(p, prompt, { maxNewTokens: 12, eosTokenId: null, prefillChunk: 20 });
    const seq = [...prompt];
    for (const id of outputIds) {
      const row = (await forwardLogits(p, seq)).at(-1)!;
      assert.equal(id, row.indexOf(Math.max(...row)), `token at position ${seq.length}`);
      seq.push(id);
    }
    assert.equal(seq.length, spec.maxPositions);
    await assert.rejects(generate(p, prompt, { maxNewTokens: 13, eosTokenId: null, maxPositions: spec.maxPositions }), code('prompt_too_long'));
    // A stage refuses a step that would run past the context even when the caller did not check.
    const full = Array.from({ length: spec.maxPositions }, (_, i) => i % spec.vocab);
    await p.step('full', prefill(full));
    await assert.rejects(p.step('full', { inputIds: i64([[1]]), positionIds: i64([[spec.maxPositions]]), attentionMask: i64([[...full, 1].map(() => 1)]) }), code('prompt_too_long'));
    await p.end('full');
    await p.close();
  });
});

describe('slots over gRPC', () => {
  let w: LocalWorker;
  let one: LocalWorker;
  const evictIdle = process.env.STRATA_KV_EVICT_IDLE_MS;
  before(async () => {
    const mb = (n: number) => String((n * SLOT) / 2 ** 20);
    w = await startWorkerProcess(dir, ['--threads', '1', '--kv-budget-mb', mb(2)]);
    // A worker whose single slot goes to a new session as soon as the holder is idle at all: forces evictions.
    process.env.STRATA_KV_EVICT_IDLE_MS = '0';
    one = await startWorkerProcess(dir, ['--threads', '1', '--kv-budget-mb', mb(1)]);
    if (evictIdle === undefined) delete process.env.STRATA_KV_EVICT_IDLE_MS;
    else process.env.STRATA_KV_EVICT_IDLE_MS = evictIdle;
  });
  after(() => {
    w?.process.kill();
    one?.process.kill();
  });

  test('exhaustion is RESOURCE_EXHAUSTED kv_slots_exhausted on the wire; the held sessions go on; a freed slot serves the next', async () => {
    const c = new StageClient(w.address);
    const fp = Checkpoint.open(dir).fingerprint();
    await c.configure({ first: 0, last: spec.blocks, dtype: 'float32', next_address: '', fingerprint: fp });
    const step = (sid: string, input: ReturnType<typeof prefill>) => c.step(stepToWire(sid, { fingerprint: fp, first: 0 }, input), 5_000);
    await step('g1', prefill([1, 2]));
    await step('g2', prefill([3, 4]));
    await assert.rejects(step('g3', prefill([5, 6])), (e: StrataError & { grpcCode?: number }) => e.code === 'kv_slots_exhausted' && e.kind === 'resource_exhausted');
    // Nothing lost: both held sessions still decode.
    await step('g1', { inputIds: i64([[9]]), positionIds: i64([[2]]), attentionMask: i64([[1, 1, 1]]) });
    await step('g2', { inputIds: i64([[9]]), positionIds: i64([[2]]), attentionMask: i64([[1, 1, 1]]) });
    await c.endSession('g1');
    await step('g3', prefill([5, 6]));
    c.close();
  });

  test('a session evicted by another coordinator\'s is replayed and its greedy output is unchanged', async () => {
    const fp = Checkpoint.open(dir).fingerprint();
    const p = await RemotePipeline.connect([one.address], { spec, fingerprint: fp });
    // A second coordinator on the same worker: its sessions do not pass this one's gate (session-gate.ts).
    const other = await RemotePipeline.connect([one.address], { spec, fingerprint: fp });
    const [a, b] = expected('gpt2-tiny').generate!.map((g) => g.input_ids);
    let steps = 0;
    // Between a's 3rd and 4th step, a whole other session runs: it takes the only slot, evicting a.
    const interrupting: Stepper = {
      step: async (sid, input) => {
        if (++steps === 4) await generate(other, b, { maxNewTokens: 3, eosTokenId: null });
        return p.step(sid, input);
      },
      end: (sid) => p.end(sid),
    };
    const got = await generate(interrupting, a, { maxNewTokens: 8, eosTokenId: null });
    assert.deepEqual(got.outputIds, await solo(a, 8));
    p.close();
    other.close();
  });

  test('two coordinators on a worker of one slot: the second\'s request waits for the first\'s to end, and both complete as alone', async () => {
    const fp = Checkpoint.open(dir).fingerprint();
    const single = await startWorkerProcess(dir, ['--threads', '1', '--kv-budget-mb', String(SLOT / 2 ** 20)]);
    const a = await RemotePipeline.connect([single.address], { spec, fingerprint: fp });
    const b = await RemotePipeline.connect([single.address], { spec, fingerprint: fp });
    try {
      const [pa, pb] = [[4, 8, 15], [16, 23, 42]];
      // b's prompt starts while a's session holds the slot (a waits for its first token before b begins).
      let started!: () => void;
      const aHolds = new Promise<void>((r) => (started = r));
      const ga = generate(a, pa, { maxNewTokens: 12, eosTokenId: null, onToken: () => started() });
      await aHolds;
      const gb = generate(b, pb, { maxNewTokens: 12, eosTokenId: null });
      const [ra, rb] = await Promise.all([ga, gb]);
      assert.deepEqual(ra.outputIds, await solo(pa, 12));
      assert.deepEqual(rb.outputIds, await solo(pb, 12));
    } finally {
      a.close();
      b.close();
      single.process.kill();
    }
  });

  test('more concurrent requests than KV slots: the coordinator queues them and every one completes as it would alone', async () => {
    const fp = Checkpoint.open(dir).fingerprint();
    const two = await startWorkerProcess(dir, ['--threads', '1', '--kv-budget-mb', String((2 * SLOT) / 2 ** 20)]);
    const p = await RemotePipeline.connect([two.address], { spec, fingerprint: fp });
    try {
      assert.deepEqual(p.slots, { capacity: 2, waiting: 0 }, 'the worker reports its 2 slots');
      const prompts = Array.from({ length: 5 }, (_, i) => [1 + i, 7 + 2 * i, 3 * i + 2]);
      let mostWaiting = 0;
      const watch = setInterval(() => (mostWaiting = Math.max(mostWaiting, p.slots.waiting)), 1);
      const got = await Promise.all(prompts.map((q) => generate(p, q, { maxNewTokens: 6, eosTokenId: null }))).finally(() => clearInterval(watch));
      assert.ok(mostWaiting >= 1, 'requests waited for a slot instead of failing');
      for (const [i, q] of prompts.entries()) assert.deepEqual(got[i].outputIds, await solo(q), `request ${i}`);
      assert.deepEqual(p.slots, { capacity: 2, waiting: 0 });
    } finally {
      p.close();
      two.process.kill();
    }
  });
});

describe('the coordinator\'s session gate', () => {
  test('admits up to the fewest slots any stage reports, in arrival order; a wait past its limit is a typed 429', async () => {
    const gate = new SessionGate(50);
    gate.setCapacity([3, 2, 0]); // 0: a stage that reports none does not limit
    assert.equal(gate.limit, 2);
    await gate.admit('a');
    await gate.admit('b');
    await gate.admit('a'); // a session already admitted passes at once
    const order: string[] = [];
    const c = gate.admit('c').then(() => order.push('c'));
    const d = gate.admit('d').then(() => order.push('d'));
    assert.equal(gate.queued, 2);
    gate.release('a');
    gate.release('b');
    await Promise.all([c, d]);
    assert.deepEqual(order, ['c', 'd']);
    await assert.rejects(gate.admit('e'), (e: unknown) => code('kv_slots_exhausted')(e) && (e as StrataError).kind === 'resource_exhausted' && /waited/.test((e as Error).message));
    assert.equal(gate.queued, 0, 'a refused request leaves the queue');
    await assert.rejects(gate.admit('wide', 3), code('kv_slots_exhausted'));
    gate.setCapacity([]);
    await gate.admit('f'); // no stage reports slots: no limit
    assert.equal(gate.limit, Infinity);
  });
});

describe('host slots grow with their session', () => {
  test('reserve lays a slot out for more positions and keeps every head\'s rows; a released slot starts small again', () => {
    const g = { layers: [3], heads: 3, headDim: 2, maxLen: 4 * CAP_STEP, dtype: 'float32' as const };
    const slots = new KvSlots(g, 2 * slotBytes(g), false);
    const s = slots.acquire()!;
    const before = slots.slot(3, s).key as TensorData;
    assert.deepEqual(before.dims, [1, 3, CAP_STEP, 2]);
    const at = (cap: number, h: number, pos: number, d: number) => (h * cap + pos) * 2 + d;
    for (let h = 0; h < 3; h++) for (let pos = 0; pos < CAP_STEP; pos++) for (let d = 0; d < 2; d++) before.data[at(CAP_STEP, h, pos, d)] = 1000 * h + 10 * pos + d;
    slots.reserve(s, CAP_STEP + 1);
    const after = slots.slot(3, s).key as TensorData;
    assert.deepEqual(after.dims, [1, 3, 2 * CAP_STEP, 2]);
    for (let h = 0; h < 3; h++) for (let pos = 0; pos < CAP_STEP; pos++) for (let d = 0; d < 2; d++) assert.equal(after.data[at(2 * CAP_STEP, h, pos, d)], 1000 * h + 10 * pos + d);
    slots.reserve(s, 10 * CAP_STEP);
    assert.equal(slots.slot(3, s).key.dims[2], 4 * CAP_STEP, 'never past max_len');
    slots.release(s);
    assert.equal(slots.slot(3, slots.acquire()!).key.dims[2], CAP_STEP);
  });

  test(`a session decoding across several ${CAP_STEP}-position steps matches a full recompute (beside a short one), and so does a prompt fed in chunks across them`, async () => {
    const root = mkdtempSync(join(tmpdir(), 'strata-slot-growth-'));
    try {
      const model = join(root, 'model');
      writeSyntheticModel(model, { family: 'gpt2', blocks: 2, dModel: 64, heads: 4, vocab: 300, maxPositions: 4 * CAP_STEP });
      const p = await LocalPipeline.load(model, 1, { maxBatch: 2 });
      const long = Array.from({ length: 20 }, (_, i) => (i * 13 + 5) % 300);
      const short = [7, 8, 9];
      await p.step('long', prefill(long));
      await p.step('short', prefill(short));
      let maxDiff = 0;
      for (let t = 0; t < 2 * CAP_STEP + 10; t++) {
        const next = (t * 31 + 11) % 300;
        const ids = { long: [...long, next], short: [...short, next] };
        const run = (name: 'long' | 'short') => p.step(name, { inputIds: i64([[next]]), positionIds: i64([[ids[name].length - 1]]), attentionMask: i64([ids[name].map(() => 1)]) });
        const [a] = await Promise.all([run('long'), run('short')]);
        long.push(next);
        short.push(next);
        if (t % 16 !== 15) continue; // recompute every 16th step (each is a full prefill)
        const want = (await forwardLogits(p, long)).at(-1)!;
        const got = a.logits!.data as Float32Array;
        for (let i = 0; i < want.length; i++) maxDiff = Math.max(maxDiff, Math.abs(got[got.length - want.length + i] - want[i]));
      }
      assert.ok(long.length > 2 * CAP_STEP, 'the slot grew at least twice');
      // A prompt fed in chunks that cross several growths (the first chunk has no past) ends where a full pass does.
      const prompt = Array.from({ length: 3 * CAP_STEP - 10 }, (_, i) => (i * 17 + 3) % 300);
      let last: Float32Array | null = null;
      for (let at = 0; at < prompt.length; at += 40) {
        const chunk = prompt.slice(at, at + 40);
        const r = await p.step('chunked', { inputIds: i64([chunk]), positionIds: i64([chunk.map((_, i) => at + i)]), attentionMask: i64([Array.from({ length: at + chunk.length }, () => 1)]) });
        last = r.logits!.data as Float32Array;
      }
      const full = (await forwardLogits(p, prompt)).at(-1)!;
      const tail = last!.subarray(last!.length - full.length);
      assert.ok(full.every((x, i) => Math.abs(x - tail[i]) < 1e-4), 'chunked prefill across growths matches one pass');
      await p.end('chunked');
      assert.ok(maxDiff < 1e-4, `decode logits vs full recompute: max |diff| ${maxDiff}`);
      await p.end('long');
      await p.end('short');
      await p.close();
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
});
