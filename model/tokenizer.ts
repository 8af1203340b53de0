import { readFile, access } from 'node:fs/promises';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { StrataError } from './errors.ts';
import type { ModelSpec } from './config.ts';
import { chatTemplateSource } from './chat-template.ts';
import { families, familyNamed } from './families/index.ts';
import type { TokenizerDefaults } from './families/family.ts';

/** Text ↔ token ids for one model directory, whatever files it shipped its tokenizer as. */
export interface StrataTokenizer {
  /** BERT vocabularies add [CLS]/[SEP] by default; GPT-2 style tokenizers add nothing. */
  encode(text: string, opts?: { addSpecialTokens?: boolean }): number[];
  decode(ids: number[], opts?: { skipSpecialTokens?: boolean }): string;
  tokenToId(token: string): number | undefined;
  idToToken(id: number): string | undefined;
  /** tokenizer_config.json's mask_token, else the family's (`[MASK]` for DistilBERT); null when the vocabulary has none. */
  maskToken: { token: string; id: number } | null;
  eosTokenId: number | null;
  /** Highest token id + 1 (the tokenizer's, which may be below the model's padded vocab). */
  vocabSize: number;
  /** tokenizer_config.json's Jinja chat_template, when it has one. */
  chatTemplate?: string | null;
  /** The special tokens a chat template may name (bos_token, eos_token, ...). */
  specialTokens?: Record<string, string | undefined>;
  /** Ids that end an assistant turn: the eos token and generation_config.json's eos_token_id(s). */
  endTokenIds?: number[];
}

type Json = Record<string, any>;

/** A tokenizer as `@huggingface/tokenizers` takes it: the tokenizer.json object plus tokenizer_config.json. */
export interface TokenizerFiles {
  /** Where it came from, for messages: `tokenizer.json`, `vocab.json + merges.txt` or `vocab.txt`. */
  source: string;
  dir: string;
  json: Json;
  config: Json;
}

const invalid = (message: string) => new StrataError('tokenizer_invalid', message, 'failed_precondition');

const exists = (path: string) => access(path).then(() => true, () => false);

async function readJson(path: string, fix: string): Promise<Json> {
  let value: unknown;
  try {
    value = JSON.parse(await readFile(path, 'utf8'));
  } catch (e) {
    throw invalid(`${path} is not valid JSON (${(e as Error).message}); ${fix}`);
  }
  if (!value || typeof value !== 'object' || Array.isArray(value)) throw invalid(`${path} must hold a JSON object; ${fix}`);
  return value as Json;
}

const REDOWNLOAD = 'copy it again from the model repository';

/** tokenizer_config.json / special_tokens_map.json spell special tokens as strings or as AddedToken objects. */
function tokenString(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as Json).content === 'string') return (v as Json).content;
  return undefined;
}

/**
 * tokenizer_config.json merged with special_tokens_map.json (older checkpoints keep special tokens only there).
 * `clean_up_tokenization_spaces` defaults to false, as current transformers does: exact round trips matter more
 * to a server than the old "hello ." → "hello." cosmetics.
 */
async function readConfig(modelDir: string): Promise<Json> {
  const config: Json = {};
  for (const file of ['special_tokens_map.json', 'tokenizer_config.json']) {
    const path = join(modelDir, file);
    if (await exists(path)) Object.assign(config, await readJson(path, `fix or delete ${file}`));
  }
  for (const key of ['bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token', 'mask_token']) {
    if (config[key] !== undefined) config[key] = tokenString(config[key]) ?? null;
  }
  if (Array.isArray(config.additional_special_tokens)) {
    config.additional_special_tokens = config.additional_special_tokens.map(tokenString).filter((t: unknown) => t !== undefined);
  }
  config.clean_up_tokenization_spaces ??= false;
  return config;
}

const addedToken = (id: number, content: string, special: boolean) =>
  ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special });

/**
 * GPT-2 style `vocab.json` + `merges.txt` as the tokenizer.json that GPT2TokenizerFast would save:
 * byte-level BPE, no normalizer, special tokens (`<|endoftext|>` always: the class's default for these files,
 * whatever the model) as added tokens.
 * Special tokens missing from the vocabulary are skipped rather than appended (HF would give them ids past
 * the vocabulary, which the model's embedding could not look up).
 */
export function gpt2TokenizerJson(vocab: Record<string, number>, merges: string[], config: Json = {}, extra: Record<string, number> = {}): Json {
  const special = new Set<string>(['<|endoftext|>']);
  for (const key of ['bos_token', 'eos_token', 'unk_token', 'pad_token', 'mask_token']) if (typeof config[key] === 'string') special.add(config[key]);
  for (const t of config.additional_special_tokens ?? []) special.add(t);
  const added = new Map<string, Json>();
  for (const t of special) if (vocab[t] !== undefined) added.set(t, addedToken(vocab[t], t, true));
  for (const [t, id] of Object.entries(extra)) if (!added.has(t)) added.set(t, addedToken(id, t, special.has(t)));
  const byteLevel = { type: 'ByteLevel', add_prefix_space: config.add_prefix_space === true, trim_offsets: true, use_regex: true };
  return {
    version: '1.0', truncation: null, padding: null,
    added_tokens: [...added.values()].sort((a, b) => a.id - b.id),
    normalizer: null,
    pre_tokenizer: byteLevel,
    post_processor: { ...byteLevel, add_prefix_space: true, trim_offsets: false },
    decoder: { ...byteLevel, add_prefix_space: true },
    model: {
      type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: '', end_of_word_suffix: '',
      fuse_unk: false, byte_fallback: false, ignore_merges: false, vocab, merges,
    },
  };
}

/**
 * BERT `vocab.txt` (one token per line, id = line number) as the tokenizer.json BertTokenizerFast would save:
 * BertNormalizer (lowercase per `do_lower_case`, default true; accents stripped when lowercasing unless
 * `strip_accents` says otherwise), BertPreTokenizer, WordPiece with `##`, `[CLS] $A [SEP]`.
 */
export function bertTokenizerJson(vocab: Record<string, number>, config: Json = {}): Json {
  const name = (key: string, fallback: string): string => (typeof config[key] === 'string' ? config[key] : fallback);
  const [unk, sep, pad, cls, mask] = [name('unk_token', '[UNK]'), name('sep_token', '[SEP]'), name('pad_token', '[PAD]'), name('cls_token', '[CLS]'), name('mask_token', '[MASK]')];
  for (const t of [unk, sep, cls]) {
    if (vocab[t] === undefined) throw invalid(`vocab.txt has no ${t} token, so it is not a BERT WordPiece vocabulary; ${REDOWNLOAD}`);
  }
  const special = [pad, unk, cls, sep, mask, ...(config.additional_special_tokens ?? [])].filter((t, i, all) => vocab[t] !== undefined && all.indexOf(t) === i);
  const lowercase = config.do_lower_case ?? true;
  const piece = (t: string, typeId: number) => ({ SpecialToken: { id: t, type_id: typeId } });
  const seq = (id: string, typeId: number) => ({ Sequence: { id, type_id: typeId } });
  const specialEntry = (t: string) => ({ id: t, ids: [vocab[t]], tokens: [t] });
  return {
    version: '1.0', truncation: null, padding: null,
    added_tokens: special.map((t) => addedToken(vocab[t], t, true)).sort((a, b) => a.id - b.id),
    normalizer: {
      type: 'BertNormalizer', clean_text: true, handle_chinese_chars: config.tokenize_chinese_chars ?? true,
      strip_accents: config.strip_accents ?? null, lowercase,
    },
    pre_tokenizer: { type: 'BertPreTokenizer' },
    post_processor: {
      type: 'TemplateProcessing',
      single: [piece(cls, 0), seq('A', 0), piece(sep, 0)],
      pair: [piece(cls, 0), seq('A', 0), piece(sep, 0), seq('B', 1), piece(sep, 1)],
      special_tokens: { [cls]: specialEntry(cls), [sep]: specialEntry(sep) },
    },
    decoder: { type: 'WordPiece', prefix: '##', cleanup: true },
    model: { type: 'WordPiece', unk_token: unk, continuing_subword_prefix: '##', max_input_chars_per_word: 100, vocab },
  };
}

function checkVocab(value: Json, path: string): Record<string, number> {
  const entries = Object.entries(value);
  if (entries.length === 0 || !entries.every(([, id]) => Number.isInteger(id) && id >= 0)) {
    throw invalid(`${path} must map token strings to non-negative integer ids; ${REDOWNLOAD}`);
  }
  return value as Record<string, number>;
}

/** merges.txt: an optional `#version` header, then one "left right" pair per line. */
function parseMerges(text: string, path: string): string[] {
  const lines = text.split('\n').map((l) => l.replace(/\r$/, ''));
  if (lines[0]?.startsWith('#version')) lines.shift();
  const merges = lines.filter((l) => l.length > 0);
  const bad = merges.findIndex((l) => l.split(' ').length !== 2);
  if (bad >= 0) throw invalid(`${path} line "${merges[bad].slice(0, 40)}" is not a "left right" merge pair; ${REDOWNLOAD}`);
  return merges;
}

/** vocab.txt: id = line number. Like HF's load_vocab only the newline is stripped, so tokens keep other spaces. */
function parseVocabTxt(text: string, path: string): Record<string, number> {
  const lines = text.split('\n');
  if (lines.at(-1) === '') lines.pop();
  const vocab: Record<string, number> = {};
  lines.forEach((line, id) => { vocab[line.replace(/\r$/, '')] = id; });
  if (lines.length === 0) throw invalid(`${path} is empty; ${REDOWNLOAD}`);
  return vocab;
}

/**
 * Reads whichever tokenizer the directory ships, in Hugging Face's order of preference: tokenizer.json, then
 * vocab.json + merges.txt, then vocab.txt. Returns null when there is none. Exported so tools (and tests) can
 * save the equivalent tokenizer.json.
 */
export async function readTokenizerFiles(modelDir: string): Promise<TokenizerFiles | null> {
  const path = (f: string) => join(modelDir, f);
  const has = async (f: string) => exists(path(f));
  if (!(await has('tokenizer.json')) && !(await has('vocab.json')) && !(await has('merges.txt')) && !(await has('vocab.txt'))) return null;
  const config = await readConfig(modelDir);

  if (await has('tokenizer.json')) {
    const json = await readJson(path('tokenizer.json'), `${REDOWNLOAD}, or delete it to fall back to vocab.json + merges.txt / vocab.txt`);
    if (!json.model || typeof json.model !== 'object') throw invalid(`${path('tokenizer.json')} has no "model" section; ${REDOWNLOAD}`);
    // Hand-written or older tokenizer.json files omit sections the library expects to find (as null).
    for (const key of ['normalizer', 'pre_tokenizer', 'post_processor', 'decoder']) json[key] ??= null;
    json.added_tokens ??= [];
    return { source: 'tokenizer.json', dir: modelDir, json, config };
  }
  if ((await has('vocab.json')) !== (await has('merges.txt'))) {
    const [present, missing] = (await has('vocab.json')) ? ['vocab.json', 'merges.txt'] : ['merges.txt', 'vocab.json'];
    throw invalid(`${modelDir} has ${present} but no ${missing}: a GPT-2 style tokenizer needs both; copy ${missing} from the model repository (or ship tokenizer.json)`);
  }
  if (await has('vocab.json')) {
    const vocab = checkVocab(await readJson(path('vocab.json'), REDOWNLOAD), path('vocab.json'));
    const merges = parseMerges(await readFile(path('merges.txt'), 'utf8'), path('merges.txt'));
    const extra = (await has('added_tokens.json')) ? checkVocab(await readJson(path('added_tokens.json'), REDOWNLOAD), path('added_tokens.json')) : {};
    return { source: 'vocab.json + merges.txt', dir: modelDir, json: gpt2TokenizerJson(vocab, merges, config, extra), config };
  }
  const vocab = parseVocabTxt(await readFile(path('vocab.txt'), 'utf8'), path('vocab.txt'));
  return { source: 'vocab.txt', dir: modelDir, json: bertTokenizerJson(vocab, config), config };
}

/**
 * The special tokens to look up when the tokenizer files name none: the model's family's (model/families/), or,
 * for a tokenizer loaded without its model (tools, tests), every registered family's in registration order.
 */
function tokenizerDefaults(spec?: ModelSpec): TokenizerDefaults[] {
  return spec ? [familyNamed(spec.family).tokenizer] : families().map((f) => f.tokenizer);
}

/** Wraps a built `Tokenizer`: camelCase options, and decode that tolerates what generation produces. */
export function createTokenizer(files: TokenizerFiles, spec?: ModelSpec): StrataTokenizer {
  let tok: Tokenizer;
  try {
    tok = new Tokenizer(files.json, files.config);
  } catch (e) {
    throw invalid(`the tokenizer from ${files.source} in ${files.dir} could not be built (${(e as Error).message}); ${REDOWNLOAD}`);
  }
  const idOf = (t: unknown) => (typeof t === 'string' ? tok.token_to_id(t) : undefined);
  const ids = [...Object.values(files.json.model.vocab ?? {}), ...files.json.added_tokens.map((t: Json) => t.id)]
    .filter((id): id is number => typeof id === 'number');
  const defaults = tokenizerDefaults(spec);
  const maskName = [files.config.mask_token, ...defaults.map((d) => d.maskToken)].find((t) => idOf(t) !== undefined) as string | undefined;
  const eosName = defaults.map((d) => d.eosToken).find((t) => idOf(t) !== undefined);
  return {
    encode: (text, opts) => tok.encode(text, { add_special_tokens: opts?.addSpecialTokens ?? true }).ids,
    decode(ids, opts) {
      // Ids the tokenizer does not know (a model's padded vocab rows) are skipped, as the Rust tokenizers do.
      const known = ids.filter((id) => tok.id_to_token(id) !== undefined);
      return known.length === 0 ? '' : tok.decode(known, { skip_special_tokens: opts?.skipSpecialTokens ?? false });
    },
    tokenToId: (token) => tok.token_to_id(token),
    idToToken: (id) => tok.id_to_token(id),
    maskToken: maskName === undefined ? null : { token: maskName, id: idOf(maskName)! },
    eosTokenId: spec?.eosTokenId ?? idOf(files.config.eos_token) ?? idOf(eosName) ?? null,
    vocabSize: ids.reduce((max, id) => Math.max(max, id + 1), 0),
    chatTemplate: chatTemplateSource(files.config),
    specialTokens: Object.fromEntries(['bos_token', 'eos_token', 'unk_token', 'pad_token', 'sep_token', 'cls_token', 'mask_token'].map((k) => [k, typeof files.config[k] === 'string' ? files.config[k] : undefined])),
  };
}

/**
 * The model directory's tokenizer, or null when it ships none (such a model still serves token-id requests).
 * Missing halves and corrupt files fail with code 'tokenizer_invalid', naming the file.
 */
export async function loadTokenizer(modelDir: string, spec?: ModelSpec): Promise<StrataTokenizer | null> {
  const files = await readTokenizerFiles(modelDir);
  if (!files) return null;
  const tok = createTokenizer(files, spec);
  // generation_config.json may name more end ids than the tokenizer's eos (chat models' end-of-turn tokens).
  const gen = join(modelDir, 'generation_config.json');
  const extra = (await exists(gen)) ? (await readJson(gen, 'fix or delete generation_config.json')).eos_token_id : undefined;
  const ends = [tok.eosTokenId, ...(Array.isArray(extra) ? extra : [extra])].filter((id): id is number => Number.isInteger(id));
  tok.endTokenIds = [...new Set(ends)];
  return tok;
}
