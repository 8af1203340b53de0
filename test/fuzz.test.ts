import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import * as grpc from '@grpc/grpc-js';
import { Checkpoint } from '../model/safetensors.ts';
import type { StrataError } from '../model/errors.ts';
import type { WireStepRequest } from '../proto/messages.ts';
import { StageClient } from '../transport/grpc/client.ts';
import { stepToWire } from '../proto/step-codec.ts';
import { startWorkerProcess, type LocalWorker } from '../bin/local-cluster.ts';
import { fixtureDir, testCacheDir } from './helpers/fixtures.ts';
import { createRng } from '../model/sampling.ts';

// Hostile input to the Stage service: random bytes, malformed and lying tensors, bad ids, unknown and flooding
// sessions. Every case must get a typed gRPC error or a valid answer; the worker must stay up and bounded.
before(() => testCacheDir());
const CASES = Number(process.env.STRATA_FUZZ_CASES ?? 400);

describe('Stage gRPC service under hostile input', () => {
  let w: LocalWorker;
  const dir = fixtureDir('gpt2-tiny');
  before(async () => {
    w = await startWorkerProcess(dir, ['--threads', '1', '--kv-budget-mb', '4']);
    await new StageClient(w.address).configure({ first: 0, last: 4, dtype: 'float32', next_address: '', fingerprint: '' });
  });
  after(() => w?.process.kill());

  test(`${CASES} malformed protobufs and lying tensors: typed errors, no crash, bounded memory`, async () => {
    const fp = Checkpoint.open(dir).fingerprint();
    const client = new StageClient(w.address);
    // A raw client: sends arbitrary bytes as a Step request.
    const raw = new grpc.Client(w.address, grpc.credentials.createInsecure());
    const sendRaw = (bytes: Buffer) =>
      new Promise<grpc.status>((resolve) => {
        raw.makeUnaryRequest('/strata.v1.Stage/Step', (b: Buffer) => b, (b: Buffer) => b, bytes, { deadline: Date.now() + 5_000 }, (err) => resolve(err ? err.code : grpc.status.OK));
      });
    const r = createRng(42);
    const int = (n: number) => Math.floor(r() * n);
    const i64 = (vals: number[]) => ({ dtype: 'int64', dims: [1, vals.length], data: new Uint8Array(BigInt64Array.from(vals, BigInt).buffer) });
    const good = (): WireStepRequest => {
      const T = 1 + int(8);
      return stepToWire(`fuzz-${int(1e9)}`, { fingerprint: fp, first: 0 }, {
        inputIds: { dtype: 'int64', dims: [1, T], data: BigInt64Array.from({ length: T }, () => BigInt(int(256))) },
        positionIds: { dtype: 'int64', dims: [1, T], data: BigInt64Array.from({ length: T }, (_, i) => BigInt(i)) },
        attentionMask: { dtype: 'int64', dims: [1, T], data: new BigInt64Array(T).fill(1n) },
      });
    };
    const mutations: ((q: any) => any)[] = [
      (q) => ({ ...q, input_ids: { ...q.input_ids, dims: [1, 2 ** 40] } }),
      (q) => ({ ...q, input_ids: { ...q.input_ids, dims: [-1, 3] } }),
      (q) => ({ ...q, input_ids: { ...q.input_ids, data: q.input_ids.data.subarray(1) } }),
      (q) => ({ ...q, input_ids: { ...q.input_ids, dtype: ['float64', 'bool', '', 'int8'][int(4)] } }),
      (q) => ({ ...q, input_ids: i64([int(2) ? -1 - int(1000) : 256 + int(1e6)]), position_ids: i64([0]), attention_mask: i64([1]) }),
      (q) => ({ ...q, position_ids: { ...q.position_ids, dims: [1, 1, 1, 1, 1, 1, 1, 1, 1] } }),
      (q) => ({ ...q, attention_mask: i64([1]) }),
      (q) => ({ ...q, attention_mask: { ...q.attention_mask, dims: [1, 2 ** 31] } }),
      (q) => ({ ...q, session_id: int(2) ? '' : 'x'.repeat(10_000) }),
      (q) => ({ ...q, first: int(2) ? 3 : 99 }),
      (q) => ({ ...q, fingerprint: 'not-this-checkpoint' }),
      (q) => ({ ...q, logit_positions: i64([99]) }),
      (q) => ({ ...q, input_ids: null, hidden: { dtype: 'float32', dims: [1, 1, 64], data: new Uint8Array(256) } }),
      (q) => ({ ...q, position_ids: i64([500]), attention_mask: i64(Array(501).fill(1)), input_ids: i64([3]) }), // unknown session mid-stream
      (q) => ({ ...q, position_ids: i64(Array.from({ length: 70 }, (_, i) => i)), attention_mask: i64(Array(70).fill(1)), input_ids: i64(Array(70).fill(3)) }), // over the context
      (q) => q, // valid: a flood of fresh sessions against a 4 MiB KV budget
    ];
    const seen = new Map<string, number>();
    for (let i = 0; i < CASES; i++) {
      if (i % 5 === 0) {
        const bytes = Buffer.from(Array.from({ length: int(200) }, () => int(256)));
        const code = await sendRaw(bytes);
        assert.ok(code === grpc.status.INVALID_ARGUMENT || code === grpc.status.FAILED_PRECONDITION, `random bytes got ${grpc.status[code]}`);
        seen.set(`raw:${grpc.status[code]}`, (seen.get(`raw:${grpc.status[code]}`) ?? 0) + 1);
        continue;
      }
      const m = int(mutations.length);
      try {
        await client.step(mutations[m](good()), 10_000);
        seen.set(`m${m}:OK`, (seen.get(`m${m}:OK`) ?? 0) + 1);
      } catch (e) {
        const err = e as Error & { code: string; kind: string };
        assert.ok(!['stage_error', 'stage_internal', 'internal'].includes(err.code), `case ${i} (mutation ${m}) got an untyped error: ${err.code} ${err.message}`);
        assert.notEqual(err.kind, 'unavailable', `case ${i} (mutation ${m}) took the worker down: ${err.message}`);
        seen.set(`m${m}:${err.code}`, (seen.get(`m${m}:${err.code}`) ?? 0) + 1);
      }
    }
    // A flood of sessions that never end: once every KV slot is held (by sessions idle less than
    // STRATA_KV_EVICT_IDLE_MS), new sessions get kv_slots_exhausted (resource_exhausted, HTTP 429); the store stays bounded.
    let refused = 0;
    for (let i = 0; i < 1000; i++) {
      await client.step(good(), 10_000).catch((e: StrataError) => {
        assert.equal(e.code, 'kv_slots_exhausted', e.message);
        refused++;
      });
    }
    assert.ok(refused > 0, 'a full stage refuses new sessions');
    const info = await client.info();
    assert.ok(info.sessions < 1000, `${info.sessions} sessions kept of 1000 opened`);
    assert.equal(await client.checkHealth(), 'SERVING');
    assert.ok(info.kv_bytes <= 4 * 2 ** 20, `KV bytes ${info.kv_bytes} within the 4 MiB budget`);
    assert.equal(w.process.exitCode, null, 'worker still running');
    // Over-context requests are refused by the graph's position table, not by a crash.
    console.log(`fuzz: ${CASES} cases, outcomes ${JSON.stringify(Object.fromEntries([...seen].sort()))}`);
    client.close();
    raw.close();
  });
});
