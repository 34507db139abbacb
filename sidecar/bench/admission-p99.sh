#!/usr/bin/env bash
# What admission control costs a pod that is not overloaded: the steady mix from CLIENTS (32)
# closed loops against the release sidecar (TTC off), with its admission control as a pod with a
# BUDGET_MIB (2048) memory budget has it (default row cap, line and wait), and with limits so
# large that it never holds a request back; ROUNDS (2) times each, in turn, SECONDS_PER_RUN (60)
# each. Prints every run and, per setting, the median p50 and p99 and their ratio. Not a test:
# it prints figures.
#
#   sidecar/bench/admission-p99.sh     # soak.sh builds what it runs
set -euo pipefail
cd "$(dirname "$0")/../.."
results="$(mktemp)"
trap 'rm -f "$results"' EXIT
clients="${CLIENTS:-32}"
seconds="${SECONDS_PER_RUN:-60}"
echo "admission-p99: $(date -u +%F), $(nproc) cores, $(uname -m); CLIENTS=$clients SECONDS_PER_RUN=$seconds ROUNDS=${ROUNDS:-2} BUDGET_MIB=${BUDGET_MIB:-2048} sidecar/bench/admission-p99.sh"
for _ in $(seq "${ROUNDS:-2}"); do
  for setting in on off; do
    if [ "$setting" = on ]; then
      args="--memory-budget-mib ${BUDGET_MIB:-2048}"
    else
      args="--memory-budget-mib 4000000 --max-rows 1000000 --max-waiting 1000000"
    fi
    LABEL="admission-$setting" SIDECAR_ARGS="$args" PEER=none TTC=0 WORKLOADS=steady \
      CLIENTS="$clients" SECONDS_PER_RUN="$seconds" RESULTS="$results" sidecar/bench/soak.sh |
      grep -E '^admission-|^  ' || true
  done
done
python3 - "$results" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs.setdefault(r["label"].split()[0], []).append(r)
median = {k: {f: statistics.median(r[f] for r in v) for f in ("p50_s", "p99_s", "requests_per_s")}
          for k, v in runs.items()}
for k, m in median.items():
    errors = sum(sum(r["errors"].values()) for r in runs[k])
    print(f"{k}: median of {len(runs[k])} runs: {m['requests_per_s']:.2f} req/s, p50 {m['p50_s']:.2f} s, "
          f"p99 {m['p99_s']:.2f} s, {errors} errors")
on, off = median["admission-on"], median["admission-off"]
print(f"p99 with admission control / without: {on['p99_s'] / off['p99_s']:.2f}x; "
      f"p50 {on['p50_s'] / off['p50_s']:.2f}x; throughput {on['requests_per_s'] / off['requests_per_s']:.2f}x")
PY
