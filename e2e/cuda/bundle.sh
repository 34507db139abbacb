#!/usr/bin/env bash
# Prepares everything the GPU check (e2e/gpu-check) runs on a GPU machine that has no Rust and
# no network, in one directory under 64 MiB: the CUDA sidecar (e2e/cuda/build.sh, xz-compressed),
# the NVML meter example, the CUDA runtime it links, and reference logits computed here on the
# CPU for the generated model the check runs. Prints the directory and its size last.
#
#   e2e/cuda/bundle.sh [DIR]      (default target/gpu-check)
# then, on the GPU machine, with DIR carried along:  e2e/gpu-check
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${1:-$root/target/gpu-check}"
cache="${TTC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ttc-operator}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/cargo-target}"
layers="${GPU_CHECK_LAYERS:-30}"
log() { echo "[gpu-bundle] $*" >&2; }

cuda_bin="$("$root/e2e/cuda/build.sh" | tail -n 1)"
# Only the toolkit's location: the CPU builds below must not see the CUDA build's environment,
# or cargo would rebuild them (their build scripts watch some of it).
cuda_home="$("$root/e2e/cuda/build.sh" env | sed -n "s/^export CUDA_HOME='\(.*\)'$/\1/p")"
cd "$root"
log "CPU builds: the sidecar (for the reference logits) and the NVML meter example"
cargo build --release --locked -p ttc-sidecar --bin ttc-sidecar
cargo build --release --locked -p ttc-energy --example gpu_meter
rm -rf "$out.partial"
mkdir -p "$out.partial/lib"
log "compressing the CUDA sidecar"
xz -T2 -6 -c "$cuda_bin" >"$out.partial/ttc-sidecar.xz"
strip -o "$out.partial/gpu_meter" "$CARGO_TARGET_DIR/release/examples/gpu_meter"
cp -L "$cuda_home/lib/libcudart.so.13" "$out.partial/lib/"
log "reference logits of the generated model ($layers layers) on the CPU"
"$CARGO_TARGET_DIR/release/ttc-sidecar" device-check --layers "$layers" \
    --model-dir "$cache/gpu-check-models" --write-reference "$out.partial/reference.json" >&2
rm -rf "$out"
mv "$out.partial" "$out"
size="$(du -sm "$out" | cut -f1)"
if [ "$size" -ge 64 ]; then
    log "the bundle is $size MiB, over the 64 MiB a GPU call carries"
    exit 1
fi
log "bundle: $(cd "$out" && du -h ttc-sidecar.xz gpu_meter lib/* reference.json | tr '\t' ' ' | tr '\n' ';')"
log "$size MiB"
echo "$out"
