#!/usr/bin/env bash
# The overload benchmark: CLIENTS concurrent chat requests, each for N samples of up to
# MAX_TOKENS tokens, against a release sidecar with a memory budget of BUDGET_MIB. Prints how each
# request was answered (200, or 429 once its wait ran out), the latencies, and the sidecar's peak
# RSS against the budget plus the model file. Not a test: it prints figures.
#
#   sidecar/bench/overload.sh     # builds the release sidecar first (SIDECAR_BIN: use that one)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${SIDECAR_BIN:-}" ]; then
  cargo build --release --locked -p ttc-sidecar --bin ttc-sidecar >&2
fi
bin="${SIDECAR_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/ttc-sidecar}"
budget_mib="${BUDGET_MIB:-2048}"
clients="${CLIENTS:-16}"
n="${N:-64}"
max_tokens="${MAX_TOKENS:-128}"
port="${PORT:-18080}"
max_wait="${MAX_WAIT_SECS:-30}"

model="$("$bin" fetch-model | tail -n 1)"
out="$(mktemp -d)"
"$bin" serve --listen "127.0.0.1:$port" --memory-budget-mib "$budget_mib" \
  --max-wait-secs "$max_wait" --energy-source estimate >"$out/sidecar.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$out"' EXIT
until curl -sf "127.0.0.1:$port/readyz" >/dev/null; do
  kill -0 "$pid" || { cat "$out/sidecar.log" >&2; exit 1; }
  sleep 0.2
done
body="{\"model\":\"smollm2-135m-instruct\",\"messages\":[{\"role\":\"user\",\"content\":\"Write a short story about a lighthouse.\"}],\"n\":$n,\"max_tokens\":$max_tokens,\"temperature\":0.8}"
started=$(date +%s.%N)
for i in $(seq "$clients"); do
  curl -s -o /dev/null -w "%{http_code} %{time_total}\n" -H 'content-type: application/json' \
    -d "$body" "127.0.0.1:$port/v1/chat/completions" >"$out/client-$i" &
done
wait $(jobs -p | grep -vx "$pid") 2>/dev/null || true
elapsed=$(printf "%.0f" "$(echo "$(date +%s.%N) - $started" | bc)")
peak_kib=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
model_mib=$(( $(stat -c %s "$model") >> 20 ))
cat "$out"/client-* | sort >"$out/all"
echo "overload: $(date -u +%F), $(nproc) cores, $(uname -m); CLIENTS=$clients N=$n MAX_TOKENS=$max_tokens BUDGET_MIB=$budget_mib MAX_WAIT_SECS=$max_wait sidecar/bench/overload.sh"
echo "answers: $(cut -d' ' -f1 "$out/all" | sort | uniq -c | awk '{printf "%s x %s, ", $1, $2}' | sed 's/, $//') in $elapsed s"
for code in $(cut -d' ' -f1 "$out/all" | sort -u); do
  awk -v c="$code" '$1 == c {print $2}' "$out/all" | sort -n |
    awk -v c="$code" '{a[NR]=$1} END {printf "  %s: latency min %.1f s, max %.1f s\n", c, a[1], a[NR]}'
done
echo "peak RSS $((peak_kib >> 10)) MiB; budget $budget_mib MiB + model $model_mib MiB = $((budget_mib + model_mib)) MiB"
