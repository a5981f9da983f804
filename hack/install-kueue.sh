#!/usr/bin/env bash
# Builds Kueue's controller (sigs.k8s.io/kueue/cmd/kueue) from the Go module proxy and caches it per version,
# with Kueue's CRDs (config/components/crd/bases of the same module download) copied beside it, so the
# integration tests can run the real admission controller as a host process. Prints the folder on its last line.
#
# Kueue's go.mod has no replace directives, so `go install module@version` builds it as published.
set -euo pipefail

KUEUE_VERSION="${KILN_KUEUE_VERSION:-0.17.0}"

cache="${XDG_CACHE_HOME:-$HOME/.cache}/kiln"
bin="$cache/bin/kueue-$KUEUE_VERSION"
say() { printf '[install-kueue] %s\n' "$*" >&2; }

if [ -x "$bin/kueue" ] && [ -d "$bin/crds" ]; then
  say "kueue v$KUEUE_VERSION already built in $bin"
  echo "$bin"
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  say "error: Go is not installed (need Go >= 1.26 and the Go module proxy to build Kueue)"
  exit 1
fi

export GOFLAGS="${GOFLAGS:-} -mod=mod"
export CGO_ENABLED=0
mkdir -p "$bin"
start=$(date +%s)

say "downloading sigs.k8s.io/kueue v$KUEUE_VERSION"
dir="$(go mod download -json "sigs.k8s.io/kueue@v$KUEUE_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["Dir"])')"
rm -rf "$bin/crds.tmp" && mkdir -p "$bin/crds.tmp"
cp "$dir"/config/components/crd/bases/*.yaml "$bin/crds.tmp/"
chmod u+w "$bin"/crds.tmp/*.yaml

say "building kueue v$KUEUE_VERSION (a cold build takes several minutes on 2 cores)"
GOBIN="$bin/gobin" go install -trimpath \
  -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=v$KUEUE_VERSION" \
  "sigs.k8s.io/kueue/cmd/kueue@v$KUEUE_VERSION"
mv "$bin/gobin/kueue" "$bin/kueue" && rmdir "$bin/gobin"
rm -rf "$bin/crds" && mv "$bin/crds.tmp" "$bin/crds"
say "kueue ready in $bin ($(( $(date +%s) - start ))s)"
echo "$bin"
