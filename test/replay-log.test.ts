import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ReplayLog, replayExactly } from '../coordinator/replay-log.ts';
import { i64 } from './helpers/tensors.ts';

// After a fault the coordinator rebuilds a session's KV caches from its token log: as one prefill, or step by step
// as the session first ran (exact: what quantized stages need for identical greedy output, see replay-log.ts).

const step = (ids: number[], from: number) => ({ inputIds: i64([ids]), positionIds: i64([ids.map((_, i) => from + i)]), attentionMask: i64([Array.from({ length: from + ids.length }, () => 1)]) });

function logOf(exact: boolean) {
  const replay = new ReplayLog(true, exact);
  const log = replay.open('s');
  replay.record(log, step([5, 6, 7], 0));
  replay.record(log, step([8], 3));
  replay.record(log, step([9], 4));
  return replay.renew(log).steps;
}

test('prefill replay: one step of every token so far; exact replay: the steps as they ran, each with its own mask', () => {
  const prefill = logOf(false);
  assert.equal(prefill.length, 1);
  assert.deepEqual([...(prefill[0].inputIds!.data as BigInt64Array)].map(Number), [5, 6, 7, 8, 9]);
  const exact = logOf(true);
  assert.deepEqual(exact.map((s) => [...(s.inputIds!.data as BigInt64Array)].map(Number)), [[5, 6, 7], [8], [9]]);
  assert.deepEqual(exact.map((s) => s.attentionMask.dims[1]), [3, 4, 5]);
});

test('quantized stages replay exactly by default; STRATA_REPLAY=exact|prefill decides for every dtype', () => {
  assert.deepEqual(['float32', 'float16', 'int8', 'int4', undefined].map((d) => replayExactly(d, undefined)), [false, false, true, true, false]);
  assert.equal(replayExactly('float32', 'exact'), true);
  assert.equal(replayExactly('int8', 'prefill'), false);
});
