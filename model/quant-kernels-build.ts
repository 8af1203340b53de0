// Assembles model/quant-kernels.wat into model/quant-kernels.wasm.ts: `npm run build:wasm`. wabt (the WebAssembly
// Binary Toolkit) is a dev dependency: at run time the stage builder instantiates the embedded bytes and needs no
// assembler. test/quant-kernels.test.ts assembles the source again and fails when the two have drifted apart.
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const source = new URL('./quant-kernels.wat', import.meta.url);
const target = new URL('./quant-kernels.wasm.ts', import.meta.url);

export async function assembleQuantKernels(): Promise<Uint8Array> {
  const wabt = await (await import('wabt')).default();
  const features = { simd: true, sat_float_to_int: true, threads: true };
  const mod = wabt.parseWat('quant-kernels.wat', readFileSync(source, 'utf8'), features);
  try {
    // validate() checks against its own features (wabt's typings omit the argument): threads, for the shared memory.
    (mod as unknown as { validate(f: object): void }).validate(features);
    return mod.toBinary({ log: false }).buffer;
  } finally {
    mod.destroy();
  }
}

export const kernelsModuleText = (bytes: Uint8Array): string =>
  `// Generated from quant-kernels.wat by \`npm run build:wasm\` (model/quant-kernels-build.ts): do not edit.\n` +
  `export const QUANT_KERNELS_WASM = '${Buffer.from(bytes).toString('base64')}';\n`;

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const bytes = await assembleQuantKernels();
  writeFileSync(target, kernelsModuleText(bytes));
  console.log(`wrote ${fileURLToPath(target)} (${bytes.length} bytes of WebAssembly)`);
}
