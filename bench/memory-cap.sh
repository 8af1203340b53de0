#!/usr/bin/env bash
# Does each worker fit in a memory limit of FACTOR × its stage's weights, as a Kubernetes pod limit would hold it?
# Peak RSS (VmHWM) also counts page cache the process maps (the checkpoint, weights.bin's pages that ORT no longer
# reads once it has packed them), which the kernel drops under a limit rather than kill anything. So this runs the
# real thing under the limit: K `strata worker` processes, each in a memory cgroup of its own capped at FACTOR × the
# weights `strata plan` gives its stage, building their stage graphs from an empty cache, then a coordinator and one
# greedy request; then the same workers without a cap (a cache hit) and the same request. It reports per worker the
# cap, the cgroup's peak usage and OOM kills, VmHWM and RssAnon against the weights, and whether the two runs chose the
# same tokens.
#
#   bench/memory-cap.sh --model DIR [--dtype int8] [--workers 2] [--factor 1.25] [--kv-budget-mb N] [--tokens 16]
#                       [--capped-cache-hit]
#
# --capped-cache-hit swaps the runs: the uncapped first start builds the cache, then the capped workers load it (a
# restart under a pod limit; with STRATA_PACKED_IMAGE=1 the capped workers load the packed images the first run wrote).
#
# Needs root and a writable cgroup memory controller (v1: /sys/fs/cgroup/memory; v2: /sys/fs/cgroup with +memory),
# a Redis at REDIS_URL (default redis://127.0.0.1:6379), and ports 7300.. and 8099 free. --kv-budget-mb is each
# worker's KV budget: its slots are allocated at configure but only touched as sessions grow (one short request
# here), so the cap is on weights and runtime; the default is one slot of the model's full context per stage.
set -euo pipefail
cd "$(dirname "$0")/.."

model='' dtype=int8 workers=2 factor=1.25 kvmb='' tokens=16 hitcapped=0
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2 ;; --dtype) dtype=$2; shift 2 ;; --workers) workers=$2; shift 2 ;;
    --factor) factor=$2; shift 2 ;; --kv-budget-mb) kvmb=$2; shift 2 ;; --tokens) tokens=$2; shift 2 ;;
    --capped-cache-hit) hitcapped=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "memory-cap: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
fail() { printf 'memory-cap: %s\n' "$@" >&2; exit 1; }
[ -n "$model" ] && [ -f "$model/config.json" ] || fail "--model DIR must be a Hugging Face model directory"
[ "$(id -u)" = 0 ] || fail "needs root (it creates memory cgroups)"
if [ -d /sys/fs/cgroup/memory ]; then cg=/sys/fs/cgroup/memory limit_file=memory.limit_in_bytes peak_file=memory.max_usage_in_bytes
elif grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then cg=/sys/fs/cgroup limit_file=memory.max peak_file=memory.peak
else fail "no memory cgroup controller under /sys/fs/cgroup"; fi
redis=${REDIS_URL:-redis://127.0.0.1:6379}
plan=$(node bin/strata.js plan --model "$model" --workers "$workers" --dtype "$dtype" --json)
weights=($(node -e 'for (const s of JSON.parse(process.argv[1]).stages) console.log(s.paramBytes)' "$plan"))
# The default KV budget: one slot of the largest stage, as the workers size it (model/memory.ts).
[ -n "$kvmb" ] || kvmb=$(node --import tsx -e '
  import("./model/config.ts").then(({ loadModelSpec }) => import("./model/memory.ts").then(({ stageKvSlots }) => {
    const [dir, dtype, plan] = process.argv.slice(1), spec = loadModelSpec(dir);
    const bytes = Math.max(...JSON.parse(plan).stages.map((s) => stageKvSlots(spec, s.range, dtype, 0).slotBytes));
    console.log(Math.ceil(bytes / 2 ** 20));
  }))' "$model" "$dtype" "$plan")
cache=$(mktemp -d "${TMPDIR:-/tmp}/strata-memory-cap-XXXX")
pids=() coord=''
cleanup() {
  [ -n "$coord" ] && kill "$coord" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for i in $(seq 0 $((workers - 1))); do rmdir "$cg/strata-cap-w$i" 2>/dev/null || true; done
  rm -rf "$cache"
}
trap cleanup EXIT

# One run: workers (capped or not), a coordinator, one greedy request; the chosen ids go to file $2.
run() {
  local capped=$1 out=$2 i addrs=''
  pids=()
  for i in $(seq 0 $((workers - 1))); do
    local dir="$cg/strata-cap-w$i" cap=$(node -p "Math.floor(${weights[$i]} * $factor)")
    rmdir "$dir" 2>/dev/null || true
    mkdir -p "$dir"
    if [ "$capped" = 1 ]; then echo "$cap" > "$dir/$limit_file"; fi
    bash -c "echo \$\$ > $dir/cgroup.procs; exec node bin/strata.js worker --listen 127.0.0.1:$((7300 + i)) --model '$model' --threads 1 --kv-budget-mb $kvmb --cache-dir '$cache'" >"$cache/w$i.log" 2>&1 &
    pids+=($!)
    addrs+="${addrs:+,}127.0.0.1:$((7300 + i))"
  done
  node bin/strata.js coordinator --model "$model" --workers "$addrs" --dtype "$dtype" --port 8099 --redis "$redis" >"$cache/coordinator.log" 2>&1 &
  coord=$!
  local t0=$SECONDS
  until [ "$(curl -s -o /dev/null -w '%{http_code}' localhost:8099/health)" = 200 ]; do
    for i in "${!pids[@]}"; do kill -0 "${pids[$i]}" 2>/dev/null || fail "worker $i exited: $(tail -c 400 "$cache/w$i.log")"; done
    [ $((SECONDS - t0)) -lt 1200 ] || fail "not serving after 20 minutes"
    sleep 1
  done
  curl -s localhost:8099/v1/completions -H 'content-type: application/json' \
    -d "{\"prompt\":[464,2068,7586,21831,18045,625,262,16931],\"max_tokens\":$tokens,\"temperature\":0,\"ignore_eos\":true}" |
    node -e 'const r = JSON.parse(require("fs").readFileSync(0)); if (!r.choices) { console.error(JSON.stringify(r)); process.exit(1); } console.log(r.choices[0].token_ids.join(","))' >"$out"
  local ready=$((SECONDS - t0))
  for i in $(seq 0 $((workers - 1))); do
    local dir="$cg/strata-cap-w$i" p=${pids[$i]}
    node -e '
      const [w, cap, peak, oom, status, capped, ready] = process.argv.slice(1);
      const kb = (f) => Number((status.match(new RegExp(f + ":\\s+(\\d+)")) ?? [])[1]) * 1024;
      const g = (b) => (b / 2 ** 30).toFixed(2) + " GiB", x = (b) => "×" + (b / Number(w)).toFixed(2);
      console.log(`  worker ${process.argv[8]}: weights ${g(Number(w))}; ${capped === "1" ? `cap ${g(Number(cap))} (${x(Number(cap))}), cgroup peak ${g(Number(peak))}, OOM kills ${oom}` : "no cap"}; VmHWM ${g(kb("VmHWM"))} (${x(kb("VmHWM"))}), RssAnon now ${g(kb("RssAnon"))} (${x(kb("RssAnon"))}); answered ${ready} s after launch`);
    ' "${weights[$i]}" "$(cat "$dir/$limit_file")" "$(cat "$dir/$peak_file" 2>/dev/null || echo 0)" \
      "$( (grep -E '^oom_kill ' "$dir/memory.oom_control" 2>/dev/null || grep -E '^oom_kill ' "$dir/memory.events" 2>/dev/null || echo 'x ?') | awk '{print $2}')" \
      "$(cat /proc/$p/status)" "$capped" "$ready" "$i"
  done
  kill "$coord" "${pids[@]}" 2>/dev/null || true
  wait "$coord" "${pids[@]}" 2>/dev/null || true
  while curl -s -o /dev/null localhost:8099/health; do sleep 1; done # the port is free for the next run
  coord='' pids=()
}

echo "memory-cap: $model, --dtype $dtype, $workers workers, cap ×$factor of each stage's weights, KV budget $kvmb MiB each"
if [ "$hitcapped" = 1 ]; then
  echo "not capped (first start: the stage graphs are built), the reference:"
  run 0 "$cache/ids-free"
  echo "capped (cache hit: the workers load what the first run built, under the cap):"
  run 1 "$cache/ids-capped"
else
  echo "capped (first start: the stage graphs are built under the cap):"
  run 1 "$cache/ids-capped"
  echo "not capped (cache hit), the reference:"
  run 0 "$cache/ids-free"
fi
capped=$(cat "$cache/ids-capped") free=$(cat "$cache/ids-free")
[ "$capped" = "$free" ] && echo "greedy ids identical: $capped" || { echo "greedy ids DIFFER: capped $capped, not capped $free"; exit 1; }
