#!/usr/bin/env bash
# The one-command demo (the README's first command): builds what it needs (control-plane and
# node binaries, kubectl and helm, the operator and sidecar images, the demo), then runs
# `ttc-demo`: a local cluster with a real node (kubelet, containerd), the Helm chart with the
# operator from its image, an InferencePolicy, sidecar-injected inference pods serving the real
# default model, a stream of questions, a budget change with `kubectl patch`, and a summary with
# a plot in demo-output/. Needs root (the node's network and cgroups).
# Arguments go to ttc-demo (see `e2e/demo.sh --help`); Ctrl-C stops and removes everything.
set -euo pipefail
cd "$(dirname "$0")/.."
export TTC_CACHE_DIR="${TTC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ttc-operator}"

echo "==> Building the control plane, kubectl and helm (cached in $TTC_CACHE_DIR/controlplane)"
TTC_CONTROL_PLANE_BIN="$(e2e/controlplane/build.sh | tail -n 1)"
export TTC_CONTROL_PLANE_BIN

echo "==> Building the images (operator, sidecar; cached in $TTC_CACHE_DIR/images)"
TTC_IMAGES_DIR="$(e2e/images/build.sh | tail -n 1)"
export TTC_IMAGES_DIR
bin="${CARGO_TARGET_DIR:-$PWD/target}/release"

echo "==> Fetching the default model (cached in $TTC_CACHE_DIR/models)"
TTC_DEFAULT_MODEL_FILE="$("$bin/ttc-sidecar" fetch-model | tail -n 1)"
export TTC_DEFAULT_MODEL_FILE

echo "==> Building ttc-demo (release)"
cargo build --release --locked -p ttc-e2e --bin ttc-demo

exec "$bin/ttc-demo" --repo-root "$PWD" "$@"
