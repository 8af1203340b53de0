import { describe, test, before } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runBench } from '../bin/bench.ts';
import { DEFAULT_DECODE_STEPS } from '../coordinator/remote-pipeline.ts';
import { normalizeConfig } from '../model/config.ts';
import { PRESETS, syntheticConfig } from '../model/synthetic.ts';
import { mean, median, percentile, ratio, summarize } from '../bench/stats.ts';
import { decodeRate } from '../bench/workload.ts';
import { resolveShape, weightBytes } from '../bench/model.ts';
import { renderTimeline } from '../bench/timeline.ts';
import { table } from '../bench/report.ts';
import { cpuWindow } from '../bench/cpu.ts';
import { OrtStreamProbe } from '../bench/ort-stream.ts';
import type { PipelineBenchReport } from '../bench/pipeline.ts';
import type { QuantBenchReport } from '../bench/quant.ts';
import { testCacheDir } from './helpers/fixtures.ts';

before(() => testCacheDir());

describe('bench stats helpers', () => {
  test('percentile interpolates between closest ranks (NumPy linear)', () => {
    const xs = [15, 20, 35, 40, 50];
    assert.equal(percentile(xs, 0), 15);
    assert.equal(percentile(xs, 100), 50);
    assert.equal(percentile(xs, 50), 35);
    assert.equal(percentile(xs, 25), 20);
    assert.ok(Math.abs(percentile(xs, 95) - 48) < 1e-12); // rank 3.8 → 40 + 0.8·10
    assert.ok(Math.abs(percentile([1, 2, 3, 4], 50) - 2.5) < 1e-12);
    assert.equal(percentile([7], 95), 7);
    assert.ok(Number.isNaN(percentile([], 50)));
    assert.throws(() => percentile([1], 101), RangeError);
  });

  test('percentile does not depend on input order and does not mutate it', () => {
    const xs = [5, 1, 4, 2, 3];
    assert.equal(median(xs), 3);
    assert.deepEqual(xs, [5, 1, 4, 2, 3]);
    const big = Array.from({ length: 101 }, (_, i) => 100 - i);
    assert.equal(percentile(big, 95), 95);
  });

  test('summarize, mean, ratio', () => {
    const s = summarize([3, 1, 2, 10]);
    assert.equal(s.n, 4);
    assert.equal(s.min, 1);
    assert.equal(s.max, 10);
    assert.equal(s.mean, 4);
    assert.equal(s.p50, 2.5);
    assert.ok(s.p95 > 8.9 && s.p95 <= 10);
    assert.equal(summarize([]).n, 0);
    assert.ok(Number.isNaN(mean([])));
    assert.equal(ratio(3, 2), 1.5);
    assert.ok(Number.isNaN(ratio(1, 0)));
  });

  test('decodeRate counts tokens in the window where every request is decoding', () => {
    // One request, 5 tokens 10 ms apart: 4 decode tokens in 40 ms = 100 tok/s.
    assert.equal(decodeRate([{ tokenTimes: [0, 10, 20, 30, 40] }]), 100);
    // Two requests; all decoding from t=10 to t=40: tokens at (10, 40] are 20, 30, 40 and 25, 35 → 5 in 30 ms.
    const r = decodeRate([{ tokenTimes: [0, 10, 20, 30, 40] }, { tokenTimes: [10, 25, 35, 45] }]);
    assert.ok(Math.abs(r - (5 * 1000) / 30) < 1e-9);
  });

  test('weight bytes of GPT-2 small: 12 blocks of 12·D²+13·D floats, the LM head is the tied embedding', () => {
    const spec = normalizeConfig(syntheticConfig(PRESETS['gpt2-small']));
    const w = weightBytes(spec);
    const D = 768;
    assert.equal(w.blocks, 12 * (12 * D * D + 13 * D) * 4);
    assert.equal(w.head, (50257 * D + 2 * D) * 4);
    assert.equal(w.readPerStep, w.blocks + w.head + 2 * D * 4);
    assert.ok(w.held > w.readPerStep); // it holds the position table too
  });

  test('resolveShape: flags override the preset; bad dims are refused with a message', () => {
    assert.deepEqual({ ...resolveShape({ blocks: 2, dModel: 64, heads: 4, vocab: 256 }) }, { ...PRESETS['gpt2-small'], blocks: 2, dModel: 64, heads: 4, vocab: 256 });
    assert.throws(() => resolveShape({ dModel: 100, heads: 3 }), /multiple of --heads/);
    assert.throws(() => resolveShape({ preset: 'nope' }), /unknown preset/);
  });

  test('timeline renders one lane per stage and one bar per run; tables align', () => {
    const html = renderTimeline('t', [{ title: 'run', startMs: 1000, endMs: 1100, lanes: [{ label: 's0', runs: [{ startMs: 1000, ms: 5, batch: 1 }, { startMs: 1010, ms: 5, batch: 3 }] }, { label: 's1 <x>', runs: [] }] }]);
    assert.equal(html.match(/class="lane"/g)?.length, 2);
    assert.equal(html.match(/class="bar"/g)?.length, 2);
    assert.match(html, /s1 &lt;x&gt;/);
    assert.match(html, /batch 3/);
    const t = table(['a', 'bb'], [['x', 1], ['yyy', 22]]);
    assert.equal(t.split('\n')[3], 'yyy  22');
  });
});

describe('strata bench (tiny synthetic model, real worker processes)', () => {
  test('pipeline suite: JSON with sane fields, timeline with one lane per stage', { timeout: 60_000 }, async () => {
    const out = mkdtempSync(join(tmpdir(), 'strata-bench-'));
    const { report, jsonPath, timelinePath, text } = await runBench({ blocks: 2, dModel: 64, heads: 4, vocab: 256, workers: 2, concurrency: 2, promptTokens: 4, newTokens: 4, out, quiet: true });
    const r = JSON.parse(readFileSync(jsonPath, 'utf8')) as PipelineBenchReport;
    assert.equal(r.suite, 'pipeline');
    assert.equal(report.suite, 'pipeline');
    for (const run of [r.pipeline, r.baselines.singleWorker, r.baselines.inProcess]) {
      assert.ok(run.tokensPerSec > 0, `${run.label}: tokens/s ${run.tokensPerSec}`);
      assert.ok(run.decodeTokensPerSec > 0, `${run.label}: decode tokens/s ${run.decodeTokensPerSec}`);
      assert.equal(run.generatedTokens, 2 * 4);
      assert.equal(run.ttftMs.n, 2);
      assert.equal(run.itlMs.n, 2 * 3);
      assert.ok(run.ttftMs.p50 > 0 && run.itlMs.p95 >= run.itlMs.p50);
    }
    assert.equal(r.pipeline.workers, 2);
    assert.deepEqual(r.pipeline.ranges, [[0, 1], [1, 2]]);
    assert.equal(r.baselines.singleWorker.workers, 1);
    assert.equal(r.baselines.inProcess.mode, 'in-process');
    assert.equal(r.pipeline.stages.length, 2);
    for (const st of r.pipeline.stages) {
      assert.ok(st.busyPct >= 0 && st.busyPct <= 100, `busy ${st.busyPct}`);
      assert.ok(st.runs >= 1);
      assert.ok(st.meanBatch >= 1 && st.maxBatch <= 2);
    }
    // Hidden state per hop: prefill [1, 4, 64] + 3 decode steps [1, 1, 64] per request, float32.
    assert.equal(r.pipeline.hops.length, 1);
    assert.equal(r.pipeline.hops[0].bytesPerDecodeStep, 64 * 4);
    assert.equal(r.pipeline.hops[0].bytesPerPrefill, 4 * 64 * 4);
    assert.equal(r.pipeline.hops[0].totalBytes, 2 * (4 + 3) * 64 * 4);
    assert.ok(Number.isFinite(r.ratios.decodeVsSingleWorker) && r.ratios.decodeVsSingleWorker > 0);
    assert.ok(Number.isFinite(r.ratios.decodeVsInProcess) && r.ratios.decodeVsInProcess > 0);
    assert.match(text, /pipeline: 2 workers/);
    if (process.platform === 'linux') {
      assert.deepEqual(r.pipeline.cpu?.stages.map((c) => c.pid), r.pipeline.stages.map((st) => st.pid), 'a CPU split per stage process');
      assert.equal(r.pipeline.cpu?.coordinator.pid, process.pid);
      assert.match(text, /CPU in the timed window: [\d.]+ s on \d+ cores/);
    }

    assert.ok(existsSync(timelinePath));
    const html = readFileSync(timelinePath, 'utf8');
    const first = html.slice(html.indexOf('<section id="run-0">'), html.indexOf('</section>'));
    assert.equal(first.match(/class="lane"/g)?.length, 2, 'one lane per stage');
    assert.ok((first.match(/class="bar"/g)?.length ?? 0) >= 1, 'at least one bar');
    assert.match(html, /<svg/);
    assert.match(html, /batch 1/); // legend
  });

  test('quant suite: each dtype on its worker, int8 also without run-ahead and unchained, int8/int4 also on a one-row worker', { timeout: 120_000 }, async () => {
    const out = mkdtempSync(join(tmpdir(), 'strata-bench-'));
    const { report, jsonPath, text } = await runBench({ suite: 'quant', blocks: 2, dModel: 64, heads: 4, vocab: 256, concurrency: 2, promptTokens: 4, newTokens: 4, repeats: 1, threadsPerWorker: 1, out, quiet: true });
    const r = report as QuantBenchReport;
    assert.equal((JSON.parse(readFileSync(jsonPath, 'utf8')) as QuantBenchReport).rows.length, r.rows.length);
    const names = r.rows.map((x) => `${x.dtype}/${x.runAhead}/${x.decodeSteps}/${x.maxBatch}`);
    const d = DEFAULT_DECODE_STEPS;
    assert.deepEqual(names, [`float32/true/${d}/8`, `int8/true/${d}/8`, `int4/true/${d}/8`, `int8/false/${d}/8`, `int8/true/${d}/1`, `int4/true/${d}/1`, 'int8/true/1/8']);
    for (const x of r.rows) {
      assert.ok(x.batch1MsPerToken > 0 && x.weightBytes > 0 && x.rssBytes > 0, JSON.stringify(x));
      assert.equal(Number.isNaN(x.aggregateDecodeTokS), x.maxBatch === 1, 'a one-row worker serves batch 1 only');
    }
    assert.ok(r.ratios['int8.batch1OneRowSpeedup'] > 0 && r.ratios['int4.batch1OneRowSpeedup'] > 0);
    assert.equal(r.llama.length, 0, 'no anchors given');
    assert.match(text, /int8 \(--max-batch 1\)/);
    // Each quantized dtype's one-row step, split into its linear layers and the rest (bench/linear-share.ts).
    assert.deepEqual(r.linears.map((s) => s.dtype), ['int8', 'int4']);
    for (const s of r.linears) assert.ok(s.stepMs > 0 && s.withoutLinearsMs > 0 && s.samples.stepMs.length > 0, JSON.stringify(s));
    assert.match(text, /int4 one-row step in process [\d.]+ ms = linear layers/);
  });
});

test('the CPU split counts a busy main thread as event loop time', { skip: process.platform !== 'linux' && 'needs /proc' }, () => {
  const win = cpuWindow([process.pid]);
  const start = process.cpuUsage();
  const used = () => { const u = process.cpuUsage(start); return (u.user + u.system) / 1000; };
  while (used() < 200); // 200 ms of CPU, nearly all of it on this (main) thread, however loaded the machine is
  const [split] = win.done();
  assert.ok(split && split.eventLoopMs >= 150 && split.eventLoopMs <= 1000, `event loop ${split?.eventLoopMs} ms`);
  assert.ok(split.otherMs < split.eventLoopMs, `other threads ${split.otherMs} ms`);
});

test("the linear-layers probe reads exactly the model's linear weights, once per run", { timeout: 60_000 }, async () => {
  const shapes = { blocks: 2, dModel: 64, inner: 256, vocab: 100 };
  const probe = await OrtStreamProbe.open(1, mkdtempSync(join(tmpdir(), 'strata-probe-')), shapes);
  try {
    const r = await probe.measure(2);
    assert.equal(r.bytes, (2 * (4 * 64 * 64 + 2 * 64 * 256) + 100 * 64) * 4);
    assert.equal(r.trialsMs.length, 2);
    assert.ok(r.bytesPerSec > 0 && Number.isFinite(r.bytesPerSec));
  } finally {
    await probe.close();
  }
});

