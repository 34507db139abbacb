#!/usr/bin/env bash
# The project's test command: sets up everything the tests need (control-plane binaries, kubectl,
# helm, the default model) in a cache, then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export TTC_CACHE_DIR="${TTC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ttc-operator}"
if [ -z "${KUBECONFIG_FOR_TESTS:-}" ]; then
  TTC_CONTROL_PLANE_BIN="$(e2e/controlplane/build.sh | tail -n 1)"
  export TTC_CONTROL_PLANE_BIN
fi
cargo test --workspace --locked "$@"
