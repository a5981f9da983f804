#!/usr/bin/env bash
# Builds kiln's images from the committed Dockerfiles: with Docker when `docker info` works, else with rootful
# podman on a private storage under ${XDG_CACHE_HOME:-$HOME/.cache}/kiln/images (its own containers.conf and
# storage.conf). Where the public base images cannot be pulled (no registry reachable), it makes a Debian
# bookworm base with debootstrap once, builds on it, and takes torch from PyPI. See docs/images.md.
#
# Usage: hack/build-images.sh [--export DIR]
#   --export DIR   also write each image as an OCI archive DIR/kiln-<name>.tar (skipped while DIR/kiln-<name>.id
#                  holds the image's current ID) and print DIR as the last line of stdout.
# Environment:
#   KILN_IMAGES             names to build, in order (default: all five, "operator serving trainer serving-gpu
#                           trainer-gpu")
#   KILN_IMAGE_BUILDER      docker or podman (default: docker when `docker info` works, else podman)
#   KILN_BASE_IMAGE         base of the CPU images (default: the Dockerfiles' public one, else the local base)
#   KILN_GPU_BASE_IMAGE     base of the GPU images (default: the Dockerfiles' CUDA one, else the local base)
#   KILN_TORCH_INDEX_URL    torch index of the trainers; empty means PyPI (default: the Dockerfile's, or
#                           PyPI on the local base)
#   KILN_DEBIAN_MIRROR      mirror debootstrap uses for the local base (default: debootstrap's own)
#   KILN_CA_BUNDLE          CA bundle mounted read-only into podman's build steps (default: the host's, if any)
#   KILN_IMAGES_MIN_FREE_GB free disk needed before each trainer build (default 25: the measured peak of a cold trainer build, +22 GB, and a margin; other images need 5)
# Tags: kiln-<name>:<version> and docker.io/library/kiln-<name>:<version> (the name containerd resolves for the
# chart's bare image names); <version> is pyproject.toml's.
set -euo pipefail

ALL_IMAGES="operator serving trainer serving-gpu trainer-gpu"
root="$(cd "$(dirname "$0")/.." && pwd)"
state="${XDG_CACHE_HOME:-$HOME/.cache}/kiln/images"
say() { printf '[build-images] %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 1
}

# --- arguments ---------------------------------------------------------------------------------------------
export_dir=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --export)
      [ "$#" -ge 2 ] && [ -n "$2" ] || die "--export needs a folder"
      export_dir="$2"
      shift 2
      ;;
    --export=*)
      export_dir="${1#--export=}"
      [ -n "$export_dir" ] || die "--export needs a folder"
      shift
      ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown argument '$1' (usage: hack/build-images.sh [--export DIR])" ;;
  esac
done

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml" | head -n 1)"
[ -n "$version" ] || die "no version in $root/pyproject.toml"
read -r -a images <<<"${KILN_IMAGES:-$ALL_IMAGES}"
[ "${#images[@]}" -gt 0 ] || die "KILN_IMAGES is empty (choose from: $ALL_IMAGES)"
for name in "${images[@]}"; do
  case " $ALL_IMAGES " in
    *" $name "*) ;;
    *) die "unknown image '$name' in KILN_IMAGES (choose from: $ALL_IMAGES)" ;;
  esac
done

# dockerfile NAME: operator -> operator/Dockerfile, trainer-gpu -> trainer/Dockerfile.gpu.
dockerfile() {
  case "$1" in
    *-gpu) echo "${1%-gpu}/Dockerfile.gpu" ;;
    *) echo "$1/Dockerfile" ;;
  esac
}

# default_base FILE: the default of the Dockerfile's `ARG BASE_IMAGE=...` (the Dockerfiles own that fact).
default_base() {
  local base
  base="$(sed -n 's/^ARG BASE_IMAGE=\(.*\)$/\1/p' "$root/$1" | head -n 1)"
  [ -n "$base" ] || die "$1 has no 'ARG BASE_IMAGE=<default>'"
  echo "$base"
}

# --- the builder -------------------------------------------------------------------------------------------
builder="${KILN_IMAGE_BUILDER:-}"
if [ -z "$builder" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    builder=docker
  elif command -v podman >/dev/null 2>&1; then
    builder=podman
  else
    die "no image builder: start Docker, or install podman, buildah and debootstrap (hack/install-node-tools.sh does, as root on Debian)"
  fi
fi
case "$builder" in
  docker | podman) command -v "$builder" >/dev/null 2>&1 || die "KILN_IMAGE_BUILDER=$builder but $builder is not installed" ;;
  *) die "KILN_IMAGE_BUILDER must be docker or podman, not '$builder'" ;;
esac

build_flags=()
if [ "$builder" = podman ]; then
  [ "$(id -u)" = 0 ] || die "podman builds here run rootful: run as root (or start Docker)"
  # Private storage and settings this VM kind needs: runc (crun refuses hybrid cgroups), cgroupfs (no systemd),
  # host networking (no CNI bridge, no iptables chains), ulimits within the hard limits (no CAP_SYS_RESOURCE).
  mkdir -p "$state/storage" "$state/run" "$state/tmp"
  cat >"$state/containers.conf" <<EOF
[containers]
netns = "host"
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$state/run/events.log"
tmp_dir = "$state/tmp"
EOF
  cat >"$state/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$state/storage"
runroot = "$state/run"
EOF
  export CONTAINERS_CONF="$state/containers.conf" CONTAINERS_STORAGE_CONF="$state/storage.conf"
  build_flags+=(--network host)
  # Build steps trust the host's CA bundle (a TLS-intercepting proxy's CA may be in it). Mounted over the
  # bundle the base already has, so no trace is left in the image; the base's pip settings point pip at it.
  ca_bundle="${KILN_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
  if [ -f "$ca_bundle" ]; then
    build_flags+=(--volume "$ca_bundle:/etc/ssl/certs/ca-certificates.crt:ro")
  fi
fi
engine() { "$builder" "$@"; }
image_id() { engine image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }
free_gb() { df -P -k "$1" | awk 'NR == 2 { print int($4 / 1048576) }'; }

# --- base images -------------------------------------------------------------------------------------------
LOCAL_BASE="localhost/kiln-base:bookworm"
[ "$builder" = docker ] && LOCAL_BASE="kiln-base:bookworm"

# build_local_base: Debian bookworm (Python 3.11, venv, CA certificates) from debootstrap, imported as an image.
build_local_base() {
  command -v debootstrap >/dev/null 2>&1 || die "the base image cannot be pulled and debootstrap is not installed (apt-get install -y debootstrap)"
  [ "$(id -u)" = 0 ] || die "debootstrap needs root to make the local base image"
  local rootfs="$state/base-rootfs" start
  start=$(date +%s)
  say "the public base cannot be pulled: making $LOCAL_BASE with debootstrap (about a minute)"
  rm -rf "$rootfs"
  # shellcheck disable=SC2086 # an unset mirror must vanish, not become an empty argument
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
    ${KILN_DEBIAN_MIRROR:-} >"$state/debootstrap.log" 2>&1 ||
    die "debootstrap failed: see $state/debootstrap.log"
  ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
  # pip uses its own CA list unless told otherwise: the system bundle, which builds may replace by a mount.
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
  tar --numeric-owner -C "$rootfs" -c . | engine import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$LOCAL_BASE" >/dev/null 2>>"$state/debootstrap.log" ||
    die "importing the base failed: see $state/debootstrap.log"
  rm -rf "$rootfs"
  say "made $LOCAL_BASE in $(($(date +%s) - start))s"
}

# resolve_base DEFAULT: the image to build on. The public default when present or pullable; else the local
# base (made once). An existing local base means an earlier run found no registry: it is used without retrying.
resolve_base() {
  local public="$1"
  if [ -n "$(image_id "$public")" ]; then
    echo "$public"
  elif [ -n "$(image_id "$LOCAL_BASE")" ]; then
    echo "$LOCAL_BASE"
  elif engine pull "$public" >/dev/null 2>&1; then
    echo "$public"
  else
    build_local_base
    echo "$LOCAL_BASE"
  fi
}

# inputs_digest FILE BASE_ID BUILD_ARG...: what building FILE depends on: the builder, the Dockerfile, the
# .dockerignore, the build arguments, the base image's ID and every file its COPY instructions take from the
# context (less what .dockerignore leaves out of every folder). An image labelled with the same digest is
# current: its build, a minute of cache checks on two busy cores, is skipped.
inputs_digest() {
  local file="$1" base_id="$2" sources
  shift 2
  mapfile -t sources < <(awk '$1 == "COPY" && $2 !~ /^--/ { for (i = 2; i < NF; i++) print $i }' "$file")
  {
    printf '%s\n' "$builder" "$base_id" "$@"
    sha256sum "$file" .dockerignore
    find "${sources[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.py[cod]' ! -path '*.egg-info/*' -print0 |
      LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-64
}
INPUTS_LABEL="dev.kiln.build-inputs"

# --- build -------------------------------------------------------------------------------------------------
declare -A bases=()
cd "$root"
for name in "${images[@]}"; do
  file="$(dockerfile "$name")"
  [ -f "$file" ] || die "$file is missing"
  ref="kiln-$name:$version"
  public="$(default_base "$file")"
  case "$name" in
    *-gpu) wanted="${KILN_GPU_BASE_IMAGE:-}" ;;
    *) wanted="${KILN_BASE_IMAGE:-}" ;;
  esac
  if [ -z "$wanted" ]; then
    [ -n "${bases[$public]:-}" ] || bases[$public]="$(resolve_base "$public")"
    wanted="${bases[$public]}"
    if [ "$wanted" = "$LOCAL_BASE" ] && [ "${name%-gpu}" != "$name" ]; then
      say "warning: $ref builds on $LOCAL_BASE, $public is not reachable (CUDA comes from the wheels; not run on a GPU)"
    fi
  fi
  args=(--file "$file" --tag "$ref" --tag "docker.io/library/$ref" --build-arg "BASE_IMAGE=$wanted")
  if [ "${name#trainer}" != "$name" ]; then
    if [ -n "${KILN_TORCH_INDEX_URL+set}" ]; then
      args+=(--build-arg "TORCH_INDEX_URL=$KILN_TORCH_INDEX_URL")
    elif [ "$wanted" = "$LOCAL_BASE" ]; then
      args+=(--build-arg "TORCH_INDEX_URL=")
    fi
  fi

  digest="$(inputs_digest "$file" "$(image_id "$wanted")" "${args[@]}")"
  if [ "$(engine image inspect --format "{{index .Config.Labels \"$INPUTS_LABEL\"}}" "$ref" 2>/dev/null)" = "$digest" ]; then
    say "$ref: current (same Dockerfile, sources, base and arguments)"
    continue
  fi
  args+=(--label "$INPUTS_LABEL=$digest")

  # Disk: a trainer image commits ~6 GB layers (peak measured +22 GB); prune dangling images (superseded
  # builds, and with them the build cache) only when short of space, before giving up.
  need=5
  [ "${name#trainer}" != "$name" ] && need="${KILN_IMAGES_MIN_FREE_GB:-25}"
  disk="$root"
  [ "$builder" = podman ] && disk="$state/storage"
  if [ "$(free_gb "$disk")" -lt "$need" ]; then
    say "only $(free_gb "$disk") GB free for $ref (needs $need): pruning dangling images"
    engine image prune --force >/dev/null
    [ "$(free_gb "$disk")" -ge "$need" ] ||
      die "only $(free_gb "$disk") GB free on $(df -P "$disk" | awk 'NR == 2 { print $6 }'), $ref needs $need GB (KILN_IMAGES_MIN_FREE_GB)"
  fi

  # The replaced image is left untagged, never removed here: podman 4.3's rmi also removes the untagged
  # images it grew from (the build cache, measured), so only the low-disk prune above reclaims it.
  old="$(image_id "$ref")"
  start=$(date +%s)
  engine build "${build_flags[@]}" "${args[@]}" . >"$state/build-$name.log" 2>&1 ||
    die "building $ref failed (last lines of $state/build-$name.log):$(tail -n 5 "$state/build-$name.log" | sed 's/^/ | /' | tr '\n' ' ')"
  new="$(image_id "$ref")"
  size="$(engine image inspect --format '{{.Size}}' "$ref" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
  short="${new#sha256:}"
  say "$ref: ${short:0:12} $size, $(($(date +%s) - start))s$([ "$old" = "$new" ] && echo ', unchanged')"
done

# --- export ------------------------------------------------------------------------------------------------
if [ -n "$export_dir" ]; then
  mkdir -p "$export_dir"
  export_dir="$(cd "$export_dir" && pwd)"
  for name in "${images[@]}"; do
    ref="docker.io/library/kiln-$name:$version"
    id="$(image_id "$ref")"
    tar="$export_dir/kiln-$name.tar"
    if [ -f "$tar" ] && [ "$(cat "$export_dir/kiln-$name.id" 2>/dev/null)" = "$id" ]; then
      continue
    fi
    start=$(date +%s)
    rm -f "$export_dir/kiln-$name.id" "$tar.tmp"
    if [ "$builder" = podman ]; then
      engine save --quiet --format oci-archive --output "$tar.tmp" "$ref"
    else
      engine save --output "$tar.tmp" "$ref" >/dev/null
    fi
    mv "$tar.tmp" "$tar"
    echo "$id" >"$export_dir/kiln-$name.id"
    say "exported $ref to $tar ($(du -m "$tar" | cut -f1) MB, $(($(date +%s) - start))s)"
  done
  echo "$export_dir"
fi
