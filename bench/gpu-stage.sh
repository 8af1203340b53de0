#!/usr/bin/env bash
# GPU figures for one BioMedLM-shaped stage on ORT's WebGPU EP (Dawn over Vulkan): ms per decode step at batch 1 and
# 8 against the stage's weight-read floor, and the host<->device bytes of each step. See bench/gpu-stage.ts.
#
#   bench/gpu-stage.sh [--hbm-gbps 4800] [--blocks 16] [--dtype float16] [--json]      # on an NVIDIA GPU host
#   bench/gpu-stage.sh --lavapipe --blocks 1 --d-model 256 --heads 4 --vocab 1000       # try-out on the CPU
#   bench/gpu-stage.sh --pack .devpack [...]     # on a host without npm or Node: what bench/gpu-pack.sh packed
#
# Needs: Node >= 20, this project with `npm ci` done (onnxruntime-node's own Linux binaries carry the WebGPU EP),
# the Vulkan loader (libvulkan1) and the NVIDIA driver's Vulkan ICD. Nothing else is downloaded: the checkpoint is
# written by the script (under STRATA_CACHE_DIR, default ~/.cache/strata; 16 blocks = 5.3 GB float32 + a 2.7 GB
# float16 stage graph). --lavapipe runs on Mesa's CPU Vulkan driver instead (slow: seconds per run; not GPU figures).
set -euo pipefail
cd "$(dirname "$0")/.."

lavapipe=0
pack=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --lavapipe) lavapipe=1 ;;
    --pack) pack="${2:?--pack needs the folder bench/gpu-pack.sh wrote}"; shift ;;
    *) args+=("$1") ;;
  esac
  shift
done

fail() { printf 'gpu-stage: %s\n' "$@" >&2; exit 1; }
case " ${args[*]-} " in *" --help "*|*" -h "*) echo "also: --lavapipe (Mesa's CPU Vulkan driver), --pack DIR (bench/gpu-pack.sh's folder, for a host without Node)"; exec node --import tsx bench/gpu-stage.ts --help ;; esac

# Node and the project: installed here, or unpacked from bench/gpu-pack.sh's folder.
if [ -n "$pack" ]; then
  for f in node.xz ort.tar.xz gpu-stage.mjs; do [ -f "$pack/$f" ] || fail "--pack $pack: $f is missing: run bench/gpu-pack.sh $pack on a machine with the project installed"; done
  run="$(mktemp -d)"
  xz -dc "$pack/node.xz" >"$run/node" && chmod +x "$run/node"
  mkdir -p "$run/node_modules" && xz -dc "$pack/ort.tar.xz" | tar -C "$run/node_modules" -xf -
  cp "$pack/gpu-stage.mjs" "$run/"
  echo "gpu-stage: unpacked $pack into $run (Node $("$run/node" -v))" >&2
  launch=("$run/node" "$run/gpu-stage.mjs")
else
  command -v node >/dev/null || fail "node not found: install Node.js >= 20 (e.g. https://nodejs.org or the distro's nodejs package), or use --pack"
  [ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ] || fail "Node $(node -v) is too old: install Node.js >= 20"
  [ -d node_modules/onnxruntime-node ] && [ -d node_modules/tsx ] || fail "the project's packages are missing: run 'npm ci' in $(pwd)"
  launch=(node --import tsx bench/gpu-stage.ts)
fi

# Vulkan writes its runtime files here; without a writable one it prints errors.
if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -w "${XDG_RUNTIME_DIR}" ]; then
  XDG_RUNTIME_DIR="$(mktemp -d)"; export XDG_RUNTIME_DIR
fi

# The Vulkan loader.
has_lib() { ldconfig -p 2>/dev/null | grep -q "$1" || ls /usr/lib/x86_64-linux-gnu/"$1"* /usr/lib64/"$1"* /usr/lib/"$1"* >/dev/null 2>&1; }
has_lib libvulkan.so.1 || fail "the Vulkan loader (libvulkan.so.1) is missing:" \
  "  Debian/Ubuntu: apt-get install -y libvulkan1     RHEL/Fedora: dnf install -y vulkan-loader"

# The Vulkan driver (ICD). An explicit VK_DRIVER_FILES / VK_ICD_FILENAMES wins; then the NVIDIA ICD where drivers
# install it; then, in a container that mounted the NVIDIA library but not its manifest, a manifest written here.
icd=""
if [ -n "${VK_DRIVER_FILES:-${VK_ICD_FILENAMES:-}}" ]; then
  icd="${VK_DRIVER_FILES:-${VK_ICD_FILENAMES}}"
elif [ "$lavapipe" = 1 ]; then
  icd="$(ls /usr/share/vulkan/icd.d/lvp_icd*.json 2>/dev/null | head -n1 || true)"
  [ -n "$icd" ] || fail "lavapipe not found: install mesa-vulkan-drivers >= 25 (Debian bookworm: .ci/lavapipe.sh, from bookworm-backports)"
  echo "gpu-stage: --lavapipe: running on Mesa's CPU Vulkan driver ($icd); these are NOT GPU figures" >&2
else
  for f in /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.*.json /etc/vulkan/icd.d/nvidia_icd.*.json; do
    if [ -f "$f" ]; then icd="$f"; break; fi
  done
  if [ -z "$icd" ] && has_lib libGLX_nvidia.so.0; then
    icd="$XDG_RUNTIME_DIR/nvidia_icd.json"
    printf '{"file_format_version":"1.0.0","ICD":{"library_path":"libGLX_nvidia.so.0","api_version":"1.3"}}\n' >"$icd"
    echo "gpu-stage: no nvidia_icd.json installed, but libGLX_nvidia.so.0 is present: using a manifest written to $icd" >&2
  fi
  if [ -z "$icd" ]; then
    driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 || true)"
    if [ -z "$driver" ]; then
      fail "no NVIDIA driver found (nvidia-smi failed). On a GPU host install the NVIDIA driver;" \
        "to try the script on the CPU instead, pass --lavapipe."
    fi
    fail "the NVIDIA driver ${driver} is installed but not its Vulkan driver (nvidia_icd.json + libGLX_nvidia.so.0):" \
      "  Ubuntu/Debian host: apt-get install -y libnvidia-gl-${driver%%.*}   (the driver's GL/Vulkan part, same version)" \
      "  .run installer: reinstall the driver without --no-opengl-files" \
      "  Docker (NVIDIA Container Toolkit): run with -e NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics" \
      "    (the 'graphics' capability mounts the Vulkan ICD; the default compute,utility does not)" \
      "  Kubernetes: set the env NVIDIA_DRIVER_CAPABILITIES=all on the container" \
      "Or point VK_DRIVER_FILES at the driver's nvidia_icd.json if it lives elsewhere."
  fi
fi
# VK_DRIVER_FILES for loaders >= 1.3.234, VK_ICD_FILENAMES for older ones (Ubuntu 22.04 ships 1.3.204).
export VK_DRIVER_FILES="$icd" VK_ICD_FILENAMES="$icd"
echo "gpu-stage: Vulkan driver manifest $icd" >&2
if command -v nvidia-smi >/dev/null 2>&1 && [ "$lavapipe" = 0 ]; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu-stage: GPU /' >&2 || true
fi

exec "${launch[@]}" ${args[@]+"${args[@]}"}
