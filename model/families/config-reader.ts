import { StrataError } from '../errors.ts';
import type { Activation } from '../config.ts';

export type RawConfig = Record<string, unknown>;

/** What a family's `normalize` reads a config.json through: typed fields, errors that name the fix. */
export interface ConfigReader {
  readonly raw: RawConfig;
  readonly modelType: string;
  /** The first of `names` present; missing → config_missing_field naming them and `what`. */
  need<T>(names: string[], what: string): T;
  /** `name`, or `fallback` when absent or null. */
  opt<T>(name: string, fallback: T): T;
  /** An HF activation name → the graph's activation. */
  activation(name: string): Activation;
  /** d / heads, or config_bad_heads. */
  headDim(d: number, heads: number): number;
  /** Refuses this config as an unsupported model type (the error lists every registered type); `hint` says why. */
  unsupported(hint: string): never;
}

export function configReader(raw: RawConfig, modelType: string, unsupported: (hint: string) => never): ConfigReader {
  return {
    raw, modelType, unsupported,
    need<T>(names: string[], what: string): T {
      for (const n of names) if (raw[n] !== undefined && raw[n] !== null) return raw[n] as T;
      throw new StrataError('config_missing_field', `config.json (${modelType}) has no ${names.join(' / ')} (${what}); the config is incomplete or not a Hugging Face config`);
    },
    opt: <T>(name: string, fallback: T): T => (raw[name] === undefined || raw[name] === null ? fallback : (raw[name] as T)),
    activation(name: string): Activation {
      if (name === 'gelu_new' || name === 'gelu_pytorch_tanh') return 'gelu_tanh';
      if (name === 'gelu') return 'gelu_erf';
      if (name === 'relu') return 'relu';
      throw new StrataError('config_unsupported_activation', `activation "${name}" is not supported; supported: gelu_new, gelu_pytorch_tanh, gelu, relu`);
    },
    headDim(d: number, heads: number): number {
      if (d % heads !== 0) throw new StrataError('config_bad_heads', `hidden size ${d} is not divisible by ${heads} heads`);
      return d / heads;
    },
  };
}
