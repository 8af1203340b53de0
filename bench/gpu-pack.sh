#!/usr/bin/env bash
# Packs what bench/gpu-stage.sh needs for a GPU host that has neither npm nor Node (a bare container, an air-gapped
# machine) into DIR (default .devpack, ~37 MB): this machine's Node binary (node.xz), onnxruntime-node's Linux x64
# binaries, which carry the WebGPU EP (ort.tar.xz), and the script bundled by esbuild (gpu-stage.mjs). Copy DIR and
# the project there and run `bench/gpu-stage.sh --pack DIR ...`. Linux x86-64 only; the host needs glibc and
# libstdc++ (any current distribution), the Vulkan loader and the NVIDIA Vulkan ICD, as gpu-stage.sh checks.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.devpack}"
[ "$(uname -sm)" = "Linux x86_64" ] || { echo "gpu-pack: packs Linux x86-64 binaries; this is $(uname -sm)" >&2; exit 1; }
ort=node_modules/onnxruntime-node
[ -d "$ort/bin/napi-v6/linux/x64" ] && [ -x node_modules/.bin/esbuild ] || { echo "gpu-pack: run 'npm ci' first" >&2; exit 1; }
mkdir -p "$dir"
# The script and its imports in one ES module; onnxruntime-node stays outside (a native addon). CommonJS packages
# in the bundle call require(), which an ES module lacks: the banner defines it.
node_modules/.bin/esbuild bench/gpu-stage.ts --bundle --platform=node --format=esm --target=node20 --log-level=warning \
  --external:onnxruntime-node --outfile="$dir/gpu-stage.mjs" \
  --banner:js="import { createRequire as __strataRequire } from 'node:module'; const require = __strataRequire(import.meta.url);"
echo "gpu-pack: compressing $(command -v node) ($(node -v)) and onnxruntime-node's Linux binaries (a minute)" >&2
xz -T0 -6 -c "$(readlink -f "$(command -v node)")" >"$dir/node.xz"
tar -C node_modules -cf - onnxruntime-node/package.json onnxruntime-node/dist onnxruntime-node/bin/napi-v6/linux/x64 onnxruntime-common \
  | xz -T0 -6 >"$dir/ort.tar.xz"
du -sh "$dir" | sed 's/^/gpu-pack: /' >&2
