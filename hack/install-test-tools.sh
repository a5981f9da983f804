#!/usr/bin/env bash
# Builds the real cluster the integration and e2e tests run — the control plane (kube-apiserver,
# kube-controller-manager, kube-scheduler, etcd), the node (kubelet, kube-proxy; containerd, CNI plugins, crictl,
# CoreDNS and the pause binary through hack/install-node-tools.sh, which also installs runc, podman, debootstrap,
# iptables, nftables and Prometheus from Debian), a matching kubectl and helm, Kueue's controller with its CRDs
# (hack/install-kueue.sh), and h2spec (the HTTP/2 conformance suite the serving tests run) — from the Go module
# proxy, and caches them per version so later runs on the same machine skip the build. Prints the folder holding
# (links to) every binary on its last line.
#
# Kubernetes' own go.mod replaces its staging modules with local folders, so `go install` is refused;
# a stub module that pins every staging module to its v0.X.Y tag builds the commands instead.
set -euo pipefail

KUBE_VERSION="${KILN_KUBE_VERSION:-1.36.3}"
ETCD_VERSION="${KILN_ETCD_VERSION:-3.6.14}"
HELM_VERSION="${KILN_HELM_VERSION:-3.22.0}"
H2SPEC_VERSION="2.2.1"

cache="${XDG_CACHE_HOME:-$HOME/.cache}/kiln"
bin="$cache/bin/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION"
say() { printf '[install-test-tools] %s\n' "$*" >&2; }

if ! command -v go >/dev/null 2>&1; then
  say "error: Go is not installed (need Go >= 1.26 and the Go module proxy to build the control plane)"
  exit 1
fi

mkdir -p "$bin"
export GOFLAGS="${GOFLAGS:-} -mod=mod"
export CGO_ENABLED=0

build_kube() {
  local minor staging kmod work
  minor="$(echo "$KUBE_VERSION" | cut -d. -f2)"
  staging="0.$minor.$(echo "$KUBE_VERSION" | cut -d. -f3)"
  work="$cache/build/kube-$KUBE_VERSION"
  rm -rf "$work" && mkdir -p "$work" && cd "$work"
  go mod init kiln.local/kubebuild >/dev/null 2>&1
  say "downloading k8s.io/kubernetes v$KUBE_VERSION"
  kmod="$(go mod download -json "k8s.io/kubernetes@v$KUBE_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["GoMod"])')"
  for m in $(sed -n 's|^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => \./staging/.*|\1|p' "$kmod"); do
    go mod edit -replace="$m=$m@v$staging"
  done
  grep '^godebug' "$kmod" >>go.mod || true
  go mod edit -require="k8s.io/kubernetes@v$KUBE_VERSION"
  cat >tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
GO
  say "resolving modules"
  go mod tidy -e >/dev/null 2>&1 || true
  go get "k8s.io/kubernetes/cmd/kube-apiserver@v$KUBE_VERSION" \
    "k8s.io/kubernetes/cmd/kube-controller-manager@v$KUBE_VERSION" \
    "k8s.io/kubernetes/cmd/kube-scheduler@v$KUBE_VERSION" "k8s.io/kubernetes/cmd/kubectl@v$KUBE_VERSION" \
    "k8s.io/kubernetes/cmd/kubelet@v$KUBE_VERSION" "k8s.io/kubernetes/cmd/kube-proxy@v$KUBE_VERSION"
  local v=k8s.io/component-base/version
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
    [ -x "$bin/$cmd" ] && continue
    say "building $cmd v$KUBE_VERSION (a cold build takes several minutes on 2 cores)"
    go build -trimpath -o "$bin/$cmd.tmp" \
      -ldflags "-s -w -X $v.gitVersion=v$KUBE_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean" \
      "k8s.io/kubernetes/cmd/$cmd"
    mv "$bin/$cmd.tmp" "$bin/$cmd"
  done
}

build_etcd() {
  local work="$cache/build/etcd-$ETCD_VERSION"
  rm -rf "$work" && mkdir -p "$work" && cd "$work"
  go mod init kiln.local/etcdbuild >/dev/null 2>&1
  say "building etcd v$ETCD_VERSION"
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
  go build -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3
  mv "$bin/etcd.tmp" "$bin/etcd"
}

build_helm() {
  local work="$cache/build/helm-$HELM_VERSION" minor
  minor="$(echo "$KUBE_VERSION" | cut -d. -f2)"
  rm -rf "$work" && mkdir -p "$work" && cd "$work"
  go mod init kiln.local/helmbuild >/dev/null 2>&1
  say "building helm v$HELM_VERSION"
  go get "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
  # Without these, helm assumes Kubernetes v1.20 for Capabilities and reports a bare version.
  go build -trimpath -o "$bin/helm.tmp" -ldflags "-s -w \
    -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION \
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor \
    -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor" \
    helm.sh/helm/v3/cmd/helm
  mv "$bin/helm.tmp" "$bin/helm"
}

build_h2spec() {
  # h2spec has no go.mod: a stub module pins what it imports, or `go install` would take their newest releases.
  local work="$cache/build/h2spec-$H2SPEC_VERSION"
  rm -rf "$work" && mkdir -p "$work" && cd "$work"
  go mod init kiln.local/h2specbuild >/dev/null 2>&1
  say "building h2spec v$H2SPEC_VERSION"
  go get "github.com/summerwind/h2spec@v$H2SPEC_VERSION+incompatible" github.com/fatih/color@v1.19.0 \
    github.com/mattn/go-colorable@v0.1.14 github.com/mattn/go-isatty@v0.0.20 github.com/spf13/cobra@v1.10.2 \
    github.com/spf13/pflag@v1.0.9 golang.org/x/net@v0.63.0 golang.org/x/sys@v0.50.0 golang.org/x/text@v0.44.0
  go build -trimpath -o "$bin/h2spec.tmp" -ldflags "-s -w" github.com/summerwind/h2spec/cmd/h2spec
  mv "$bin/h2spec.tmp" "$bin/h2spec"
}

start=$(date +%s)
[ -x "$bin/etcd" ] || (build_etcd)
[ -x "$bin/helm" ] || (build_helm)
[ -x "$bin/h2spec" ] || (build_h2spec)
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
  if [ ! -x "$bin/$cmd" ]; then
    (build_kube)
    break
  fi
done
node_bin="$(bash "$(dirname "$0")/install-node-tools.sh" | tail -n 1)"
bash "$(dirname "$0")/install-kueue.sh" >/dev/null
for tool in "$node_bin"/*; do
  ln -sf "$tool" "$bin/$(basename "$tool")"
done
say "binaries ready in $bin ($(( $(date +%s) - start ))s)"
echo "$bin"
