#!/usr/bin/env bash
# Builds and installs what a real single-node cluster needs beside the control plane: containerd 2.x (+ ctr and
# the runc shim), the CNI plugins, crictl, CoreDNS, Prometheus (with Kubernetes discovery) and a pause binary
# from the Go module proxy (cached per version), and runc, podman/buildah, debootstrap, iptables, conntrack and
# promtool (Debian's prometheus package) from Debian. Called by hack/install-test-tools.sh; prints the folder
# holding the Go-built binaries on its last line.
#
# Debian's containerd (1.6) is too old for Kubernetes >= 1.36, hence the build; see docs/cluster.md.
set -euo pipefail

CONTAINERD_VERSION="${KILN_CONTAINERD_VERSION:-2.4.2}"
CNI_VERSION="${KILN_CNI_VERSION:-1.10.0}"
CRICTL_VERSION="${KILN_CRICTL_VERSION:-1.37.0}"
COREDNS_VERSION="${KILN_COREDNS_VERSION:-1.15.0}"
# Prometheus 3.x is the Go module's v0.3X.Y: Debian's package is built without kubernetes_sd_configs, which the
# e2e tier's Prometheus discovers pods with. Debian's promtool stays (chart rule checks).
PROMETHEUS_VERSION="${KILN_PROMETHEUS_VERSION:-3.16.0}"
PROMETHEUS_MODULE_VERSION="0.3${PROMETHEUS_VERSION#3.}"
DEBIAN_PACKAGES=(runc podman buildah debootstrap iptables nftables conntrack iproute2 prometheus curl)

here="$(cd "$(dirname "$0")" && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/kiln"
bin="$cache/bin/node-containerd-$CONTAINERD_VERSION-cni-$CNI_VERSION-crictl-$CRICTL_VERSION-coredns-$COREDNS_VERSION"
say() { printf '[install-node-tools] %s\n' "$*" >&2; }

install_debian_packages() {
  local missing=()
  for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    say "error: missing Debian packages ${missing[*]}: run this script as root on Debian, or install them"
    exit 1
  fi
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# go_build NAME MODULE@VERSION PACKAGE... : a stub module requiring MODULE, then `go build` of each package.
go_build() {
  local name="$1" module="$2"
  shift 2
  local work="$cache/build/$name"
  rm -rf "$work" && mkdir -p "$work" && cd "$work"
  go mod init "kiln.local/$name" >/dev/null 2>&1
  go get "$module"
  for package in "$@"; do
    say "building $package"
    go build -trimpath -ldflags "-s -w ${LDFLAGS:-}" -o "$bin/$(basename "$package").tmp" "$package"
    mv "$bin/$(basename "$package").tmp" "$bin/$(basename "$package")"
  done
}

if ! command -v go >/dev/null 2>&1; then
  say "error: Go is not installed (need Go >= 1.26 and the Go module proxy to build the node tools)"
  exit 1
fi
install_debian_packages
mkdir -p "$bin"
export GOFLAGS="${GOFLAGS:-} -mod=mod" CGO_ENABLED=0
start=$(date +%s)

if [ ! -x "$bin/containerd-shim-runc-v2" ]; then
  (LDFLAGS="-X github.com/containerd/containerd/v2/version.Version=v$CONTAINERD_VERSION" go_build containerd \
    "github.com/containerd/containerd/v2@v$CONTAINERD_VERSION" \
    github.com/containerd/containerd/v2/cmd/containerd github.com/containerd/containerd/v2/cmd/ctr \
    github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2)
fi
if [ ! -x "$bin/portmap" ]; then
  (go_build cni "github.com/containernetworking/plugins@v$CNI_VERSION" \
    github.com/containernetworking/plugins/plugins/main/bridge \
    github.com/containernetworking/plugins/plugins/main/loopback \
    github.com/containernetworking/plugins/plugins/ipam/host-local \
    github.com/containernetworking/plugins/plugins/meta/portmap)
fi
if [ ! -x "$bin/crictl" ]; then
  (LDFLAGS="-X sigs.k8s.io/cri-tools/pkg/version.Version=v$CRICTL_VERSION" go_build crictl \
    "sigs.k8s.io/cri-tools@v$CRICTL_VERSION" sigs.k8s.io/cri-tools/cmd/crictl)
fi
if [ ! -x "$bin/coredns" ]; then
  (go_build coredns "github.com/coredns/coredns@v$COREDNS_VERSION" github.com/coredns/coredns)
fi
if [ "$(cat "$bin/prometheus.version" 2>/dev/null)" != "$PROMETHEUS_MODULE_VERSION" ]; then
  (LDFLAGS="-X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION" go_build prometheus \
    "github.com/prometheus/prometheus@v$PROMETHEUS_MODULE_VERSION" github.com/prometheus/prometheus/cmd/prometheus)
  echo "$PROMETHEUS_MODULE_VERSION" >"$bin/prometheus.version"
fi
if [ ! -x "$bin/pause" ] || [ "$here/pause/main.go" -nt "$bin/pause" ]; then
  say "building pause"
  (cd "$here/pause" && go build -trimpath -ldflags "-s -w" -o "$bin/pause" .)
fi
say "node tools ready in $bin ($(( $(date +%s) - start ))s)"
echo "$bin"
