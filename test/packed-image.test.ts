import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, truncateSync, writeFileSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { forwardLogits, generate } from '../model/generation.ts';
import { onnx } from '../model/onnx-builder.ts';
import { imageDir, packedImageUsed, prepackedSpan, readyImage } from '../model/packed-image.ts';
import type { QuantizedDType } from '../model/dtype.ts';
import { expected, fixtureDir, maxAbsDiff } from './helpers/fixtures.ts';
import { loadModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { evenSplit } from '../model/range.ts';
import { RemotePipeline } from '../coordinator/remote-pipeline.ts';
import { startLocalCluster } from '../bin/local-cluster.ts';

// Packed images (model/packed-image.ts) are opt-in: this file's process turns them on.
process.env.STRATA_PACKED_IMAGE = '1';

/** Loads `fixture` at `dtype` on one stage with a given cache; returns its logits, greedy ids and the load's log. */
async function run(fixture: string, dtype: QuantizedDType, cacheDir: string) {
  const log: string[] = [];
  const p = await LocalPipeline.load(fixtureDir(fixture), 1, { dtype, threads: 1, cacheDir, onProgress: (m) => log.push(m) });
  try {
    const exp = expected(fixture);
    const logits = [];
    for (const c of exp.forward) logits.push(await forwardLogits(p, c.input_ids));
    const g = exp.generate?.[0];
    const ids = g ? (await generate(p, g.input_ids, { maxNewTokens: g.max_new_tokens, eosTokenId: null })).outputIds : [];
    return { logits, ids, log, graph: p.prepared[0].path };
  } finally {
    await p.close();
  }
}

const written = (log: string[]) => log.some((m) => m.startsWith('packed image written'));
const fromImage = (log: string[]) => log.some((m) => m.startsWith('stage loaded from its packed image'));

describe('packed images of quantized stages (STRATA_PACKED_IMAGE=1)', () => {
  for (const fixture of ['gpt2-tiny', 'gptj-tiny']) {
    for (const dtype of ['int8', 'int4'] as const) {
      test(`${fixture} ${dtype}: the first load writes the image, the next loads it, and the logits and tokens are bit for bit the same`, async () => {
        const cacheDir = mkdtempSync(join(tmpdir(), 'strata-image-'));
        const first = await run(fixture, dtype, cacheDir);
        assert.ok(written(first.log) && !fromImage(first.log), first.log.join('\n'));
        const image = readyImage(first.graph);
        assert.ok(image, 'a finished image');
        // ORT's flaws repaired: every packed weight 64-byte aligned, no initializer twice in one graph.
        const model = onnx.ModelProto.decode(readFileSync(image));
        const blobs: number[] = [];
        const walk = (g: NonNullable<typeof model.graph>): void => {
          const names = (g.initializer ?? []).map((t) => t.name);
          assert.equal(new Set(names).size, names.length, 'initializer names unique in each graph');
          for (const t of g.initializer ?? []) for (const e of t.externalData ?? []) if (e.key!.startsWith('prepacked')) blobs.push(prepackedSpan(e.value!).offset);
          for (const n of g.node ?? []) for (const a of n.attribute ?? []) if (a.g) walk(a.g as typeof g);
        };
        walk(model.graph!);
        assert.ok(blobs.length > 0, 'the image holds packed weights');
        assert.deepEqual(blobs.filter((o) => o % 64 !== 0), []);

        const second = await run(fixture, dtype, cacheDir);
        assert.ok(fromImage(second.log) && !written(second.log), second.log.join('\n'));
        assert.deepEqual(second.logits, first.logits);
        assert.deepEqual(second.ids, first.ids);
      });
    }
  }

  test('a half-written or unreadable image is not used: the stage graph loads and the image is written again; a dead writer\'s leftovers go', async () => {
    const cacheDir = mkdtempSync(join(tmpdir(), 'strata-image-'));
    const first = await run('gptj-tiny', 'int8', cacheDir);
    const dir = imageDir(first.graph);
    // Half written: the data file shorter than the image recorded.
    const data = join(dir, 'image.bin');
    truncateSync(data, statSync(data).size - 100);
    assert.equal(readyImage(first.graph), null);
    // A raw image a dead worker left behind is removed when the next one is written.
    const stale = `${dir}.tmp-2147483646-1`;
    mkdirSync(stale);
    writeFileSync(join(stale, 'image.bin'), 'x');
    const second = await run('gptj-tiny', 'int8', cacheDir);
    assert.ok(written(second.log) && !fromImage(second.log), second.log.join('\n'));
    assert.equal(existsSync(stale), false);
    assert.deepEqual(second.logits, first.logits);
    // Unreadable at its recorded size: ORT refuses the graph, the loader falls back and rewrites it.
    const graph = readyImage(first.graph)!;
    writeFileSync(graph, Buffer.alloc(statSync(graph).size, 0xff));
    const third = await run('gptj-tiny', 'int8', cacheDir);
    assert.ok(third.log.some((m) => m.includes('did not load')) && written(third.log), third.log.join('\n'));
    assert.deepEqual(third.logits, first.logits);
    assert.ok(readyImage(first.graph));
    assert.equal(dirname(readyImage(first.graph)!), dir);
  });

  test('over gRPC: two worker processes write their stages\' images, restarted workers load them, the logits stay the same', async () => {
    const dir = fixtureDir('gptj-tiny');
    const spec = loadModelSpec(dir);
    const exp = expected('gptj-tiny');
    const cacheDir = mkdtempSync(join(tmpdir(), 'strata-image-'));
    const reference = await run('gptj-tiny', 'int4', mkdtempSync(join(tmpdir(), 'strata-image-')));
    const serve = async () => {
      const cluster = await startLocalCluster(dir, 2, ['--cache-dir', cacheDir]);
      try {
        const p = await RemotePipeline.connect(cluster.workers.map((w) => w.address), { spec, fingerprint: Checkpoint.open(dir).fingerprint(), dtype: 'int4', ranges: evenSplit(spec.blocks, 2) });
        try {
          return await Promise.all(exp.forward.map((c) => forwardLogits(p, c.input_ids)));
        } finally {
          p.close();
        }
      } finally {
        await cluster.stop();
      }
    };
    const first = await serve();
    const images = (root: string): string[] => readdirSync(root, { recursive: true, encoding: 'utf8' }).filter((f) => f.endsWith('image.json'));
    assert.equal(images(cacheDir).length, 4, 'one image per stage graph: each stage\'s 8-row graph and its one-row graph for batch 1');
    const written = () => images(cacheDir).map((f) => statSync(join(cacheDir, f)).mtimeMs);
    const before = written();
    const second = await serve();
    assert.deepEqual(second, first);
    assert.deepEqual(written(), before, 'the restarted workers loaded the images, not wrote them again');
    first.forEach((rows, i) => assert.ok(maxAbsDiff(rows, reference.logits[i]) <= 1e-4, `gRPC vs in process: ${maxAbsDiff(rows, reference.logits[i])}`));
  });

  test('only quantized stages on the CPU, and only when asked for', () => {
    assert.equal(packedImageUsed('int8', 'cpu', '1'), true);
    assert.equal(packedImageUsed('int4', 'cpu', '1'), true);
    assert.equal(packedImageUsed('float32', 'cpu', '1'), false);
    assert.equal(packedImageUsed('int8', 'webgpu', '1'), false);
    assert.equal(packedImageUsed('int8', 'cuda', '1'), false);
    assert.equal(packedImageUsed('int8', 'cpu', ''), false);
    assert.equal(packedImageUsed('int8', 'cpu', '0'), false);
  });
});
