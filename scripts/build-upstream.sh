#!/usr/bin/env bash
# Build the upstream tools the lab's kubernetes mode and its tests run (kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, etcd, helm; and h2spec) from the Go module proxy,
# at the versions upstream/go.mod pins, into a cache outside the repository:
#
#   ${VEIL_CACHE:-~/.cache/veil}/kubernetes/<version>/bin
#
# Does nothing when that directory already holds them for the same go.sum. Prints the
# directory on its last line. No Go code of ours is built: Veil is Python.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MOD=$ROOT/upstream
version_of() { awk -v m="$1" '$1 == m && $2 ~ /^v/ {print $2; exit}' "$MOD/go.mod"; }
K8S=$(version_of k8s.io/kubernetes)
HELM=$(version_of helm.sh/helm/v4)
CACHE=${VEIL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/veil}
OUT=$CACHE/kubernetes/$K8S/bin
STAMP=$OUT/.built-$(sha256sum "$MOD/go.sum" | cut -c1-16)
# Gateway API's CRDs (a prerequisite users install), from the release's Go module: its
# config/crd/experimental files (the standard channel plus what is still experimental, such
# as HTTPRoute retries, which Veil's waypoint supports), not copies in this repository.
# Pinned here and in lab/upstream.py (a unit test keeps the two equal).
GATEWAY_API=v1.6.3
CRDS=$CACHE/kubernetes/gateway-api-$GATEWAY_API-experimental

gateway_crds() {
  [ -f "$CRDS/.done" ] && return 0
  need_go
  local dir
  dir=$(cd /tmp && GOFLAGS= go mod download -json "sigs.k8s.io/gateway-api@$GATEWAY_API" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "$dir/config/crd/experimental" ] || { echo "build-upstream: no CRDs in $dir" >&2; exit 1; }
  mkdir -p "$CRDS"
  cp "$dir"/config/crd/experimental/gateway.networking.k8s.io_*.yaml "$CRDS/"
  chmod 644 "$CRDS"/*.yaml
  touch "$CRDS/.done"
}

declare -A PACKAGES=(
  [kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
  [kube-controller-manager]=k8s.io/kubernetes/cmd/kube-controller-manager
  [kube-scheduler]=k8s.io/kubernetes/cmd/kube-scheduler
  [kubectl]=k8s.io/kubernetes/cmd/kubectl
  [etcd]=go.etcd.io/etcd/server/v3
  [helm]=helm.sh/helm/v4/cmd/helm
)

need_go() { command -v go >/dev/null || { echo "build-upstream: needs the go command" >&2; exit 1; }; }
gateway_crds

# h2spec (HTTP/2 conformance, tests/interop/test_h2spec.py), from its own pinned module
# (tools/h2spec) so that its dependencies never move Kubernetes' build.
H2SPEC_MOD=$ROOT/tools/h2spec
H2SPEC=$CACHE/h2spec-$(sha256sum "$H2SPEC_MOD/go.sum" | cut -c1-16)/h2spec
h2spec() {
  [ -x "$H2SPEC" ] && return 0
  need_go
  mkdir -p "$(dirname "$H2SPEC")"
  echo "build-upstream: h2spec (github.com/summerwind/h2spec/cmd/h2spec)" >&2
  (cd "$H2SPEC_MOD" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$H2SPEC.tmp" \
    github.com/summerwind/h2spec/cmd/h2spec)
  mv "$H2SPEC.tmp" "$H2SPEC"
}
h2spec

if [ -f "$STAMP" ]; then
  missing=0
  for b in "${!PACKAGES[@]}"; do [ -x "$OUT/$b" ] || missing=1; done
  if [ $missing = 0 ]; then echo "$OUT"; exit 0; fi
fi

need_go
mkdir -p "$OUT"
minor=${K8S#v1.}; minor=${minor%%.*}
# What `kubectl version` and the API server's /version report (Kubernetes' own build sets
# these with hack/lib/version.sh).
k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$K8S -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
helm_ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$HELM"

start=$(date +%s)
cd "$MOD"
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl etcd helm; do
  case $b in
    kube-*|kubectl) flags=$k8s_ldflags ;;
    helm) flags=$helm_ldflags ;;
    *) flags="-s -w" ;;
  esac
  echo "build-upstream: $b (${PACKAGES[$b]})" >&2
  CGO_ENABLED=0 go build -trimpath -ldflags "$flags" -o "$OUT/$b.tmp" "${PACKAGES[$b]}"
  mv "$OUT/$b.tmp" "$OUT/$b"
done
rm -f "$OUT"/.built-*
touch "$STAMP"
echo "build-upstream: built in $(( $(date +%s) - start )) s, $(du -sh "$OUT" | cut -f1) in $OUT" >&2
echo "$OUT"
