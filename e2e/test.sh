#!/usr/bin/env bash
# The project's test command: sets up everything the tests need (control-plane and node binaries,
# kubectl, helm, the container images, the default model) in a cache, starts one local cluster for
# the whole run, then runs the whole test suite against it. Set KUBECONFIG_FOR_TESTS to use a
# cluster of your own instead. The real-node test starts a cluster of its own (it needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
export TTC_CACHE_DIR="${TTC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ttc-operator}"
# The official OpenAI Python client, which a sidecar test drives.
python3 -c "import openai" 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check "openai>=1.40"
if [ -z "${TTC_CONTROL_PLANE_BIN:-}" ]; then
  TTC_CONTROL_PLANE_BIN="$(e2e/controlplane/build.sh | tail -n 1)"
  export TTC_CONTROL_PLANE_BIN
fi
# The images (operator, sidecar, pause), built from their Dockerfiles; then the default model,
# fetched by the release sidecar the images hold.
TTC_IMAGES_DIR="$(e2e/images/build.sh | tail -n 1)"
export TTC_IMAGES_DIR
TTC_DEFAULT_MODEL_FILE="$("${CARGO_TARGET_DIR:-$PWD/target}/release/ttc-sidecar" fetch-model | tail -n 1)"
export TTC_DEFAULT_MODEL_FILE
if [ -z "${KUBECONFIG_FOR_TESTS:-}" ]; then

  # The cluster, and the binaries the demo test runs as processes.
  cargo build --locked -p ttc-cluster -p ttc-operator -p ttc-sidecar \
    --bin ttc-cluster --bin ttc-operator --bin ttc-sidecar
  cluster_bin="${CARGO_TARGET_DIR:-$PWD/target}/debug/ttc-cluster"
  run_dir="$(mktemp -d "${TMPDIR:-/tmp}/ttc-test-cluster.XXXXXX")"
  state="$run_dir/state"
  "$cluster_bin" up --state-dir "$state" --exit-with-parent >"$run_dir/ttc-cluster.out" 2>&1 &
  cluster_pid=$!
  stop_cluster() {
    kill -TERM "$cluster_pid" 2>/dev/null || true
    wait "$cluster_pid" 2>/dev/null || true
    if [ "${TTC_E2E_KEEP:-}" = 1 ]; then echo "cluster state kept in $run_dir" >&2; else rm -rf "$run_dir"; fi
  }
  trap stop_cluster EXIT
  started=$SECONDS
  until [ -f "$state/ready" ]; do
    if ! kill -0 "$cluster_pid" 2>/dev/null; then
      echo "the local cluster failed to start:" >&2
      cat "$run_dir/ttc-cluster.out" >&2
      TTC_E2E_KEEP=1
      exit 1
    fi
    sleep 0.2
  done
  echo "local cluster ready in $((SECONDS - started))s (state: $state)" >&2
  export KUBECONFIG_FOR_TESTS="$state/kubeconfig"
fi
cargo test --workspace --locked "$@"
