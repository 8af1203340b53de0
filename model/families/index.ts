import { StrataError } from '../errors.ts';
import type { EmbedWeights, ModelFamily, SyntheticShape } from './family.ts';
import { gpt2 } from './gpt2.ts';
import { gptj } from './gptj.ts';
import { distilbert } from './distilbert.ts';

export type { ModelFamily } from './family.ts';

const byName = new Map<string, ModelFamily>();
const byModelType = new Map<string, ModelFamily>();

/** Synthetic-checkpoint presets of every registered family (`strata bench --preset`), in registration order. */
export const PRESETS: Record<string, SyntheticShape> = {};

/**
 * Adds a family. Its name, `model_type`s and preset names must be new (else family_duplicate); from then on config.json files of those types load as it,
 * in this process (a family a worker process must compute is registered here, at import, like the built-ins).
 */
export function registerFamily<E extends EmbedWeights, B extends object, H extends object>(family: ModelFamily<E, B, H>): void {
  // The registry forgets the records' types: drivers only walk them for WeightRefs.
  const f: ModelFamily = family;
  if (byName.has(f.name)) throw new StrataError('family_duplicate', `a model family named "${f.name}" is already registered`);
  for (const { type } of f.modelTypes) {
    const owner = byModelType.get(type);
    if (owner) throw new StrataError('family_duplicate', `model_type "${type}" is already claimed by family "${owner.name}"`);
  }
  const presets = Object.entries(f.synthetic?.presets ?? {});
  const taken = presets.find(([name]) => PRESETS[name]);
  if (taken) throw new StrataError('family_duplicate', `synthetic preset "${taken[0]}" is already defined by family "${PRESETS[taken[0]].family}"`);
  byName.set(f.name, f);
  for (const { type } of f.modelTypes) byModelType.set(type, f);
  for (const [name, shape] of presets) PRESETS[name] = shape;
}

/** The family that claims a config.json `model_type`, if any. */
export const familyFor = (modelType: string): ModelFamily | undefined => byModelType.get(modelType);

/** The family of a spec (`spec.family`), or a typed error when the process never registered it. */
export function familyNamed(name: string): ModelFamily {
  const f = byName.get(name);
  if (!f) throw new StrataError('family_unknown', `model family "${name}" is not registered here; known: ${[...byName.keys()].join(', ')}`);
  return f;
}

export const families = (): ModelFamily[] => [...byName.values()];

/** Every `model_type` strata loads, with notes (`gpt_neo (with "rotary": true)`), for error messages. */
export const knownModelTypes = (): string[] =>
  families().flatMap((f) => f.modelTypes.map(({ type, note }) => (note ? `${type} (${note})` : type)));

registerFamily(gpt2);
registerFamily(gptj);
registerFamily(distilbert);
