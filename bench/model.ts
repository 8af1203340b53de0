import { existsSync, mkdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { ModelSpec } from '../model/config.ts';
import { allRefs, embedRowParams, refsIn, stageWeights, type WeightRef } from '../model/layout.ts';
import type { BlockRange } from '../model/range.ts';
import { defaultCacheDir } from '../model/stage-cache.ts';
import { PRESETS, syntheticSupport, writeSyntheticModel, type SyntheticShape } from '../model/synthetic.ts';
import { StrataError } from '../model/errors.ts';

export interface ShapeFlags {
  preset?: string;
  blocks?: number;
  dModel?: number;
  heads?: number;
  vocab?: number;
}

/** A preset, with any dimension flag overriding it. */
export function resolveShape(flags: ShapeFlags): SyntheticShape {
  const name = flags.preset ?? 'gpt2-small';
  const base = PRESETS[name];
  if (!base) throw new StrataError('bench_preset_unknown', `unknown preset "${name}"; choose one of ${Object.keys(PRESETS).join(', ')}`);
  const shape: SyntheticShape = { ...base };
  if (flags.blocks !== undefined) shape.blocks = flags.blocks;
  if (flags.dModel !== undefined) shape.dModel = flags.dModel;
  if (flags.heads !== undefined) shape.heads = flags.heads;
  if (flags.vocab !== undefined) shape.vocab = flags.vocab;
  for (const [k, v] of Object.entries({ blocks: shape.blocks, dModel: shape.dModel, heads: shape.heads, vocab: shape.vocab })) {
    if (!Number.isInteger(v) || v < 1) throw new StrataError('bench_shape_invalid', `--${k === 'dModel' ? 'd-model' : k} must be a positive integer, got ${v}`);
  }
  if (shape.dModel % shape.heads !== 0) throw new StrataError('bench_shape_invalid', `--d-model ${shape.dModel} is not a multiple of --heads ${shape.heads}`);
  syntheticSupport(shape.family).fit?.(shape);
  return shape;
}

export const shapeKey = (s: SyntheticShape): string =>
  `${s.family}-b${s.blocks}-d${s.dModel}-h${s.heads}-v${s.vocab}-p${s.maxPositions ?? 1024}-i${s.inner ?? 4 * s.dModel}${syntheticSupport(s.family).keySuffix?.(s) ?? ''}-s${s.seed ?? 1234}`;

/**
 * The synthetic checkpoint for `shape`, written once under `<cache>/synthetic/<shape key>` (atomically: a partial
 * write never looks complete) and reused by every later bench run.
 */
export function ensureSyntheticModel(shape: SyntheticShape, opts: { cacheDir?: string; onProgress?: (done: number, total: number) => void } = {}): { dir: string; built: boolean } {
  const root = join(opts.cacheDir ?? defaultCacheDir(), 'synthetic');
  const dir = join(root, shapeKey(shape));
  if (existsSync(join(dir, '.complete'))) return { dir, built: false };
  mkdirSync(root, { recursive: true });
  const tmp = `${dir}.tmp-${process.pid}-${Date.now()}`;
  try {
    writeSyntheticModel(tmp, shape, opts.onProgress);
    writeFileSync(join(tmp, '.complete'), JSON.stringify({ shape, writtenAt: new Date().toISOString() }));
    rmSync(dir, { recursive: true, force: true });
    renameSync(tmp, dir);
  } catch (e) {
    rmSync(tmp, { recursive: true, force: true });
    throw e;
  }
  return { dir, built: true };
}

const bytesOf = (r: WeightRef | null | undefined): number => (r ? r.shape.reduce((a, b) => a * b, 4) : 0);

export interface WeightBytes {
  /** Every float32 weight a stage holds (tied matrices once). */
  held: number;
  /** Bytes one batch-1 decode step must read: all block weights, the head's norm and matrix; embeddings by row. */
  readPerStep: number;
  blocks: number;
  head: number;
}

/** Float32 weight bytes of a block range: what it holds, and what one decode step reads (the weight-read floor). */
export function weightBytes(spec: ModelSpec, range: BlockRange = { first: 0, last: spec.blocks }): WeightBytes {
  const sw = stageWeights(spec, range, '');
  const held = allRefs(sw).reduce((n, r) => n + bytesOf(r), 0);
  const blocks = refsIn(sw.blocks).reduce((n, r) => n + bytesOf(r), 0);
  const head = refsIn(sw.head).reduce((n, r) => n + bytesOf(r), 0);
  // A decode step gathers one row of each embedding table.
  const embedRows = sw.embed ? embedRowParams(sw.embed) * 4 : 0;
  return { held, readPerStep: blocks + head + embedRows, blocks, head };
}
