import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, openSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Checkpoint } from '../model/safetensors.ts';
import { directMode, openDirect, readSpan, worthDirect } from '../model/direct-read.ts';
import { writeSafetensors, type RawTensor } from './helpers/safetensors.ts';

// model/direct-read.ts: tensors read with O_DIRECT must be byte for byte the buffered read, whatever the alignment of
// the tensor in its file, of the part asked for, and across the bounce buffer's 16 MiB.

const bytes = (n: number, seed: number): Uint8Array => {
  const out = new Uint8Array(n);
  let x = seed;
  for (let i = 0; i < n; i++) out[i] = (x = (Math.imul(x, 1103515245) + 12345) >>> 0) >>> 24;
  return out;
};

function checkpoint(): { dir: string; file: string; big: Uint8Array; huge: Uint8Array } {
  const dir = mkdtempSync(join(tmpdir(), 'strata-direct-'));
  // A 3-element F16 tensor first: every later tensor starts at an offset that is not a multiple of 4096 (nor of 8).
  const small = bytes(6, 1), big = bytes(3 * 2 ** 20 + 2, 2), huge = bytes(20 * 2 ** 20, 3);
  const tensors = new Map<string, RawTensor>([
    ['small', { dtype: 'F16', shape: [3], data: small }],
    ['big', { dtype: 'F16', shape: [big.length / 2], data: big }],
    ['huge', { dtype: 'F16', shape: [huge.length / 2], data: huge }],
  ]);
  const file = join(dir, 'model.safetensors');
  writeSafetensors(file, tensors);
  return { dir, file, big, huge };
}

test('O_DIRECT reads equal buffered reads: whole tensors, parts at odd offsets, across the bounce buffer', () => {
  const { dir, file, big, huge } = checkpoint();
  const dfd = openDirect(file);
  // Where the file system has no O_DIRECT (tmpfs) the reads below are buffered: still checked, and said.
  if (dfd === null) console.log(`# ${tmpdir()} has no O_DIRECT: the direct path is not exercised here`);
  const previous = process.env.STRATA_DIRECT_IO;
  for (const mode of ['1', '0', undefined]) {
    if (mode === undefined) delete process.env.STRATA_DIRECT_IO;
    else process.env.STRATA_DIRECT_IO = mode;
    const ck = Checkpoint.open(dir);
    try {
      assert.deepEqual(ck.readRaw('big', [big.length / 2]).bytes, big, `readRaw, STRATA_DIRECT_IO=${mode}`);
      assert.deepEqual(ck.readRaw('huge', [huge.length / 2]).bytes, huge);
      for (const [from, length] of [[0, 2 ** 20], [12_346, 1.5 * 2 ** 20], [huge.length - 2 ** 20 - 3, 2 ** 20 + 3], [4096 * 3, 17 * 2 ** 20]]) {
        const into = new Uint8Array(length);
        ck.readInto('huge', [huge.length / 2], from, into);
        assert.deepEqual(into, huge.subarray(from, from + length), `readInto [${from}, ${from + length}), STRATA_DIRECT_IO=${mode}`);
      }
      // In order, chunk by chunk, as a quantizer streams a matrix (the read-ahead thread serves the next chunk), with
      // another tensor read in between now and then (a read ahead that is never taken).
      for (const chunk of [2 * 2 ** 20, 3 * 2 ** 20 + 6]) {
        const got = new Uint8Array(huge.length);
        for (let from = 0, i = 0; from < huge.length; from += chunk, i++) {
          ck.readInto('huge', [huge.length / 2], from, got.subarray(from, Math.min(huge.length, from + chunk)));
          if (i % 3 === 1) assert.deepEqual(ck.readRaw('big', [big.length / 2]).bytes, big);
        }
        assert.deepEqual(got, huge, `streamed in ${chunk}-byte chunks, STRATA_DIRECT_IO=${mode}`);
      }
      // Two tensors streamed in turns: each stream's read ahead must survive the other's.
      const a = new Uint8Array(huge.length), b = new Uint8Array(big.length), step = 2 ** 20;
      for (let from = 0; from < huge.length; from += step) {
        ck.readInto('huge', [huge.length / 2], from, a.subarray(from, Math.min(huge.length, from + step)));
        if (from < big.length) ck.readInto('big', [big.length / 2], from, b.subarray(from, Math.min(big.length, from + step)));
      }
      assert.deepEqual(a, huge, `two streams in turns: huge, STRATA_DIRECT_IO=${mode}`);
      assert.deepEqual(b, big, `two streams in turns: big, STRATA_DIRECT_IO=${mode}`);
    } finally {
      ck.close();
    }
  }
  if (previous === undefined) delete process.env.STRATA_DIRECT_IO;
  else process.env.STRATA_DIRECT_IO = previous;
  if (dfd !== null) {
    // The span reader itself, straight: the tail of the file (a short last read), and an unaligned middle.
    const fd = openSync(file, 'r');
    try {
      const head = Checkpoint.open(dir).info('huge')!.offset;
      const tail = new Uint8Array(3 * 2 ** 20);
      const r = readSpan(dfd, fd, tail, head + huge.length - tail.length);
      assert.deepEqual([r.bytes, r.directFailed], [tail.length, false]);
      assert.deepEqual(tail, huge.subarray(huge.length - tail.length));
      const past = readSpan(dfd, fd, new Uint8Array(2 ** 21), head + huge.length - 100);
      assert.equal(past.bytes, 100, 'a read past the end returns what there is');
    } finally {
      closeSync(fd);
      closeSync(dfd);
    }
  }
});

test('which tensors go direct: by mode and size (the page-cache probe decides the rest)', () => {
  const { file, huge } = checkpoint();
  const fd = openSync(file, 'r');
  try {
    assert.equal(directMode('0'), 'never');
    assert.equal(directMode('1'), 'always');
    assert.equal(directMode(undefined), 'auto');
    assert.equal(worthDirect(fd, 0, huge.length, 'never'), false);
    assert.equal(worthDirect(fd, 0, huge.length, 'always'), true);
    assert.equal(worthDirect(fd, 0, 64 << 10, 'always'), false, 'small tensors stay buffered');
    // Just written, the file is in the page cache: the probe (two one-page reads) finds it there and keeps the tensor
    // buffered. Five tries, so that a probe slowed by a busy machine (tests run in parallel) does not decide the test.
    const cached = [0, 1, 2, 3, 4].some(() => !worthDirect(fd, 0, huge.length, 'auto'));
    assert.equal(cached, true, 'a tensor in the page cache is read through it');
  } finally {
    closeSync(fd);
  }
});
