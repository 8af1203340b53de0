import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import { loadModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { StrataError } from '../model/errors.ts';
import { writeSyntheticModel } from '../model/synthetic.ts';
import type { WireResultsMessage } from '../proto/messages.ts';
import { StageClient } from '../transport/grpc/client.ts';
import { stepToWire } from '../proto/step-codec.ts';
import { RemotePipeline } from '../coordinator/remote-pipeline.ts';
import { startWorkerProcess, startLocalCluster, type LocalCluster, type LocalWorker } from '../bin/local-cluster.ts';
import { fixtureDir, testCacheDir } from './helpers/fixtures.ts';

before(() => testCacheDir());
const STRATA = fileURLToPath(new URL('../bin/strata.js', import.meta.url));
const i64 = (rows: number[][]) => ({ dtype: 'int64' as const, dims: [rows.length, rows[0].length], data: BigInt64Array.from(rows.flat(), BigInt) });
const code = (c: string) => (e: unknown) => e instanceof StrataError && e.code === c;
/** A two-token prefill, and the decode step after it, addressed to stage 0 of checkpoint `fp` (StepBatch tests). */
const prefillStep = (fp: string, sid: string) => stepToWire(sid, { fingerprint: fp, first: 0 }, { inputIds: i64([[1, 2]]), positionIds: i64([[0, 1]]), attentionMask: i64([[1, 1]]) });
const decodeStep = (fp: string, sid: string) => stepToWire(sid, { fingerprint: fp, first: 0 }, { inputIds: i64([[3]]), positionIds: i64([[2]]), attentionMask: i64([[1, 1, 1]]) });

// The KV store (slots, LRU/TTL eviction, exhaustion) is tested in test/kv-slots.test.ts.

describe('stage handshake and refusals', () => {
  let a: LocalWorker, b: LocalWorker;
  before(async () => {
    [a, b] = await Promise.all([startWorkerProcess(fixtureDir('gptj-tiny')), startWorkerProcess(fixtureDir('gptneo-rotary-tiny'))]);
  });
  after(() => {
    a?.process.kill();
    b?.process.kill();
  });

  test('a stage refuses a predecessor built from a different checkpoint', async () => {
    const ca = new StageClient(a.address);
    const cb = new StageClient(b.address);
    await cb.configure({ first: 1, last: 3, dtype: 'float32', next_address: '', fingerprint: '' });
    await assert.rejects(ca.configure({ first: 0, last: 1, dtype: 'float32', next_address: b.address, fingerprint: '' }), (e: StrataError) => e.code === 'peer_mismatch' && /checkpoint/.test(e.message));
    // A step addressed with another checkpoint's fingerprint is refused too (FAILED_PRECONDITION on the wire).
    const req = stepToWire('s1', { fingerprint: Checkpoint.open(fixtureDir('gptj-tiny')).fingerprint(), first: 1 }, { positionIds: i64([[0]]), attentionMask: i64([[1]]) });
    await assert.rejects(cb.step(req, 5_000), code('stage_mismatch'));
    // The coordinator refuses the pair as well, before configuring anything.
    const spec = loadModelSpec(fixtureDir('gptj-tiny'));
    await assert.rejects(RemotePipeline.connect([a.address, b.address], { spec, fingerprint: Checkpoint.open(fixtureDir('gptj-tiny')).fingerprint() }), code('checkpoint_mismatch'));
    ca.close();
    cb.close();
  });

  test('malformed tensors are INVALID_ARGUMENT, and the worker keeps serving', async () => {
    const cb = new StageClient(b.address);
    const fp = Checkpoint.open(fixtureDir('gptneo-rotary-tiny')).fingerprint();
    await cb.configure({ first: 0, last: 3, dtype: 'float32', next_address: '', fingerprint: fp });
    const good = stepToWire('s2', { fingerprint: fp, first: 0 }, { inputIds: i64([[1, 2]]), positionIds: i64([[0, 1]]), attentionMask: i64([[1, 1]]) });
    const lying = { ...good, input_ids: { dtype: 'int64', dims: [1, 1 << 30], data: new Uint8Array(16) } };
    await assert.rejects(cb.step(lying, 5_000), code('tensor_too_large'));
    await assert.rejects(cb.step({ ...good, input_ids: { dtype: 'int64', dims: [1, 3], data: new Uint8Array(16) } }, 5_000), code('tensor_size_mismatch'));
    await assert.rejects(cb.step({ ...good, position_ids: { dtype: 'float64', dims: [1, 2], data: new Uint8Array(16) } }, 5_000), code('tensor_dtype_invalid'));
    await assert.rejects(cb.step(stepToWire('s3', { fingerprint: fp, first: 0 }, { inputIds: i64([[1, 999]]), positionIds: i64([[0, 1]]), attentionMask: i64([[1, 1]]) }), 5_000), code('token_id_out_of_range'));
    await assert.rejects(cb.step(stepToWire('s4', { fingerprint: fp, first: 0 }, { inputIds: i64([[1]]), positionIds: i64([[7]]), attentionMask: i64([Array(8).fill(1)]) }), 5_000), code('session_unknown'));
    const ok = await cb.step(good, 5_000);
    assert.equal(ok.logits?.dims.join(), '1,2,256');
    assert.equal(await cb.checkHealth(), 'SERVING');
    cb.close();
  });

  test('a StepBatch answers every item on its own, and runs its decode steps as one batch', async () => {
    const cb = new StageClient(b.address);
    const fp = Checkpoint.open(fixtureDir('gptneo-rotary-tiny')).fingerprint();
    await cb.configure({ first: 0, last: 3, dtype: 'float32', next_address: '', fingerprint: fp });
    const lying = { ...prefillStep(fp, 'x1'), input_ids: { dtype: 'int64', dims: [1, 3], data: new Uint8Array(16) } };
    const first = await cb.stepBatch([prefillStep(fp, 'b1'), lying, { ...prefillStep(fp, 'x2'), first: 1 }, decodeStep(fp, 'never-prefilled'), prefillStep(fp, 'b2')], 5_000);
    assert.deepEqual(first.map((o) => o.error?.code ?? 'ok'), ['ok', 'tensor_size_mismatch', 'stage_mismatch', 'session_unknown', 'ok']);
    assert.equal(first[0].reply?.logits?.dims.join(), '1,2,256');
    const second = await cb.stepBatch([decodeStep(fp, 'b1'), decodeStep(fp, 'b2')], 5_000);
    assert.deepEqual(second.map((o) => o.reply?.timings[0].batch), [2, 2], 'both decode steps shared one ORT run');
    await assert.rejects(cb.stepBatch([], 5_000), code('step_batch_invalid'));
    // reply_to: the reply goes to that Results subscription and the chain gets an ack; an unknown one falls back.
    const results = cb.results('sub-test');
    const delivered = new Promise<WireResultsMessage>((resolve) => results.on('data', (m: WireResultsMessage) => m.replies.length && resolve(m)));
    await new Promise((resolve) => results.once('data', resolve)); // { ready: true }
    const [ack] = await cb.stepBatch([{ ...prefillStep(fp, 'b3'), reply_to: 'sub-test' }], 5_000);
    assert.equal(ack.reply?.delivered, true);
    assert.equal(ack.reply?.logits ?? null, null, 'the ack carries no result');
    const got = await delivered;
    assert.equal(got.replies[0].session_id, 'b3');
    assert.equal(got.replies[0].reply?.logits?.dims.join(), '1,2,256');
    const [fallback] = await cb.stepBatch([{ ...prefillStep(fp, 'b4'), reply_to: 'nobody' }], 5_000);
    assert.equal(fallback.reply?.delivered, false);
    assert.equal(fallback.reply?.logits?.dims.join(), '1,2,256');
    results.on('error', () => {}); // CANCELLED: ours
    results.cancel();
    assert.equal(await cb.checkHealth(), 'SERVING');
    cb.close();
  });
});

describe('stage protocol 3: a stage holding the subscription passes a step on and acks at once', () => {
  let cluster: LocalCluster;
  let clients: StageClient[];
  const dir = fixtureDir('gptneo-rotary-tiny');
  before(async () => {
    cluster = await startLocalCluster(dir, 3);
    clients = cluster.workers.map((w) => new StageClient(w.address));
  });
  after(async () => {
    clients?.forEach((c) => c.close());
    await cluster?.stop();
  });

  /** Opens `subscriber` on the given stages; resolves with its queue of delivered entries once every stage confirmed. */
  async function subscribe(subscriber: string, at: StageClient[]) {
    const got: { stage: number; entry: WireResultsMessage['replies'][number] }[] = [];
    const waiters: (() => void)[] = [];
    const streams = await Promise.all(
      at.map(async (c, stage) => {
        const s = c.results(subscriber);
        s.on('error', () => {}); // CANCELLED: ours
        await new Promise<void>((resolve) => s.on('data', (m: WireResultsMessage) => {
          if (m.ready) resolve();
          for (const entry of m.replies) got.push({ stage, entry });
          waiters.splice(0).forEach((w) => w());
        }));
        return s;
      }),
    );
    const next = async () => {
      while (!got.length) await new Promise<void>((r) => waiters.push(r));
      return got.shift()!;
    };
    return { next, close: () => streams.forEach((s) => s.cancel()) };
  }

  test('the result carries every stage\'s timing, and a later stage\'s error comes from the stage before it', async () => {
    const fp = Checkpoint.open(dir).fingerprint();
    await Promise.all(clients.map((c, i) => c.configure({ first: i, last: i + 1, dtype: 'float32', next_address: cluster.workers[i + 1]?.address ?? '', fingerprint: fp })));

    const all = await subscribe('sub-all', clients);
    const [ack] = await clients[0].stepBatch([{ ...prefillStep(fp, 'p1'), reply_to: 'sub-all' }], 5_000);
    assert.deepEqual(ack.reply && { delivered: ack.reply.delivered, timings: ack.reply.timings.length }, { delivered: true, timings: 0 }, 'stage 0 acks with no result and no timings');
    const result = await all.next();
    assert.equal(result.stage, 2, 'the result comes from the last stage');
    assert.equal(result.entry.session_id, 'p1');
    assert.equal(result.entry.reply?.logits?.dims.join(), '1,2,256');
    assert.deepEqual(result.entry.reply?.timings.map((t) => [t.first, t.last]), [[0, 1], [1, 2], [2, 3]]);

    // Stage 2 forgets p1: its error for p1's next step reaches the subscription from stage 1, which passed it on.
    await clients[2].endSession('p1');
    const [ack2] = await clients[0].stepBatch([{ ...decodeStep(fp, 'p1'), reply_to: 'sub-all' }], 5_000);
    assert.equal(ack2.reply?.delivered, true);
    const failed = await all.next();
    assert.deepEqual({ stage: failed.stage, session: failed.entry.session_id, code: failed.entry.error?.code }, { stage: 1, session: 'p1', code: 'session_unknown' });
    all.close();

    // A subscription held by the last stage only: earlier stages wait for the chain, which brings back an ack.
    const last = await subscribe('sub-last', [clients[2]]);
    const [ack3] = await clients[0].stepBatch([{ ...prefillStep(fp, 'p2'), reply_to: 'sub-last' }], 5_000);
    assert.equal(ack3.reply?.delivered, true);
    const r3 = await last.next();
    assert.deepEqual(r3.entry.reply?.timings.map((t) => t.first), [0, 1, 2]);
    last.close();
    // No subscription anywhere: the whole reply, with every timing, comes back through the chain.
    const [chain] = await clients[0].stepBatch([{ ...prefillStep(fp, 'p3'), reply_to: 'nobody' }], 5_000);
    assert.equal(chain.reply?.delivered, false);
    assert.deepEqual(chain.reply?.timings.map((t) => t.first), [0, 1, 2]);
  });
});

describe('worker start-up', () => {
  test('a worker given a bad model directory exits with a clear message', () => {
    const r = spawnSync(process.execPath, [STRATA, 'worker', '--listen', '127.0.0.1:0', '--model', '/nonexistent/model'], { encoding: 'utf8' });
    assert.equal(r.status, 2);
    assert.match(r.stderr, /\/nonexistent\/model has no config\.json/);
    const noWeights = mkdtempSync(join(tmpdir(), 'strata-noweights-'));
    spawnSync('cp', [join(fixtureDir('gpt2-tiny'), 'config.json'), noWeights]);
    const r2 = spawnSync(process.execPath, [STRATA, 'worker', '--listen', '127.0.0.1:0', '--model', noWeights], { encoding: 'utf8' });
    assert.equal(r2.status, 2);
    assert.match(r2.stderr, /no model\.safetensors/);
  });
});

describe('a 16 MiB hidden-state hop (1024 tokens × 4096 float32)', () => {
  let cluster: LocalCluster;
  const dir = join(mkdtempSync(join(tmpdir(), 'strata-wide-')), 'gptj-wide');
  before(async () => {
    // GPT-J width, a narrow MLP and tiny vocabulary keep the weights (2 × 268 MB) and the compute bearable.
    writeSyntheticModel(dir, { family: 'gptj', blocks: 2, dModel: 4096, heads: 32, inner: 64, vocab: 64, maxPositions: 1024, rotaryDim: 64 });
    cluster = await startLocalCluster(dir, 2);
  });
  after(async () => cluster?.stop());

  test('a 1024-token prefill passes stage 0 → stage 1 over gRPC', async () => {
    const spec = loadModelSpec(dir);
    const p = await RemotePipeline.connect(cluster.workers.map((w) => w.address), { spec, fingerprint: Checkpoint.open(dir).fingerprint(), ranges: [{ first: 0, last: 1 }, { first: 1, last: 2 }] });
    const ids = Array.from({ length: 1024 }, (_, i) => i % 64);
    const r = await p.step('wide', { inputIds: i64([ids]), positionIds: i64([ids.map((_, i) => i)]), attentionMask: i64([ids.map(() => 1)]), logitPositions: { dtype: 'int64', dims: [1], data: BigInt64Array.of(1023n) } });
    assert.deepEqual(r.logits!.dims, [1, 1, 64]);
    assert.ok((r.logits!.data as Float32Array).every(Number.isFinite));
    await p.end('wide');
    p.close();
  });
});

test('TLS-less gRPC defaults are sized for the hop', () => {
  assert.ok(Number(process.env.STRATA_MAX_MESSAGE_MB ?? 256) * 2 ** 20 >= 1024 * 4096 * 4 + 4096);
  assert.ok(grpc.status.INVALID_ARGUMENT === 3);
});
