#!/usr/bin/env bash
# The one-command demo (the README's first command): builds what it needs (control-plane
# binaries, kubectl and helm, the operator, the sidecar and the demo in release mode), then runs
# `ttc-demo`: a local cluster with simulated GPU nodes, the Helm chart, the operator, an
# InferencePolicy, sidecar-injected inference pods serving the real default model, a stream of
# questions, a budget change with `kubectl patch`, and a summary with a plot in demo-output/.
# Arguments go to ttc-demo (see `e2e/demo.sh --help`); Ctrl-C stops and removes everything.
set -euo pipefail
cd "$(dirname "$0")/.."
export TTC_CACHE_DIR="${TTC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ttc-operator}"

echo "==> Building the control plane, kubectl and helm (cached in $TTC_CACHE_DIR/controlplane)"
TTC_CONTROL_PLANE_BIN="$(e2e/controlplane/build.sh | tail -n 1)"
export TTC_CONTROL_PLANE_BIN

echo "==> Building ttc-operator, ttc-sidecar and ttc-demo (release)"
cargo build --release --locked -p ttc-operator -p ttc-sidecar -p ttc-e2e --bin ttc-operator --bin ttc-sidecar --bin ttc-demo
bin="${CARGO_TARGET_DIR:-$PWD/target}/release"

exec "$bin/ttc-demo" \
  --operator-bin "$bin/ttc-operator" \
  --sidecar-bin "$bin/ttc-sidecar" \
  --repo-root "$PWD" \
  "$@"
