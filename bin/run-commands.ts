import { parseDevice } from '../model/executor.ts';
import { type Command } from 'commander';
import { fileURLToPath } from 'node:url';
import { loadModelSpec, type ModelSpec } from '../model/config.ts';
import { Checkpoint } from '../model/safetensors.ts';
import { isStrataError, StrataError } from '../model/errors.ts';
import { evenSplit } from '../model/range.ts';
import { LocalPipeline } from '../model/local-pipeline.ts';
import { fillMask, forwardLogits, generate, type Stepper } from '../model/generation.ts';
import { loadTokenizer, type StrataTokenizer } from '../model/tokenizer.ts';
import type { WeightDType } from '../model/stage-graph.ts';
import { parseStageDType } from '../model/dtype.ts';
import { RemotePipeline } from '../coordinator/remote-pipeline.ts';
import { startLocalCluster } from './local-cluster.ts';

/**
 * The model `npm start` and the commands use when --model is not given: models/demo, a tiny GPT-2 in HF layout with
 * random weights and GPT-2's real tokenizer and vocabulary (so text in and text out work).
 */
export const BUILTIN_MODEL = fileURLToPath(new URL('../models/demo', import.meta.url));

interface CommonOptions {
  model: string;
  stages: string;
  inProcess?: boolean;
  ids?: string;
  text?: string;
  dtype: WeightDType;
  device?: string;
  json?: boolean;
}

interface StageReport {
  blocks: [number, number];
  pid: number;
  address: string;
}

const addCommon = (cmd: Command) =>
  cmd
    .option('--model <dir>', 'Hugging Face model directory', BUILTIN_MODEL)
    .option('--stages <k>', 'number of pipeline stages (1..blocks); each is a worker process unless --in-process', '1')
    .option('--in-process', 'run the K stage graphs in this process without gRPC (the reference path)')
    .option('--ids <ids>', 'input token ids, comma-separated')
    .option('--text <text>', 'input text (needs a tokenizer in the model directory)')
    .option('--dtype <dtype>', 'weight dtype of the stage graphs: float32 | float16 | int8 | int4 (int8/int4: weight-only block-quantized, float32 activations)', 'float32')
    .option('--device <device>', 'where the stages run: cpu | cuda:N | webgpu (ORT\'s WebGPU EP: KV stays in GPU memory); a device that cannot start is an error, never a silent fallback', process.env.STRATA_DEVICE ?? 'cpu')
    .option('--json', 'print one JSON object on stdout');

/** Runs `fn` against K stages: in this process, or K real worker processes on loopback over gRPC. */
async function withPipeline<T>(o: CommonOptions, fn: (p: Stepper, spec: ModelSpec, tok: StrataTokenizer | null) => Promise<T>): Promise<T & { stages: StageReport[] }> {
  parseDevice(o.device); // a bad --device is a typed error before any worker starts
  const spec = loadModelSpec(o.model);
  const k = Number(o.stages);
  const ranges = evenSplit(spec.blocks, k);
  const tokenizer = await loadTokenizer(o.model, spec);
  if (o.inProcess) {
    const p = await LocalPipeline.load(o.model, ranges, { dtype: parseStageDType(o.dtype), device: o.device, onProgress: (m) => !o.json && console.error(m) });
    try {
      const out = await fn(p, spec, tokenizer);
      return { ...out, stages: ranges.map((r) => ({ blocks: [r.first, r.last] as [number, number], pid: process.pid, address: 'in-process' })) };
    } finally {
      await p.close();
    }
  }
  const ck = Checkpoint.open(o.model);
  const fingerprint = ck.fingerprint();
  ck.close();
  const cluster = await startLocalCluster(o.model, k, ['--device', o.device ?? 'cpu']);
  try {
    const p = await RemotePipeline.connect(cluster.workers.map((w) => w.address), { spec, fingerprint, dtype: parseStageDType(o.dtype), ranges });
    try {
      const out = await fn(p, spec, tokenizer);
      return { ...out, stages: p.describe().stages.map((s) => ({ blocks: s.blocks, pid: s.pid!, address: s.address })) };
    } finally {
      p.close();
    }
  } finally {
    await cluster.stop();
  }
}

function inputIds(o: CommonOptions, tok: StrataTokenizer | null): number[] {
  if (o.ids !== undefined) {
    const ids = o.ids.split(',').map((s) => Number(s.trim()));
    if (ids.some((v) => !Number.isInteger(v))) throw new StrataError('ids_invalid', `--ids must be comma-separated integers, got "${o.ids}"`);
    return ids;
  }
  if (o.text !== undefined) {
    if (!tok) throw new StrataError('tokenizer_missing', `${o.model} ships no tokenizer (tokenizer.json, vocab.json + merges.txt, or vocab.txt); pass --ids instead of --text`);
    return tok.encode(o.text);
  }
  throw new StrataError('input_missing', 'give the input as --ids 1,2,3 or --text "..."');
}

function print(o: { json?: boolean }, result: object, human: () => string): void {
  process.stdout.write(o.json ? JSON.stringify(result) + '\n' : human() + '\n');
}

const run = (fn: (o: any) => Promise<void>) => async (o: any) => {
  try {
    await fn(o);
  } catch (e) {
    console.error(`strata: ${isStrataError(e) ? `${e.message} [${e.code}]` : (e as Error).stack}`);
    process.exitCode = 2;
  }
};

const stagesLine = (stages: StageReport[]) => stages.map((s) => `[${s.blocks[0]}, ${s.blocks[1]}) pid ${s.pid} ${s.address}`).join('\n  ');

export function registerRunCommands(program: Command): void {
  addCommon(program.command('forward').description('logits for every position of the input'))
    .action(run(async (o) => {
      const result = await withPipeline(o, async (p, _spec, tok) => ({ logits: await forwardLogits(p, inputIds(o, tok)) }));
      print(o, result, () => `logits: ${result.logits.length} positions × ${result.logits[0]?.length} vocab\nstages:\n  ${stagesLine(result.stages)}`);
    }));

  addCommon(program.command('generate').description('continue the input token by token (greedy unless --temperature)'))
    .option('--max-new-tokens <n>', 'tokens to generate', '16')
    .option('--temperature <t>', 'sampling temperature (0 or absent = greedy)')
    .option('--top-k <k>', 'keep the k most likely tokens')
    .option('--top-p <p>', 'nucleus sampling mass')
    .option('--repetition-penalty <r>', 'penalise tokens already present')
    .option('--seed <s>', 'sampling seed (same seed, same tokens)')
    .option('--ignore-eos', 'keep generating past the end-of-sequence token')
    .action(run(async (o) => {
      const num = (v?: string) => (v === undefined ? undefined : Number(v));
      const result = await withPipeline(o, async (p, spec, tok) => {
        const { outputIds } = await generate(p, inputIds(o, tok), {
          maxNewTokens: Number(o.maxNewTokens), maxPositions: spec.maxPositions, eosTokenId: o.ignoreEos ? null : (tok?.eosTokenId ?? spec.eosTokenId),
          sampling: { temperature: num(o.temperature), topK: num(o.topK), topP: num(o.topP), repetitionPenalty: num(o.repetitionPenalty), seed: num(o.seed) },
        });
        return { output_ids: outputIds, ...(tok ? { text: tok.decode(outputIds) } : {}) };
      });
      print(o, result, () => `${result.text ?? result.output_ids.join(' ')}\nstages:\n  ${stagesLine(result.stages)}`);
    }));

  addCommon(program.command('fill-mask').description('top-k candidates for the masked token (masked models)'))
    .option('--mask-index <i>', 'position of the masked token in --ids')
    .option('--top-k <k>', 'candidates to return', '5')
    .action(run(async (o) => {
      const result = await withPipeline(o, async (p, spec, tok) => {
        if (spec.causal) throw new StrataError('task_unsupported', `fill-mask needs a masked language model (distilbert); ${o.model} is ${spec.modelType}`, 'invalid_argument');
        const ids = inputIds(o, tok);
        let maskIndex = o.maskIndex !== undefined ? Number(o.maskIndex) : -1;
        if (maskIndex < 0 && tok?.maskToken) maskIndex = ids.indexOf(tok.maskToken.id);
        if (maskIndex < 0) throw new StrataError('mask_missing', 'no mask position: pass --mask-index with --ids, or put [MASK] in --text');
        const top = await fillMask(p, ids, maskIndex, Number(o.topK));
        return { top_k: top.map((c) => ({ ...c, ...(tok ? { token: tok.idToToken(c.id) } : {}) })) };
      });
      print(o, result, () => `${result.top_k.map((c) => `${c.token ?? c.id}\t${c.score.toFixed(4)}`).join('\n')}\nstages:\n  ${stagesLine(result.stages)}`);
    }));
}
