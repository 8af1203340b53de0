import type { ModelSpec } from './config.ts';
import type { BlockRange } from './range.ts';
import { families, familyNamed } from './families/index.ts';
import type { EmbedWeights, StageWeights, WeightRef } from './families/family.ts';

/**
 * Where each weight of a stage lives in a Hugging Face checkpoint, and the shape it must have: the spec's family
 * (model/families) names them; this file only walks what it returns.
 */
export type { EmbedWeights, NormRefs, StageWeights, WeightRef } from './families/family.ts';

/** Checkpoint buffers that are not weights, in any registered family. Matched by exact (pattern) name, never by suffix. */
export const isLegacyBuffer = (key: string): boolean => families().some((f) => f.legacyBuffers.some((re) => re.test(key)));

/** The checkpoint's key prefix (`transformer.`, `distilbert.`, ''), asking which keys exist. */
export const keyPrefix = (spec: ModelSpec, hasKey: (k: string) => boolean): string => familyNamed(spec.family).keyPrefix(hasKey);

/** Weight references of blocks `[first, last)` (+ embeddings on the first stage, final norm + head on the last). */
export const stageWeights = (spec: ModelSpec, range: BlockRange, prefix: string): StageWeights => familyNamed(spec.family).weights(spec, range, prefix);

const isRef = (x: object): x is WeightRef => typeof (x as WeightRef).key === 'string' && Array.isArray((x as WeightRef).shape);

/** Every WeightRef inside a family's weight record, in field order (duplicates kept). */
export function refsIn(x: unknown): WeightRef[] {
  if (x === null || typeof x !== 'object') return [];
  if (isRef(x)) return [x];
  return (Array.isArray(x) ? x : Object.values(x)).flatMap(refsIn);
}

/** A stage's weights, each once: embeddings, blocks, head (a tied head reuses the embedding matrix). */
export function allRefs(sw: StageWeights): WeightRef[] {
  const refs = [...refsIn(sw.embed), ...refsIn(sw.blocks), ...refsIn(sw.head)];
  return refs.filter((r, i) => refs.findIndex((o) => o.key === r.key) === i);
}

const size = (r: WeightRef): number => r.shape.reduce((a, b) => a * b, 1);

/** Parameter count of a stage (tied weights counted once), for planning and shape checks. */
export const stageParamCount = (sw: StageWeights): number => allRefs(sw).reduce((n, r) => n + size(r), 0);

/** Elements of the token and position tables one token reads: a row of each. */
export const embedRowParams = (e: EmbedWeights): number => e.tokens.shape[1] + (e.positions ? e.positions.shape[1] : 0);

/** Elements an embedding stage reads per token: a row of each table, and the rest of its embedding weights whole. */
export function embedReadParams(e: EmbedWeights): number {
  const tables = new Set([e.tokens.key, e.positions?.key]);
  return embedRowParams(e) + refsIn(e).filter((r) => !tables.has(r.key)).reduce((n, r) => n + size(r), 0);
}
