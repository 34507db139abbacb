#!/usr/bin/env bash
# Builds the sidecar with CUDA on a machine without a GPU or a CUDA install.
#
#   e2e/cuda/build.sh            release build of ttc-sidecar --features cuda; prints the binary's
#                                path on its last line
#   e2e/cuda/build.sh clippy     cargo clippy of ttc-sidecar --features cuda, -D warnings (CI)
#   e2e/cuda/build.sh env        prints the environment the build uses (source it to run cargo
#                                yourself: eval "$(e2e/cuda/build.sh env)")
#
# The CUDA toolkit comes from NVIDIA's PyPI wheels (nvcc, cicc, crt headers, the runtime, CCCL),
# unpacked into the cache once: CUDA 13.0, the first release whose PyPI nvcc package ships the
# compiler driver itself (the 12.x wheels carry only ptxas and libnvvm). Linking needs the
# driver (libcuda) and the math libraries (cuBLAS, cuBLASLt, cuRAND, NVRTC), which are large or,
# for the driver, not shipped at all: as the toolkit's own lib/stubs do, the script builds stub
# libraries carrying the symbols candle's cudarc binds, under the real sonames. The binary loads
# the real libraries on the GPU machine; every stub function returns CUDA_ERROR_UNKNOWN (999).
#
# Settings (environment):
#   CUDA_COMPUTE_CAP   target architecture for the kernels (90: H100/H200; 80: A100; 89: L4)
#   TTC_CUDA_VERSION   the wheels' version set (13.0)
#   TTC_CACHE_DIR      where the toolkit is kept (~/.cache/ttc-operator)
#   TTC_CUDA_TARGET_DIR  cargo's target directory for the CUDA build, apart from the CPU build's
#                      so that neither overwrites the other (~/.cache/ttc-operator/cargo-target-cuda).
#                      clippy runs in the release profile there, so that it reuses the kernels
#                      the release build compiled (nvcc takes most of a first build's half hour)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
mode="${1:-build}"
version="${TTC_CUDA_VERSION:-13.0}"
case "$version" in
13.0)
    wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
    sonames=(driver:libcuda.so.1 cublas:libcublas.so.13 cublaslt:libcublasLt.so.13
        curand:libcurand.so.10 nvrtc:libnvrtc.so.13)
    ;;
*)
    echo "cuda-build: TTC_CUDA_VERSION=$version is not a version set this script knows (13.0)" >&2
    exit 2
    ;;
esac
cache="${TTC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ttc-operator}"
toolkit="$cache/cuda/$version"
home="$toolkit/nvidia/cu13"

log() { echo "[cuda-build] $*" >&2; }

install_toolkit() {
    [ -x "$home/bin/nvcc" ] && [ -x "$home/nvvm/bin/cicc" ] && return 0
    log "installing the CUDA $version toolkit from PyPI into $toolkit"
    rm -rf "$toolkit.partial"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$toolkit.partial" "${wheels[@]}"
    rm -rf "$toolkit"
    mv "$toolkit.partial" "$toolkit"
}

# The source of the cudarc crate the lockfile pins: its generated bindings name every symbol
# the stubs must carry.
cudarc_source() {
    local v
    v="$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3; exit }' "$root/Cargo.lock")"
    (cd "$root" && cargo fetch --locked >/dev/null 2>&1) || true
    local dir
    for dir in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$v"; do
        [ -d "$dir/src" ] && { echo "$dir"; return 0; }
    done
    log "no source of cudarc $v under ${CARGO_HOME:-$HOME/.cargo}/registry (cargo fetch failed?)"
    return 1
}

build_stubs() {
    local stubs="$home/lib/stubs" src entry module soname base names
    [ -f "$stubs/.done-$version" ] && return 0
    src="$(cudarc_source)"
    mkdir -p "$stubs"
    for entry in "${sonames[@]}"; do
        module="${entry%%:*}"
        soname="${entry#*:}"
        base="${soname%%.so*}"
        names="$(grep -ho 'load::<_F>("[A-Za-z0-9_]*")' "$src/src/$module/sys/"*.rs |
            sed 's/.*("\(.*\)")/\1/' | sort -u)"
        if [ -z "$names" ]; then
            log "no symbols found for $module in $src/src/$module/sys"
            exit 1
        fi
        # Each stub function returns 999: CUDA_ERROR_UNKNOWN for the driver, an error status for
        # the libraries; never success.
        echo "$names" | sed 's/.*/int &(void) { return 999; }/' >"$stubs/$base.c"
        cc -shared -fPIC -O0 -Wl,-soname,"$soname" -o "$stubs/$base.so" "$stubs/$base.c"
        rm "$stubs/$base.c"
        log "stub $soname: $(echo "$names" | wc -l) symbols"
    done
    # The runtime is real and small: link against it by its plain name.
    ln -sf libcudart.so.13 "$home/lib/libcudart.so"
    touch "$stubs/.done-$version"
}

environment() {
    echo "export CUDA_HOME='$home'"
    echo "export PATH='$home/bin':\"\$PATH\""
    echo "export CUDA_COMPUTE_CAP='${CUDA_COMPUTE_CAP:-90}'"
    # The linker finds the real runtime and the stubs; the stubs' own needs are none.
    echo "export LIBRARY_PATH='$home/lib:$home/lib/stubs'\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
    echo "export CARGO_TARGET_DIR='${TTC_CUDA_TARGET_DIR:-$cache/cargo-target-cuda}'"
}

install_toolkit
build_stubs
eval "$(environment)"
cd "$root"
case "$mode" in
env)
    environment
    ;;
clippy)
    log "clippy of ttc-sidecar with CUDA (kernels for sm_$CUDA_COMPUTE_CAP)"
    cargo clippy --release -p ttc-sidecar --features cuda --all-targets --locked -- -D warnings
    ;;
build)
    log "release build of ttc-sidecar with CUDA (kernels for sm_$CUDA_COMPUTE_CAP)"
    cargo build -p ttc-sidecar --features cuda --release --locked --bin ttc-sidecar
    bin="$CARGO_TARGET_DIR/release/ttc-sidecar-cuda"
    cp "$CARGO_TARGET_DIR/release/ttc-sidecar" "$bin.tmp"
    strip "$bin.tmp"
    mv "$bin.tmp" "$bin"
    log "$(du -h "$bin" | cut -f1) stripped; needs at run time: $(readelf -d "$bin" |
        sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
    echo "$bin"
    ;;
*)
    echo "usage: e2e/cuda/build.sh [build|clippy|env]" >&2
    exit 2
    ;;
esac
