#!/usr/bin/env bash
# Install everything lbctl needs on Debian 12, as root. Idempotent: each step
# checks first and does nothing when its part is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  python3-bpfcc libbpfcc libbpf1 bpftool   # bcc compiles the programs; libbpf for map calls
  python3-venv python3-dev                 # the venv that sees bcc
  iproute2 ethtool iptables nftables       # namespaces, veths, tc; netfilter for the tests
  linux-headers-amd64                      # bcc needs kernel headers
  gcc nginx python3-matplotlib             # make bench: load generator, backends, chart
  user-mode-linux kmod ipvsadm             # a kernel with IPVS for the IPVS fallback's tests
  libcap2-bin                              # capsh: the mode probe's tests drop capabilities
  podman buildah runc debootstrap          # make image, and the test that runs the image
)
# Installed without their Recommends: prometheus would bring node-exporter, a
# second service the tests do not use.
DEB_PACKAGES_ALONE=(
  prometheus                               # promtool, and a real server for tests/test_prometheus.py
)

missing=() alone=()
for pkg in "${DEB_PACKAGES[@]}" "${DEB_PACKAGES_ALONE[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    if [[ " ${DEB_PACKAGES_ALONE[*]} " == *" $pkg "* ]]; then alone+=("$pkg"); else missing+=("$pkg"); fi
  fi
done
if [ ${#missing[@]} -gt 0 ] || [ ${#alone[@]} -gt 0 ]; then
  echo "deps: installing Debian packages: ${missing[*]} ${alone[*]}"
  apt-get update -q
  # nginx and prometheus are services: installing them must not start them on the
  # host (the tests run their own, inside test namespaces). Deny service starts
  # for the duration unless a policy is already in place (container images ship
  # one), and leave the services this run installed disabled at boot too.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  fi
  if [ ${#alone[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${alone[@]}"
  fi
  if command -v systemctl >/dev/null; then  # works without systemd running too
    for service in nginx prometheus; do
      if [[ " ${missing[*]} ${alone[*]} " == *" $service "* ]]; then
        systemctl disable --quiet "$service.service" || true
      fi
    done
  fi
fi

# kubectl, to render deploy/ (`kubectl kustomize`) in the tests: Debian's when
# the machine has none.
if ! command -v kubectl >/dev/null; then
  echo "deps: installing Debian's kubectl (kubernetes-client)"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q kubernetes-client
fi

# bcc looks for headers at /lib/modules/$(uname -r)/{build,source}. When the
# running kernel ships none, point them at Debian's newest header packages
# (the uapi that tc programs use is stable across these versions).
kver=$(uname -r)
if [ ! -e "/lib/modules/$kver/build/include" ]; then
  arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$arch_dir" ] || [ -z "$common_dir" ]; then
    echo "deps: no kernel headers under /usr/src; install linux-headers-amd64" >&2
    exit 1
  fi
  echo "deps: linking /lib/modules/$kver/{build,source} to $arch_dir and $common_dir"
  mkdir -p "/lib/modules/$kver"
  ln -sfn "$arch_dir" "/lib/modules/$kver/build"
  ln -sfn "$common_dir" "/lib/modules/$kver/source"
fi

# The User-Mode Linux kernel (tests/uml.py) boots with this file system as its
# root, and its modprobe looks in /lib/modules/<its version>: point that at the
# modules the package ships, unless something is there already.
for uml_dir in /usr/lib/uml/modules/*/; do
  [ -d "$uml_dir" ] || continue
  uml_ver=$(basename "$uml_dir")
  if [ ! -e "/lib/modules/$uml_ver" ] && [ ! -L "/lib/modules/$uml_ver" ]; then
    echo "deps: linking /lib/modules/$uml_ver to $uml_dir (User-Mode Linux's modules)"
    mkdir -p /lib/modules
    ln -s "${uml_dir%/}" "/lib/modules/$uml_ver"
  fi
done

# bpffs, where the maps are pinned.
if ! mountpoint -q /sys/fs/bpf; then
  echo "deps: mounting bpffs on /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

# A venv on Debian's python3 (3.11), which is what bcc's module is built for.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import bcc" 2>/dev/null; then
  echo "deps: creating .venv"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.lbctl-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "deps: installing lbctl and its test extras into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
# The Kubernetes schemas of releases older than the installed kubernetes-validate
# bundles (deploy/ supports 1.24 on): an earlier release's wheel, read in place by
# tests/k8s_schemas.py.
schemas=.venv/share/lbctl-test
if [ ! -f "$schemas/kubernetes_validate-1.30.0-py3-none-any.whl" ]; then
  echo "deps: downloading the Kubernetes 1.24 schemas (kubernetes-validate 1.30.0)"
  mkdir -p "$schemas"
  .venv/bin/pip download -q --disable-pip-version-check --no-deps -d "$schemas" \
    kubernetes-validate==1.30.0
fi
