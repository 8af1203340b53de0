import type { ModelSpec } from './config.ts';
import type { BlockRange } from './range.ts';

/**
 * Where each weight of a stage lives in a Hugging Face checkpoint, and the shape it must have.
 * Shapes are the checkpoint's own (torch Linear is [out, in]; GPT-2's Conv1D is [in, out]).
 */
export interface WeightRef {
  key: string;
  shape: number[];
}

export interface BlockWeights {
  ln1: [WeightRef, WeightRef];
  /** GPT-J has no second norm (parallel residual); DistilBERT's are post-LN (sa / output). */
  ln2: [WeightRef, WeightRef] | null;
  /** GPT-2: one fused c_attn [D, 3D] (Conv1D) + bias. Others: separate q/k/v Linear weights. */
  qkv: { fused: WeightRef; bias: WeightRef } | { q: WeightRef; k: WeightRef; v: WeightRef; qb?: WeightRef; kb?: WeightRef; vb?: WeightRef };
  out: WeightRef;
  outBias: WeightRef | null;
  fcIn: WeightRef;
  fcInBias: WeightRef;
  fcOut: WeightRef;
  fcOutBias: WeightRef;
  /** true when weights are Conv1D ([in, out]); false for torch Linear ([out, in]). */
  conv1d: boolean;
}

export interface StageWeights {
  embed: { tokens: WeightRef; positions: WeightRef | null; norm: [WeightRef, WeightRef] | null } | null;
  blocks: BlockWeights[];
  head: { norm: [WeightRef, WeightRef] | null; transform: { weight: WeightRef; bias: WeightRef; norm: [WeightRef, WeightRef] } | null; weight: WeightRef; bias: WeightRef | null } | null;
}

/** Checkpoint buffers that are not weights. Matched by exact (pattern) name, never by suffix. */
const LEGACY_BUFFERS = [
  /^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$/,
  /^(transformer\.)?h\.\d+\.attn\.attention\.(bias|masked_bias)$/,
  /^(transformer\.)?h\.\d+\.attn\.(rotary_emb\.)?(sin|cos|inv_freq|embed_positions)$/,
  /^(distilbert\.)?embeddings\.position_ids$/,
];
export const isLegacyBuffer = (key: string): boolean => LEGACY_BUFFERS.some((re) => re.test(key));

/** GPT checkpoints are saved with or without the `transformer.` prefix (GPT2LMHeadModel vs GPT2Model). */
export function keyPrefix(spec: ModelSpec, hasKey: (k: string) => boolean): string {
  if (spec.family === 'distilbert') return hasKey('distilbert.embeddings.word_embeddings.weight') ? 'distilbert.' : '';
  return hasKey('wte.weight') && !hasKey('transformer.wte.weight') ? '' : 'transformer.';
}

export function stageWeights(spec: ModelSpec, range: BlockRange, prefix: string): StageWeights {
  const { dModel: D, inner: I, vocab: V, maxPositions: P } = spec;
  const w = (key: string, ...shape: number[]): WeightRef => ({ key: prefix + key, shape });
  const raw = (key: string, ...shape: number[]): WeightRef => ({ key, shape });
  const norm = (base: string): [WeightRef, WeightRef] => [w(`${base}.weight`, D), w(`${base}.bias`, D)];
  const blocks: BlockWeights[] = [];

  for (let i = range.first; i < range.last; i++) {
    if (spec.family === 'gpt2') {
      const b = `h.${i}.`;
      blocks.push({
        ln1: norm(`${b}ln_1`), ln2: norm(`${b}ln_2`),
        qkv: { fused: w(`${b}attn.c_attn.weight`, D, 3 * D), bias: w(`${b}attn.c_attn.bias`, 3 * D) },
        out: w(`${b}attn.c_proj.weight`, D, D), outBias: w(`${b}attn.c_proj.bias`, D),
        fcIn: w(`${b}mlp.c_fc.weight`, D, I), fcInBias: w(`${b}mlp.c_fc.bias`, I),
        fcOut: w(`${b}mlp.c_proj.weight`, I, D), fcOutBias: w(`${b}mlp.c_proj.bias`, D), conv1d: true,
      });
    } else if (spec.family === 'gptj') {
      const b = `h.${i}.`;
      const fork = spec.keyLayout === 'neo-fork';
      const attn = fork ? `${b}attn.attention.` : `${b}attn.`;
      const [fcIn, fcOut] = fork ? ['c_fc', 'c_proj'] : ['fc_in', 'fc_out'];
      blocks.push({
        ln1: norm(`${b}ln_1`), ln2: null,
        qkv: { q: w(`${attn}q_proj.weight`, D, D), k: w(`${attn}k_proj.weight`, D, D), v: w(`${attn}v_proj.weight`, D, D) },
        out: w(`${attn}out_proj.weight`, D, D), outBias: null,
        fcIn: w(`${b}mlp.${fcIn}.weight`, I, D), fcInBias: w(`${b}mlp.${fcIn}.bias`, I),
        fcOut: w(`${b}mlp.${fcOut}.weight`, D, I), fcOutBias: w(`${b}mlp.${fcOut}.bias`, D), conv1d: false,
      });
    } else {
      const b = `transformer.layer.${i}.`;
      const lin = (name: string, o: number, n: number): [WeightRef, WeightRef] => [w(`${b}${name}.weight`, o, n), w(`${b}${name}.bias`, o)];
      const [q, qb] = lin('attention.q_lin', D, D), [k, kb] = lin('attention.k_lin', D, D), [v, vb] = lin('attention.v_lin', D, D);
      const [out, outBias] = lin('attention.out_lin', D, D), [fcIn, fcInBias] = lin('ffn.lin1', I, D), [fcOut, fcOutBias] = lin('ffn.lin2', D, I);
      blocks.push({ ln1: norm(`${b}sa_layer_norm`), ln2: norm(`${b}output_layer_norm`), qkv: { q, k, v, qb, kb, vb }, out, outBias, fcIn, fcInBias, fcOut, fcOutBias, conv1d: false });
    }
  }

  const tokens = spec.family === 'distilbert' ? w('embeddings.word_embeddings.weight', V, D) : w('wte.weight', V, D);
  const embed = range.first !== 0 ? null
    : spec.family === 'gpt2' ? { tokens, positions: w('wpe.weight', P, D), norm: null }
    : spec.family === 'gptj' ? { tokens, positions: null, norm: null }
    : { tokens, positions: w('embeddings.position_embeddings.weight', P, D), norm: norm('embeddings.LayerNorm') };

  let head: StageWeights['head'] = null;
  if (range.last === spec.blocks) {
    if (spec.family === 'distilbert') {
      // The MLM head lives outside the `distilbert.` prefix.
      head = {
        norm: null, transform: { weight: raw('vocab_transform.weight', D, D), bias: raw('vocab_transform.bias', D), norm: [raw('vocab_layer_norm.weight', D), raw('vocab_layer_norm.bias', D)] },
        weight: tokens, bias: raw('vocab_projector.bias', V),
      };
    } else {
      head = {
        norm: norm('ln_f'), transform: null,
        weight: spec.tiedHead ? tokens : raw('lm_head.weight', V, D), bias: spec.headBias ? raw('lm_head.bias', V) : null,
      };
    }
  }
  return { embed, blocks, head };
}

export function allRefs(sw: StageWeights): WeightRef[] {
  const refs: WeightRef[] = [];
  const add = (...r: (WeightRef | null | undefined)[]) => r.forEach((x) => x && refs.push(x));
  if (sw.embed) add(sw.embed.tokens, sw.embed.positions, ...(sw.embed.norm ?? []));
  for (const b of sw.blocks) {
    add(...b.ln1, ...(b.ln2 ?? []), b.out, b.outBias, b.fcIn, b.fcInBias, b.fcOut, b.fcOutBias);
    if ('fused' in b.qkv) add(b.qkv.fused, b.qkv.bias);
    else add(b.qkv.q, b.qkv.k, b.qkv.v, b.qkv.qb, b.qkv.kb, b.qkv.vb);
  }
  if (sw.head) {
    add(...(sw.head.norm ?? []), sw.head.weight, sw.head.bias);
    if (sw.head.transform) add(sw.head.transform.weight, sw.head.transform.bias, ...sw.head.transform.norm);
  }
  // A tied head reuses the embedding matrix: count it once.
  return refs.filter((r, i) => refs.findIndex((o) => o.key === r.key) === i);
}

/** Parameter count of a stage (tied weights counted once), for planning and shape checks. */
export const stageParamCount = (sw: StageWeights): number => allRefs(sw).reduce((n, r) => n + r.shape.reduce((a, b) => a * b, 1), 0);
