#!/usr/bin/env bash
# Builds the operator and sidecar images from their Dockerfiles with podman, on this machine,
# without a registry:
#
#   - the runtime base is assembled from Debian's packages (glibc, libgcc, libstdc++, CA
#     certificates, user 65532, no shell, no package manager) and imported as
#     localhost/ttc-base:debian12, standing in for gcr.io/distroless/cc-debian12:nonroot;
#   - the Dockerfiles' `build` stage (a Rust builder image, which cannot be pulled here) is
#     replaced by host-built release binaries through `--build-context build=DIR`; the runtime
#     stage is built exactly as shipped.
#
# Images are tagged as the chart expects them (ghcr.io/ttc-operator/<name>:<appVersion>) and
# saved as archives for containerd (`ctr -n k8s.io images import`). Each image is rebuilt only
# when its inputs (Dockerfile, binary, base) change. Prints the images directory on its last
# line; it holds operator.tar, sidecar.tar, pause.tar, images.env (the references) and the
# podman configuration (podman.env) this sandbox needs.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/../.."

CACHE="${TTC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ttc-operator}"
OUT="$CACHE/images"
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/ttc-operator/Chart.yaml)"
BASE=localhost/ttc-base:debian12
PAUSE=registry.k8s.io/pause:3.10
mkdir -p "$OUT"
log() { echo "[images] $*" >&2; }

# The container tools, from Debian's packages.
need=()
for tool in podman:podman runc:runc containerd:containerd ctr:containerd \
  /usr/lib/cni/bridge:containernetworking-plugins iptables:iptables; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]} (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

# podman as this sandbox allows it: runc (crun refuses hybrid cgroups), cgroupfs, no raised
# rlimits (CAP_SYS_RESOURCE is missing), vfs storage of our own.
cat >"$OUT/containers.conf" <<EOF
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
cat >"$OUT/storage.conf" <<EOF
[storage]
driver = "vfs"
runroot = "$OUT/run"
graphroot = "$OUT/storage"
EOF
cat >"$OUT/podman.env" <<EOF
CONTAINERS_CONF=$OUT/containers.conf
CONTAINERS_STORAGE_CONF=$OUT/storage.conf
EOF
export CONTAINERS_CONF="$OUT/containers.conf" CONTAINERS_STORAGE_CONF="$OUT/storage.conf"

# Rebuilds $2 unless the key file $1 holds the key $3 and the image exists.
fresh() { [ -f "$1" ] && [ "$(cat "$1")" = "$3" ] && podman image exists "$2"; }

build_base() {
  local debs="$OUT/base-debs"
  mkdir -p "$debs"
  local packages=(libc6 libgcc-s1 libstdc++6 ca-certificates)
  local key
  key="$(apt-cache policy "${packages[@]}" | grep -E '^[a-z]|Candidate' | sha256sum | cut -c1-16)"
  fresh "$OUT/base.key" "$BASE" "$key" && return 0
  log "assembling $BASE from Debian packages: ${packages[*]}"
  rm -rf "$debs" && mkdir -p "$debs"
  (cd "$debs" && apt-get download "${packages[@]}" 2>/dev/null)
  local root="$OUT/base-root"
  rm -rf "$root" && mkdir -p "$root"
  for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$root"; done
  # Libraries and certificates only: no maintainer scripts ran, so no package database; the
  # few programs the packages carry (ldconfig, iconv, update-ca-certificates) go too.
  rm -rf "$root"/usr/share/{doc,man,lintian,gdb,gcc,locale} "$root"/usr/bin "$root"/usr/sbin \
    "$root"/sbin "$root"/etc/ca-certificates "$root"/usr/lib/x86_64-linux-gnu/gconv
  mkdir -p "$root"/etc/ssl/certs "$root"/tmp "$root"/home/nonroot
  chmod 1777 "$root"/tmp
  cat "$root"/usr/share/ca-certificates/mozilla/*.crt >"$root"/etc/ssl/certs/ca-certificates.crt
  printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
    'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$root"/etc/passwd
  printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >"$root"/etc/group
  printf 'hosts: files dns\n' >"$root"/etc/nsswitch.conf
  chown 65532:65532 "$root"/home/nonroot
  tar -C "$root" --numeric-owner --sort=name --mtime=@0 -cf "$OUT/base.tar" .
  podman import --change 'USER=65532:65532' "$OUT/base.tar" "$BASE" >/dev/null
  rm -rf "$root" "$OUT/base.tar"
  echo "$key" >"$OUT/base.key"
}

# The pause container of every pod sandbox (containerd's sandbox image), which cannot be pulled
# either: a static program that sleeps until signalled and reaps orphans, as Kubernetes' own.
build_pause() {
  local src=e2e/images/pause.c key
  key="$(sha256sum "$src" | cut -c1-16)"
  fresh "$OUT/pause.key" "$PAUSE" "$key" && [ -f "$OUT/pause.tar" ] && return 0
  log "building $PAUSE from $src"
  local ctx="$OUT/pause-context"
  rm -rf "$ctx" && mkdir -p "$ctx"
  gcc -Os -static -o "$ctx/pause" "$src"
  strip "$ctx/pause"
  printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$ctx/Dockerfile"
  podman build --quiet -t "$PAUSE" "$ctx" >/dev/null
  rm -f "$OUT/pause.tar"
  podman save --quiet --format docker-archive -o "$OUT/pause.tar" "$PAUSE"
  echo "$key" >"$OUT/pause.key"
}

# build_image NAME: ghcr.io/ttc-operator/ttc-NAME:VERSION from NAME/Dockerfile.
build_image() {
  local name=$1 image="ghcr.io/ttc-operator/ttc-$1:$VERSION"
  local binary="$TARGET/release/ttc-$name" ctx="$OUT/$name-context" key
  key="$( (sha256sum "$name/Dockerfile" "$binary" | cut -d' ' -f1
    podman image inspect --format '{{.Id}}' "$BASE") | sha256sum | cut -c1-16)"
  if fresh "$OUT/$name.key" "$image" "$key" && [ -f "$OUT/$name.tar" ]; then
    echo "$image"
    return 0
  fi
  log "building $image from $name/Dockerfile (runtime stage as shipped, on $BASE)"
  rm -rf "$ctx" && mkdir -p "$ctx/out"
  # As the Dockerfile's build stage makes it: the release binary without its debug info.
  objcopy --strip-debug "$binary" "$ctx/out/ttc-$name"
  podman build --quiet --build-context "build=$ctx" --build-arg "RUNTIME=$BASE" \
    -f "$name/Dockerfile" -t "$image" . >/dev/null
  rm -f "$OUT/$name.tar"
  podman save --quiet --format docker-archive -o "$OUT/$name.tar" "$image"
  rm -rf "$ctx"
  echo "$key" >"$OUT/$name.key"
  echo "$image"
}

log "building the release binaries"
cargo build --release --locked -p ttc-operator -p ttc-sidecar --bin ttc-operator --bin ttc-sidecar >&2

build_base
build_pause
operator_image="$(build_image operator)"
sidecar_image="$(build_image sidecar)"
# Earlier builds of the same tags stay behind untagged (vfs keeps whole copies): drop them.
podman image prune --force >/dev/null
cat >"$OUT/images.env" <<EOF
TTC_OPERATOR_IMAGE=$operator_image
TTC_SIDECAR_IMAGE=$sidecar_image
TTC_PAUSE_IMAGE=$PAUSE
EOF
for image in "$operator_image" "$sidecar_image" "$PAUSE"; do
  log "$(podman image inspect --format '{{.Size}}' "$image" | awk -v i="$image" '{printf "%s: %.1f MB", i, $1 / 1e6}')"
done
echo "$OUT"
