#!/usr/bin/env bash
# The serving comparison and soak: the same load generator (ttc-load) against the release sidecar
# and against llama.cpp's llama-server (sidecar/bench/llama-server.sh builds it), on the same GGUF
# file and thread count, one after the other; the steady mix, then the vote workload (SAMPLES
# samples of one prompt: `n` for the sidecar, parallel requests for llama-server, which has no
# `n`). Prints each run's windows and a side-by-side table. Not a test: it prints figures.
#
#   sidecar/bench/soak.sh        # builds the release sidecar and ttc-load first
#   PEER=none LOAD=0.8 WORKLOADS=steady SECONDS_PER_RUN=1800 JOULES_PER_REQUEST=6 \
#     sidecar/bench/soak.sh        # the 30-minute soak at 80% of capacity, under a budget that binds
#
# Settings: CLIENTS (8), SECONDS_PER_RUN (60), THREADS (all cores), SAMPLES (8), MAX_TOKENS (32),
# PEER (llama-server, or none), TTC (1: the sidecar runs TTC with the budget controller and
# JOULES_PER_REQUEST, default 30), PORT (18090), WORKLOADS ("steady vote"), LOAD (empty: CLIENTS
# closed loops, each server at its capacity; a fraction such as 0.8: first CAPACITY_SECONDS (60)
# of closed loops find the server's capacity in requests/s, then requests arrive at LOAD times
# that, an open loop), SIDECAR_ARGS (more `serve` options), LABEL (sidecar), RESULTS (a file the
# RESULT lines are appended to, besides the table), LOG_DIR (where the servers' logs are kept;
# by default they are deleted), SIDECAR_BIN and LOAD_BIN (binaries to use instead of building).
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${CARGO_TARGET_DIR:-$PWD/target}"
if [ -z "${SIDECAR_BIN:-}" ] || [ -z "${LOAD_BIN:-}" ]; then
  cargo build --release --locked -p ttc-sidecar --bin ttc-sidecar --bin ttc-load >&2
fi
bin="${SIDECAR_BIN:-$target/release/ttc-sidecar}"
load="${LOAD_BIN:-$target/release/ttc-load}"
clients="${CLIENTS:-8}"
seconds="${SECONDS_PER_RUN:-60}"
threads="${THREADS:-$(nproc)}"
samples="${SAMPLES:-8}"
max_tokens="${MAX_TOKENS:-32}"
peer="${PEER:-llama-server}"
port="${PORT:-18090}"
workloads="${WORKLOADS:-steady vote}"
load_share="${LOAD:-}"
capacity_seconds="${CAPACITY_SECONDS:-60}"
label="${LABEL:-sidecar}"
read -r -a sidecar_args <<<"${SIDECAR_ARGS:-}"
out="$(mktemp -d)"
pid=""
stop() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=""; fi; }
keep_logs() { if [ -n "${LOG_DIR:-}" ]; then mkdir -p "$LOG_DIR" && cp "$out"/*.log "$LOG_DIR"/ 2>/dev/null || true; fi; }
trap 'stop; keep_logs; rm -rf "$out"' EXIT
wait_ready() {
  for _ in $(seq 1 600); do
    curl -sf "127.0.0.1:$port/$1" >/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; return 1; }
    sleep 0.2
  done
  return 1
}
run_load() { # label workload samples-as seconds [ttc-load options]
  local seconds_here="$4"
  "$load" --url "http://127.0.0.1:$port" --seconds "$seconds_here" \
    --interval "$(( seconds_here >= 300 ? 60 : 10 ))" --workload "$2" --samples "$samples" \
    --samples-as "$3" --max-tokens "$max_tokens" --pid "$pid" --label "$1 $2" "${@:5}"
}
drive() { # label workload samples-as
  if [ -z "$load_share" ]; then
    run_load "$@" "$seconds" --clients "$clients" | tee -a "$out/results"
    return
  fi
  # The server's capacity under closed loops, then an open loop at LOAD times it.
  local capacity rate
  capacity="$(run_load "$1" "$2" "$3" "$capacity_seconds" --clients "$clients" |
    sed -n 's/^RESULT //p' | python3 -c 'import json, sys; print(round(json.load(sys.stdin)["requests_per_s"], 3))')"
  rate="$(python3 -c "print(round($load_share * $capacity, 3))")"
  echo "$1 $2: capacity $capacity requests/s with $clients clients; driving $rate requests/s ($load_share of it)"
  run_load "$@" "$seconds" --rate "$rate" | tee -a "$out/results"
}

model="$("$bin" fetch-model | tail -n 1)"
echo "soak: $(date -u +%F), $(nproc) cores, $(uname -m), model $(basename "$model"), threads $threads, clients $clients, $seconds s per run${load_share:+, at $load_share of capacity}"
ttc_args=()
if [ "${TTC:-1}" = 1 ]; then ttc_args=(--ttc --joules-per-request "${JOULES_PER_REQUEST:-30}"); fi
log="$out/sidecar.log"
"$bin" serve --listen "127.0.0.1:$port" --threads "$threads" --energy-source estimate \
  "${ttc_args[@]}" "${sidecar_args[@]}" >"$log" 2>&1 &
pid=$!
wait_ready readyz
for workload in $workloads; do drive "$label" "$workload" n; done
stop
if [ "$peer" = llama-server ]; then
  server="$(sidecar/bench/llama-server.sh | tail -n 1)"
  # One slot per client (continuous batching across them), each with the context it needs.
  log="$out/llama-server.log"
  "$server" -m "$model" --host 127.0.0.1 --port "$port" -t "$threads" --parallel "$(( clients * samples ))" \
    -c "$(( clients * samples * 1024 ))" --no-webui >"$log" 2>&1 &
  pid=$!
  wait_ready health
  for workload in $workloads; do drive llama-server "$workload" parallel; done
  stop
fi
echo
printf '%-26s %9s %9s %8s %8s %7s %14s\n' run req/s tok/s p50_s p99_s errors rss_slope_MiB/min
grep '^RESULT ' "$out/results" | sed 's/^RESULT //' >"$out/results.json"
if [ -n "${RESULTS:-}" ]; then cat "$out/results.json" >>"$RESULTS"; fi
python3 - "$out/results.json" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    errors = sum(r["errors"].values())
    print(f"{r['label']:<26} {r['requests_per_s']:9.2f} {r['tokens_per_s']:9.1f} {r['p50_s']:8.2f} "
          f"{r['p99_s']:8.2f} {errors:7d} {r['rss_slope_mib_per_min']:14.1f}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    for kind, count in r["errors"].items():
        print(f"  {r['label']}: {count} x {kind}")
PY
