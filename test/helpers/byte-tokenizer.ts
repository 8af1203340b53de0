import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ModelSpec } from '../../model/config.ts';
import { loadTokenizer, type StrataTokenizer } from '../../model/tokenizer.ts';

/** GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 onwards. */
function byteLevelAlphabet(): string[] {
  const printable = (b: number) => (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
  let next = 256;
  return Array.from({ length: 256 }, (_, b) => String.fromCharCode(printable(b) ? b : next++));
}

/**
 * A byte-level GPT-2 tokenizer (vocab.json + merges.txt, no merges) over a fixture's 256 ids: id = byte value, so
 * text prompts and stop strings work on the tiny fixtures.
 */
export async function byteLevelTokenizer(spec: ModelSpec): Promise<StrataTokenizer> {
  const dir = mkdtempSync(join(tmpdir(), 'strata-bytes-tok-'));
  writeFileSync(join(dir, 'vocab.json'), JSON.stringify(Object.fromEntries(byteLevelAlphabet().map((ch, b) => [ch, b]))));
  writeFileSync(join(dir, 'merges.txt'), '#version: 0.2\n');
  return (await loadTokenizer(dir, spec))!;
}
