#!/usr/bin/env bash
# `make demo`: a one-node cluster in network namespaces, balanced by lbctl.
#
#   client pod (10.244.0.10) --veth-- node --veth-- pod0..pod2 (10.244.0.20-22)
#
# lbctl runs in the node namespace on the manifests in examples/, and the
# client asks the ClusterIP 10.96.0.10:80 thirty times. Everything the demo
# makes (namespaces, processes, pinned maps, files) is removed at the end, also
# on failure or Ctrl-C. LBCTL_DEMO_NAME (default lbdemo) starts the namespaces'
# names, and LBCTL_DEMO_PIN (default /sys/fs/bpf/lbctl-demo) is the bpffs
# directory, so that a test (tests/test_demo.py) runs it apart from a user's.
set -euo pipefail
cd "$(dirname "$0")/.."

P=${LBCTL_DEMO_NAME:-lbdemo}
PODS=(pod0 pod1 pod2)
PIN=${LBCTL_DEMO_PIN:-/sys/fs/bpf/lbctl-demo}
WORK=$(mktemp -d)
PIDS=()
LBCTL="$PWD/.venv/bin/lbctl"

cleanup() {
  set +e
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  if [ -e "/run/netns/$P-node" ]; then
    nsenter --net="/run/netns/$P-node" "$LBCTL" --log-level error cleanup --bpffs "$PIN" >/dev/null
  fi
  for ns in node client "${PODS[@]}"; do ip netns del "$P-$ns" 2>/dev/null; done
  rm -rf "$WORK" "$PIN"
}
trap cleanup EXIT
cleanup  # a demo killed earlier may have left its namespaces behind
trap cleanup EXIT

in_ns() { ip netns exec "$P-$1" "${@:2}"; }

echo "== building the cluster: a node, a client pod, three backend pods"
ip netns add "$P-node"
in_ns node ip link set lo up
in_ns node sysctl -qw net.ipv4.ip_forward=1
pod() {  # pod NAME IP
  ip netns add "$P-$1"
  in_ns "$1" ip link set lo up
  ip link add "lxc$1" netns "$P-node" type veth peer name eth0 netns "$P-$1"
  in_ns node ip link set "lxc$1" up
  in_ns node ip addr add 10.244.0.1/32 dev "lxc$1"
  in_ns node ip route add "$2/32" dev "lxc$1"
  in_ns "$1" ip link set eth0 up
  in_ns "$1" ip addr add "$2/32" dev eth0
  in_ns "$1" ip route add 10.244.0.1 dev eth0 scope link
  in_ns "$1" ip route add default via 10.244.0.1 dev eth0
}
pod client 10.244.0.10
for i in 0 1 2; do
  name=${PODS[$i]}
  pod "$name" "10.244.0.2$i"
  mkdir -p "$WORK/$name"
  echo "hello from $name (10.244.0.2$i)" > "$WORK/$name/index.html"
  # not through in_ns: `in_ns ... &` forks a subshell for the function, and $!
  # would be that subshell's PID, not the server's (`ip netns exec` execs it)
  ip netns exec "$P-$name" /usr/bin/python3 -m http.server 8080 --bind 0.0.0.0 \
    --directory "$WORK/$name" >/dev/null 2>&1 &
  PIDS+=($!)
done

echo "== starting: lbctl run --manifests examples/ (in the node namespace; socket hooks off: the demo leaves the host's cgroups alone)"
nsenter --net="/run/netns/$P-node" "$LBCTL" run --manifests examples/ --bpffs "$PIN" --cgroup "" \
  2> "$WORK/agent.log" &
PIDS+=($!)
for _ in $(seq 1 100); do
  if "$LBCTL" --log-level error maps dump -o json --bpffs "$PIN" 2>/dev/null \
      | grep -q '"address": "10.244.0.2'; then
    break
  fi
  sleep 0.2
done
sed 's/^/   agent: /' "$WORK/agent.log"

echo "== 30 requests from the client pod to http://10.96.0.10/ (random backend choice)"
for _ in $(seq 1 30); do
  in_ns client curl -s --max-time 2 http://10.96.0.10/ || echo "request failed"
done > "$WORK/replies"
head -n 5 "$WORK/replies" | sed 's/^/   /'
echo "   ..."
echo "== which pod answered, out of 30"
sort "$WORK/replies" | uniq -c | sed 's/^ */   /'

NODE=(nsenter --net="/run/netns/$P-node")
echo "== lbctl maps dump services"
"$LBCTL" maps dump services --bpffs "$PIN" | sed 's/^/   /'
echo "== lbctl maps dump conntrack --service demo/web (the newest 5 flows)"
"$LBCTL" maps dump conntrack --service demo/web --bpffs "$PIN" | head -n 6 | sed 's/^/   /'
echo "== lbctl maps dump counters"
"$LBCTL" maps dump counters --bpffs "$PIN" | awk 'NR == 1 || $2 != 0' | sed 's/^/   /'
echo "== lbctl trace --src 10.244.0.10:40000 --dst 10.96.0.10:80 (in the node namespace)"
"${NODE[@]}" "$LBCTL" trace --src 10.244.0.10:40000 --dst 10.96.0.10:80 --bpffs "$PIN" \
  | sed 's/^/   /'
echo "== lbctl status (in the node namespace)"
"${NODE[@]}" "$LBCTL" status --bpffs "$PIN" | sed 's/^/   /'
echo "== cleaning up"
