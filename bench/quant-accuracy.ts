import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { runLlamaBench } from './llama.ts';
import { forwardLogits, generate } from '../model/generation.ts';
import type { StageDType } from '../model/dtype.ts';

/**
 * The accuracy anchor for quantized stage graphs: on identical weights (../shared/anchors builds one random
 * GPT-2-small checkpoint as HF safetensors and as GGUF f32/q8_0/q4_0), strata's int8 must stay at least as close to
 * strata's fp32 as llama.cpp's q8_0 stays to llama.cpp's f32 (int4 against q4_0). Two measures:
 * - teacher-forced top-1 agreement over 32-token continuations (of PROMPTS prompts): each continuation is the fp32 greedy one; each
 *   engine's quantized model is fed it token by token and its top-1 pick at every step is compared with fp32's
 *   (which is the fed token itself: fp32 generated it). llama.cpp: `llama_bench.mjs --force`.
 * - first-token log-prob error: |log p_q(t) − log p_fp32(t)| at the first generated position, for t = fp32's top-1
 *   token, and the largest such error over fp32's top-10 tokens. llama.cpp: `llama_bench.mjs --probe 10`.
 * llama.cpp runs with a float32 KV cache and flash attention off, the configuration where its f32 output equals
 * strata's fp32 token for token; both engines quantize the tied token table/LM head (llama.cpp's q8_0 and the
 * anchors' "pure" q4_0 do too).
 */

export const ANCHOR_PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 981, 262, 1468, 18739, 16860, 422, 465];
export const CONTINUATION = 32;
/**
 * One 32-token continuation decides top-1 agreement by one or two near-ties (random weights give flat logits), so the
 * verdict sums over several: the anchor prompt and PROMPTS − 1 more of 16 ids each from a fixed seed. At 8 prompts
 * (256 steps) int8 and q8_0 traded places between two hosts (244 vs 238, then 244 vs 246): one standard error of
 * the difference was ~4 steps. 32 prompts (1024 steps) halve the relative noise; the verdict line prints it.
 */
export const PROMPTS = 32;

export function accuracyPrompts(n = PROMPTS): number[][] {
  let seed = 20261202;
  const next = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) % 50000) + 1;
  return [ANCHOR_PROMPT, ...Array.from({ length: n - 1 }, () => Array.from({ length: ANCHOR_PROMPT.length }, next))];
}

export interface AccuracyRow {
  engine: 'strata' | 'llama.cpp';
  weights: string;
  /** Steps (of steps) whose top-1 equals the fp32 model's, over every prompt's continuation. */
  top1Agree: number;
  steps: number;
  /** Per prompt: steps of its 32 that agree. */
  perPrompt: number[];
  /** |Δ log p| of fp32's first greedy token, mean over the prompts, and the max over fp32's top-10 (max over prompts). */
  firstLogprobErr: number;
  firstTop10MaxErr: number;
}

export interface AccuracyReport {
  model: string;
  prompts: number[][];
  continuations: number[][];
  /** strata fp32 and llama.cpp f32 on the same weights: same greedy continuation, prompt by prompt? */
  f32Match: boolean[];
  rows: AccuracyRow[];
  /** int8 vs q8_0 and int4 vs q4_0 over all prompts: does strata hold the line (agreement ≥, log-prob error ≤)? */
  verdicts: { strata: string; llama: string; top1: [number, number]; logprobErr: [number, number]; atLeastAsClose: boolean }[];
}

const logSoftmax = (r: number[]): number[] => {
  const m = Math.max(...r);
  const l = Math.log(r.reduce((s, x) => s + Math.exp(x - m), 0)) + m;
  return r.map((x) => x - l);
};
const argmax = (r: number[]): number => r.indexOf(Math.max(...r));
const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;

interface LlamaProbe { top: { token: number; logprob: number }[]; tokens: number[] }
interface LlamaForce { steps_agreeing: number; steps: number; picks: number[] }

const llama = <T>(anchors: string, gguf: string, args: string[]): T => runLlamaBench<T>(anchors, gguf, ['2', '1', '--kv', 'f32', '--fa', 'off', ...args]);

/** strata's rows: fp32 reference logits per prompt, then each quantized dtype teacher-forced over the same tokens. */
async function strataRows(modelDir: string, prompts: number[][], dtypes: StageDType[], threads: number, log: (m: string) => void): Promise<{ continuations: number[][]; rows: AccuracyRow[] }> {
  const P = ANCHOR_PROMPT.length;
  const positions = (rows: number[][]) => rows.slice(P - 1, P - 1 + CONTINUATION);
  const ref = await LocalPipeline.load(modelDir, 1, { dtype: 'float32', threads, onProgress: log });
  const continuations: number[][] = [], refRows: number[][][] = [];
  try {
    for (const prompt of prompts) {
      const continuation = (await generate(ref, prompt, { maxNewTokens: CONTINUATION, eosTokenId: null })).outputIds.slice(-CONTINUATION);
      continuations.push(continuation);
      refRows.push(positions(await forwardLogits(ref, [...prompt, ...continuation.slice(0, -1)])));
    }
  } finally {
    await ref.close();
  }
  const rows: AccuracyRow[] = [];
  for (const dtype of dtypes) {
    const p = await LocalPipeline.load(modelDir, 1, { dtype, threads, onProgress: log });
    try {
      const perPrompt: number[] = [], first: number[] = [], top10: number[] = [];
      for (const [i, prompt] of prompts.entries()) {
        const got = positions(await forwardLogits(p, [...prompt, ...continuations[i].slice(0, -1)]));
        const lp = logSoftmax(got[0]);
        const refTop10 = logSoftmax(refRows[i][0]).map((l, t) => [l, t]).sort((a, b) => b[0] - a[0]).slice(0, 10);
        perPrompt.push(got.filter((r, s) => argmax(r) === argmax(refRows[i][s])).length);
        first.push(Math.abs(lp[refTop10[0][1]] - refTop10[0][0]));
        top10.push(Math.max(...refTop10.map(([l, t]) => Math.abs(lp[t] - l))));
      }
      rows.push({ engine: 'strata', weights: dtype, steps: CONTINUATION * prompts.length, top1Agree: perPrompt.reduce((a, b) => a + b, 0), perPrompt, firstLogprobErr: mean(first), firstTop10MaxErr: Math.max(...top10) });
    } finally {
      await p.close();
    }
  }
  return { continuations, rows };
}

function llamaRows(anchors: string, prompts: number[][], continuations: number[][]): { f32Match: boolean[]; rows: AccuracyRow[] } {
  const refs = prompts.map((prompt) => llama<LlamaProbe>(anchors, 'gpt2-small-f32.gguf', ['--probe', '10', '--ids', prompt.join(',')]));
  const rows: AccuracyRow[] = [];
  for (const weights of ['q8_0', 'q4_0']) {
    const perPrompt: number[] = [], first: number[] = [], top10: number[] = [];
    let steps = 0;
    for (const [i, prompt] of prompts.entries()) {
      const ids = ['--ids', prompt.join(',')];
      const probe = llama<LlamaProbe>(anchors, `gpt2-small-${weights}.gguf`, ['--probe', '10', ...ids]);
      const forced = llama<LlamaForce>(anchors, `gpt2-small-${weights}.gguf`, ['--force', continuations[i].join(','), ...ids]);
      // --probe lists the quantized model's own top-10: fp32's tokens missing from it are not counted.
      const errs = refs[i].top.flatMap((r) => probe.top.filter((q) => q.token === r.token).map((q) => Math.abs(q.logprob - r.logprob)));
      const hit = probe.top.find((q) => q.token === refs[i].top[0].token);
      perPrompt.push(forced.steps_agreeing);
      steps += forced.steps;
      // fp32's token outside the quantized top-10: its log-prob is at most the 10th's, so the error is at least this.
      first.push(hit ? Math.abs(hit.logprob - refs[i].top[0].logprob) : Math.max(0, refs[i].top[0].logprob - probe.top[probe.top.length - 1].logprob));
      top10.push(Math.max(...errs));
    }
    rows.push({ engine: 'llama.cpp', weights, steps, top1Agree: perPrompt.reduce((a, b) => a + b, 0), perPrompt, firstLogprobErr: mean(first), firstTop10MaxErr: Math.max(...top10) });
  }
  return { f32Match: refs.map((r, i) => r.tokens.join() === continuations[i].join()), rows };
}

export async function runQuantAccuracy(o: { model: string; anchors?: string; threads?: number; prompts?: number; log?: (m: string) => void }): Promise<AccuracyReport> {
  const log = o.log ?? (() => {});
  const prompts = accuracyPrompts(o.prompts);
  const { continuations, rows } = await strataRows(o.model, prompts, ['int8', 'int4'], o.threads ?? 2, log);
  const haveAnchors = !!o.anchors && existsSync(join(o.anchors, 'gpt2-small-q8_0.gguf'));
  const llamaSide = haveAnchors ? llamaRows(o.anchors!, prompts, continuations) : { f32Match: [], rows: [] };
  const pairs: [string, string][] = [['int8', 'q8_0'], ['int4', 'q4_0']];
  const verdicts = pairs.flatMap(([s, l]) => {
    const a = rows.find((r) => r.weights === s), b = llamaSide.rows.find((r) => r.weights === l);
    if (!a || !b) return [];
    return [{ strata: s, llama: l, top1: [a.top1Agree, b.top1Agree] as [number, number], logprobErr: [a.firstLogprobErr, b.firstLogprobErr] as [number, number], atLeastAsClose: a.top1Agree >= b.top1Agree && a.firstLogprobErr <= b.firstLogprobErr }];
  });
  return { model: o.model, prompts, continuations, f32Match: llamaSide.f32Match, rows: [...rows, ...llamaSide.rows], verdicts };
}

/** One standard error of the difference of two top-1 agreement counts (binomial, the two taken as independent). */
function agreementNoise(r: AccuracyReport, v: AccuracyReport['verdicts'][number]): number {
  const variance = (weights: string) => {
    const row = r.rows.find((x) => x.weights === weights)!;
    const p = row.top1Agree / row.steps;
    return row.steps * p * (1 - p);
  };
  return Math.sqrt(variance(v.strata) + variance(v.llama));
}

export function renderAccuracy(r: AccuracyReport): string {
  const same = r.f32Match.filter(Boolean).length;
  const lines = [
    `accuracy vs fp32 on identical weights (${r.model}); ${r.prompts.length} prompts × ${CONTINUATION}-token teacher-forced continuations; llama.cpp f32 greedy equals strata fp32 on ${same}/${r.f32Match.length} prompts`,
    'engine     weights  top-1 agree  per prompt (of 32)                 mean first-token |Δlogp|  max over fp32 top-10',
    ...r.rows.map((x) => `${x.engine.padEnd(10)} ${x.weights.padEnd(8)} ${`${x.top1Agree}/${x.steps}`.padStart(11)}  ${x.perPrompt.join(' ').padEnd(33)}  ${x.firstLogprobErr.toExponential(2).padStart(24)}  ${x.firstTop10MaxErr.toExponential(2).padStart(20)}`),
    ...r.verdicts.map((v) => `${v.strata} vs ${v.llama}: top-1 ${v.top1[0]} vs ${v.top1[1]} (difference ${v.top1[0] - v.top1[1]}, one standard error ${agreementNoise(r, v).toFixed(1)}), |Δlogp| ${v.logprobErr[0].toExponential(2)} vs ${v.logprobErr[1].toExponential(2)}: ${v.atLeastAsClose ? 'at least as close' : 'NOT as close'}`),
  ];
  return lines.join('\n');
}

// node --import tsx bench/quant-accuracy.ts [model dir] [anchors dir]
if (process.argv[1]?.endsWith('quant-accuracy.ts')) {
  const model = process.argv[2] ?? '/tmp/anchors/gpt2-small-hf';
  const anchors = process.argv[3] ?? '/tmp/anchors';
  const r = await runQuantAccuracy({ model, anchors, log: (m) => console.error(m) });
  console.log(renderAccuracy(r));
  console.log(JSON.stringify(r));
}
