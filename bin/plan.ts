import { readFileSync } from 'node:fs';
import type { Command } from 'commander';
import { loadModelSpec, normalizeConfig, type ModelSpec } from '../model/config.ts';
import { StrataError, isStrataError } from '../model/errors.ts';
import { formatPlan, planPartition, type PlanDtype, type WorkerCapacity } from '../coordinator/planner.ts';
import { WEIGHT_DTYPES } from '../model/dtype.ts';

const UNITS: Record<string, number> = { b: 1, kb: 1e3, mb: 1e6, gb: 1e9, tb: 1e12, kib: 2 ** 10, mib: 2 ** 20, gib: 2 ** 30, tib: 2 ** 40 };

/** `16GB`, `15.5GiB`, `800MB` → bytes. A unit is required: a bare `16` is ambiguous. */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)\s*$/i.exec(text);
  if (!m) throw new StrataError('plan_bad_size', `${what} "${text}" is not a size; write e.g. 16GB, 15.5GiB or 800MB`);
  return Math.round(Number(m[1]) * UNITS[m[2].toLowerCase()]);
}

/**
 * `--workers`: a count (`4` = four equal workers, memory unlimited) or a comma list in pipeline
 * order of `[id=]memory[:speed]`, e.g. `16GB,16GB,24GB:1.5` or `a100=80GB:2,t4=16GB`.
 */
export function parseWorkers(spec: string): WorkerCapacity[] {
  const s = spec.trim();
  if (/^\d+$/.test(s)) {
    const n = Number(s);
    if (n < 1) throw new StrataError('plan_bad_workers', '--workers count must be at least 1');
    return Array.from({ length: n }, (_, i) => ({ id: `w${i}`, memoryBytes: Infinity, speed: 1 }));
  }
  return s.split(',').map((entry, i) => {
    const m = /^\s*(?:([\w.-]+)=)?([^:]+?)(?::([^:]+))?\s*$/.exec(entry);
    if (!m) throw new StrataError('plan_bad_workers', `--workers entry "${entry}" is not [id=]memory[:speed] (e.g. 16GB or gpu1=24GB:1.5)`);
    const speed = m[3] === undefined ? 1 : Number(m[3]);
    if (!(speed > 0) || !Number.isFinite(speed)) throw new StrataError('plan_bad_workers', `--workers entry "${entry}": speed must be a number > 0`);
    return { id: m[1] ?? `w${i}`, memoryBytes: parseSize(m[2], `--workers entry "${entry}": memory`), speed };
  });
}

function readSpec(opts: { model?: string; config?: string }): ModelSpec {
  if (!!opts.model === !!opts.config) throw new StrataError('plan_bad_args', 'give exactly one of --model DIR or --config FILE');
  if (opts.model) return loadModelSpec(opts.model);
  let raw: Record<string, unknown>;
  try {
    raw = JSON.parse(readFileSync(opts.config!, 'utf8'));
  } catch (e) {
    throw new StrataError('config_unreadable', `cannot read --config ${opts.config}: ${(e as Error).message}`);
  }
  return normalizeConfig(raw);
}

interface PlanCliOptions { model?: string; config?: string; workers?: string; dtype: string; kvReserve?: string; maxStages?: string; json?: boolean }

function runPlan(opts: PlanCliOptions): void {
  const spec = readSpec(opts);
  if (!opts.workers) throw new StrataError('plan_bad_args', '--workers is required: a count (4) or a list of memory[:speed] (16GB,16GB,24GB:1.5)');
  if (!(WEIGHT_DTYPES as readonly string[]).includes(opts.dtype)) throw new StrataError('plan_bad_dtype', `--dtype must be one of ${WEIGHT_DTYPES.join(', ')} (got ${opts.dtype})`);
  const maxStages = opts.maxStages === undefined ? undefined : Number(opts.maxStages);
  const plan = planPartition(spec, parseWorkers(opts.workers), {
    dtype: opts.dtype as PlanDtype,
    kvReserveBytes: opts.kvReserve === undefined ? 0 : parseSize(opts.kvReserve, '--kv-reserve'),
    maxStages,
  });
  process.stdout.write((opts.json ? JSON.stringify(plan) : formatPlan(plan)) + '\n');
}

export function registerPlanCommand(program: Command): void {
  program
    .command('plan')
    .description('print the partition plan: which worker runs which contiguous block range, minimising the slowest stage within each worker\'s memory')
    .option('--model <dir>', 'Hugging Face model directory (only its config.json is read)')
    .option('--config <file>', 'a config.json alone, instead of --model (no weights needed)')
    .option('--workers <spec>', 'a count (4 = four equal workers, unlimited memory) or a comma list, in pipeline order, of [id=]memory[:speed], e.g. 16GB,16GB,24GB:1.5 (units B, kB, MB, GB, TB, KiB, MiB, GiB, TiB; speed is relative, default 1)')
    .option('--dtype <dtype>', 'weight dtype: float32, float16, int8 or int4 (weight-only quantized, 1.125 / 0.625 bytes per weight)', 'float32')
    .option('--kv-reserve <size>', 'memory each stage keeps free for activations / KV cache, e.g. 2GB (default 0)')
    .option('--max-stages <n>', 'use at most this many stages (default: one per worker)')
    .option('--json', 'print the plan as one JSON object')
    .addHelpText('after', `
Cost model: decoding reads every weight once per token, so a stage's time is its weight
bytes / worker speed. Stage 0 holds the embeddings (memory, but only a row gather per
token); the last stage holds the LM head (read in full each token), so it gets fewer blocks.

Examples:
  strata plan --model ./BioMedLM --workers 4
  strata plan --config gpt-j-6b/config.json --workers 16GB,16GB --dtype float16
  strata plan --config config.json --workers gpu0=24GB:1.5,gpu1=16GB --kv-reserve 2GB --json

Exit status 2 when the plan is impossible (error code plan_does_not_fit) or the input is bad.`)
    .action((opts: PlanCliOptions) => {
      try {
        runPlan(opts);
      } catch (e) {
        if (!isStrataError(e)) throw e;
        process.stderr.write(`strata plan: ${e.message} [${e.code}]\n`);
        process.exitCode = 2;
      }
    });
}
