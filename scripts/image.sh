#!/usr/bin/env bash
# `make image`: build deploy/Dockerfile with the OCI tool this machine has.
#
#   scripts/image.sh [--iidfile FILE]
#
# Tool: docker when its engine answers (`docker info`), else podman, else
# buildah (IMAGE_TOOL=docker|podman|buildah picks one). The image is tagged
# $IMAGE (default lbctl:<version>); --iidfile writes its id, which names this
# build even when another build re-tags $IMAGE meanwhile (the tests run by id).
#
# Base: no registry is needed. Unless BASE names an image to build from, the
# base is made here from Debian's packages (debootstrap --variant=minbase
# bookworm, trimmed as Debian's slim images are: no docs, manual pages,
# translations, apt lists or downloaded packages) and imported as
# $LOCAL_BASE; it is made once and kept, like the build's layer cache, so
# later builds redo only the layers whose inputs changed. `podman rmi
# localhost/lbctl-base:bookworm` (or the tool's equivalent) forces a new one,
# with Debian's newest packages.
#
# RUN steps use the host's network, with the host's CA bundle mounted at
# /run/host-ssl-certs and a copy of the host's pip settings pointing there
# (podman, buildah): pip inside the build then trusts what the host trusts.
set -euo pipefail
cd "$(dirname "$0")/.."

iidfile=""
while [ $# -gt 0 ]; do
  case "$1" in
    --iidfile) iidfile=$2; shift 2 ;;
    *) echo "image: unknown argument $1 (usage: scripts/image.sh [--iidfile FILE])" >&2; exit 2 ;;
  esac
done

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' lbctl/__init__.py)
IMAGE=${IMAGE:-lbctl:$version}
LOCAL_BASE=localhost/lbctl-base:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

tool=${IMAGE_TOOL:-}
if [ -z "$tool" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    tool=docker
  elif command -v podman >/dev/null; then
    tool=podman
  elif command -v buildah >/dev/null; then
    tool=buildah
  else
    echo "image: no OCI build tool: docker's engine does not answer and neither podman" \
      "nor buildah is installed; run \`make deps\` (it installs Debian's podman, buildah," \
      "runc and debootstrap) or start the Docker engine" >&2
    exit 1
  fi
fi

has_image() {
  case "$tool" in
    docker) docker image inspect "$1" >/dev/null 2>&1 ;;
    podman) podman image exists "$1" ;;
    buildah) buildah inspect --type image "$1" >/dev/null 2>&1 ;;
  esac
}

# The Debian base, made once. A lock keeps two builds from making it together.
make_base() {
  if ! command -v debootstrap >/dev/null; then
    echo "image: debootstrap is missing; run \`make deps\` (or apt-get install debootstrap)" >&2
    exit 1
  fi
  local work
  work=$(mktemp -d)
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" RETURN
  echo "image: making the base $LOCAL_BASE (debootstrap --variant=minbase bookworm, $MIRROR)"
  debootstrap --variant=minbase bookworm "$work/root" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
    tail -n 20 "$work/debootstrap.log" >&2
    echo "image: debootstrap failed (log above)" >&2
    exit 1
  }
  local root=$work/root
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/var/cache/apt/*.bin "$root"/var/log/* "$root"/usr/share/man/* \
    "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/usr/share/lintian/*
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
  # Debian's suites as its images list them: security fixes come with every build
  rm -f "$root/etc/apt/sources.list"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: ${MIRROR}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  : >"$root/etc/hostname"
  rm -f "$root/etc/resolv.conf"
  tar -C "$root" -cf "$work/root.tar" --numeric-owner .
  case "$tool" in
    docker) docker import "$work/root.tar" "$LOCAL_BASE" >/dev/null ;;
    podman) podman import -q "$work/root.tar" "$LOCAL_BASE" >/dev/null ;;
    buildah)
      local ctr
      ctr=$(buildah from scratch)
      buildah add "$ctr" "$work/root.tar" / >/dev/null
      buildah commit -q "$ctr" "$LOCAL_BASE" >/dev/null
      buildah rm "$ctr" >/dev/null
      ;;
  esac
}

base=${BASE:-}
if [ -z "$base" ]; then
  base=$LOCAL_BASE
  lockdir=/var/lock/lbctl
  mkdir -p "$lockdir"
  exec 9>"$lockdir/image-base.lock"
  flock 9
  has_image "$LOCAL_BASE" || make_base
  flock -u 9
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
args=(--build-arg "BASE=$base" -f deploy/Dockerfile -t "$IMAGE" --iidfile "$work/iid" --network host)
if [ "$tool" != docker ]; then
  # the host's trust for pip inside the build (not over the image's own
  # /etc/ssl/certs, which apt-get's ca-certificates step writes)
  pip_conf=$work/pip.conf
  if [ -f /etc/pip.conf ]; then
    grep -v '^[[:space:]]*cert[[:space:]]*=' /etc/pip.conf >"$pip_conf" || true
  fi
  grep -q '^\[global\]' "$pip_conf" 2>/dev/null || echo '[global]' >>"$pip_conf"
  sed -i 's|^\[global\]$|[global]\ncert = /run/host-ssl-certs/ca-certificates.crt|' "$pip_conf"
  args+=(--layers -v /etc/ssl/certs:/run/host-ssl-certs:ro -v "$pip_conf:/etc/pip.conf:ro")
  # RUN steps as chrooted processes of this one: no OCI runtime, so no cgroup of
  # their own (crun refuses a host with cgroup v1 and v2 side by side)
  args+=(--isolation chroot)
  # the two stages at once: the runtime's packages download while pip installs
  args+=(--jobs 2)
fi
case "$tool" in
  docker) ;;
  podman) args+=(--pull=never) ;;
  buildah) args+=(--pull=never) ;;
esac

image_id() {
  case "$tool" in
    docker) docker image inspect --format '{{.Id}}' "$1" 2>/dev/null ;;
    podman) podman image inspect --format '{{.Id}}' "$1" 2>/dev/null ;;
    buildah) buildah inspect --type image --format '{{.FromImageID}}' "$1" 2>/dev/null ;;
  esac
}
previous=$(image_id "$IMAGE" || true)

echo "image: building $IMAGE from $base with $tool"
started=$(date +%s)
case "$tool" in
  docker) docker build "${args[@]}" . ;;
  podman) podman build "${args[@]}" . ;;
  buildah) buildah bud "${args[@]}" . ;;
esac
id=$(cat "$work/iid")
echo "image: built $IMAGE ($id) in $(($(date +%s) - started)) s"
# The image this build replaces under $IMAGE goes (unless a container uses it):
# rebuilds after each change would otherwise pile up on disk.
if [ -n "$previous" ] && [ "${previous#sha256:}" != "${id#sha256:}" ]; then
  case "$tool" in
    docker) docker image rm "$previous" >/dev/null 2>&1 || true ;;
    podman) podman rmi "$previous" >/dev/null 2>&1 || true ;;
    buildah) buildah rmi "$previous" >/dev/null 2>&1 || true ;;
  esac
fi
if [ -n "$iidfile" ]; then
  cp "$work/iid" "$iidfile"
fi
