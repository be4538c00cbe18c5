"""Pods reaching Services whose endpoints are outside the pod network, with real packets.

The world of tests/extlab.py, plus what a real node has and a real cluster needs:

- an API host (192.168.50.10) beside node A, that routes to node A's address
  and nowhere else: no route to the pod CIDR, as a control plane outside the
  pod network. The `kubernetes` Service (10.96.0.1) has its endpoint there,
  without a nodeName, as the API server's endpoints are;
- a server in node A's own network namespace (a hostNetwork pod), the
  endpoint of the Service `hostsvc` at node A's address;
- on node A, a CNI's masquerade rule (`-s podCIDR ! -d podCIDR -j
  MASQUERADE`), conntrack INVALID drop rules on INPUT and FORWARD, strict
  rp_filter, and tx checksum offload off on every sender (the pods, the API
  host, and node A's interfaces, from which node A's own replies leave);
  pods routed as Calico wires them (a /32 per veth) and, in one test, a pod
  behind a bridge (cni0) with bridged frames through iptables, as the
  issue's bridge CNI wires it.

lbctl's tc program forwards a balanced packet itself (bpf_fib_lookup +
bpf_redirect_neigh), past the node's netfilter and so past the CNI's
masquerade: lbctl must masquerade a pod's flow to an endpoint outside the pod
network itself, and translate back the replies that node A's own stack sends
(they pass no ingress hook), with its tc egress hook.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import extlab, k8s_yaml, netlab
from tests.agent_proc import AgentProcess, lbctl
from tests.extlab import CLIENT_IP, NODE_A, NODE_IP, World
from tests.netlab import Lab, Netns, Pod, TcpServer, UdpServer, tcp_request, udp_request

pytestmark = pytest.mark.netns

API_HOST_IP = "192.168.50.10"
API_LINK_IP = "192.168.50.1"  # node A's side of the link to the API host
NODE_POD_CIDR = "10.244.0.0/24"  # node A's spec.podCIDRs
KUBERNETES_IP = "10.96.0.1"
HOSTSVC_IP = "10.96.0.2"
WEB_IP = "10.96.0.50"
HOSTSVC_NODE_PORT = 30443
API_PORTS = [("https", "TCP", 443), ("dns", "UDP", 53)]
API_TARGETS = [("https", "TCP", 6443), ("dns", "UDP", 5353)]
HOST_TARGETS = [("https", "TCP", 6443), ("dns", "UDP", 6053)]
POD_TARGETS = [("https", "TCP", 8080), ("dns", "UDP", 5353)]
NAT_PORTS = range(61000, 65536)


class Env:
    def __init__(self, world: World, api: Pod, agent: AgentProcess, manifests: Path) -> None:
        self.world = world
        self.api = api
        self.agent = agent
        self.manifests = manifests


def _api_host(lab: Lab, node: Netns) -> Pod:
    """A host beside node A that can reach node A's address, and no pod."""
    ns = lab.netns("apihost")
    netlab.veth(node, "api0", ns, "eth0")
    node.ip("addr", "add", f"{API_LINK_IP}/24", "dev", "api0")
    ns.ip("addr", "add", f"{API_HOST_IP}/24", "dev", "eth0")
    ns.ip("route", "add", f"{NODE_IP}/32", "via", API_LINK_IP)
    netlab.tx_checksum_offload(ns, "eth0", on=False)
    return Pod(ns=ns, name="apihost", ip=API_HOST_IP, host_if="api0")


def _real_node_rules(node: Netns, pod_cidr: str) -> None:
    """What a real node with a bridge-like CNI has, besides extlab's FORWARD rule."""
    node.run(
        "iptables", "-t", "nat", "-A", "POSTROUTING",
        "-s", pod_cidr, "!", "-d", pod_cidr, "-j", "MASQUERADE",
    )  # fmt: skip
    node.run("iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
    node.sysctl("net.ipv4.conf.all.rp_filter", 1)
    node.sysctl("net.ipv4.conf.default.rp_filter", 1)
    links = node.run("ls", "/sys/class/net").stdout.split()
    for link in links:
        if link != "lo":  # node A's own replies leave with full checksums
            netlab.tx_checksum_offload(node, link, on=False)


def _manifests(path: Path, world: World, with_node_cidr: bool) -> None:
    hostsvc = k8s_yaml.service("hostsvc", HOSTSVC_IP, API_PORTS, type="NodePort")
    for port in hostsvc["spec"]["ports"]:
        port["nodePort"] = HOSTSVC_NODE_PORT + (port["protocol"] == "UDP")
    remote = world.pods_b[0]
    objects = [
        k8s_yaml.service("kubernetes", KUBERNETES_IP, API_PORTS, namespace="default"),
        k8s_yaml.endpoint_slice(
            "kubernetes", [API_HOST_IP], API_TARGETS, namespace="default", nodes={API_HOST_IP: None}
        ),
        hostsvc,
        k8s_yaml.endpoint_slice("hostsvc", [NODE_IP], HOST_TARGETS, nodes={NODE_IP: NODE_A}),
        k8s_yaml.service("web", WEB_IP, API_PORTS),
        k8s_yaml.endpoint_slice("web", [remote.ip], POD_TARGETS, nodes={remote.ip: extlab.NODE_B}),
    ]
    if with_node_cidr:
        objects.append(k8s_yaml.node(NODE_A, addresses=[NODE_IP], pod_cidrs=[NODE_POD_CIDR]))
    k8s_yaml.write(path / "objects.yaml", *objects)


def _start(tmp_path: Path, pin_dir: Path, lab: Lab, cluster_cidr: bool, *extra: str) -> Env:
    world = extlab.build(lab, pods_a=0, pods_b=1)
    api = _api_host(lab, world.node_a)
    _real_node_rules(world.node_a, NODE_POD_CIDR)
    node_a = Pod(ns=world.node_a, name="nodea", ip=NODE_IP, host_if="")
    for server_pod, tcp, udp in (
        (api, 6443, 5353),
        (node_a, 6443, 6053),
        (world.pods_b[0], 8080, 5353),
    ):
        TcpServer(server_pod, tcp)
        UdpServer(server_pod, udp)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    _manifests(manifests, world, with_node_cidr=not cluster_cidr)
    flags = extlab.agent_flags()
    if not cluster_cidr:
        at = flags.index("--cluster-cidr")
        del flags[at : at + 2]
    agent = AgentProcess(world.node_a, manifests, pin_dir, tmp_path / "agent.log", *flags, *extra)
    return Env(world, api, agent, manifests)


@pytest.fixture(params=["cluster-cidr", "node-pod-cidr"])
def env(request: pytest.FixtureRequest, tmp_path: Path, pin_dir: Path) -> Iterator[Env]:
    """clusterCIDR set; or empty, with node A's spec.podCIDRs in its Node object."""
    with Lab() as lab:
        e = _start(tmp_path, pin_dir, lab, cluster_cidr=request.param == "cluster-cidr")
        try:
            e.agent.start()
            e.agent.wait_for_log("synced:")
            yield e
        finally:
            e.agent.stop()


def test_a_pod_reaches_the_api_server_outside_the_pod_network_masqueraded(env: Env) -> None:
    """Issue 18, bug 4: the `kubernetes` Service's SYN left as pod IP -> API server,
    and the API host has no route back to the pod CIDR."""
    pod = env.world.pod_client
    for _ in range(5):
        tcp = tcp_request(pod, KUBERNETES_IP, 443, timeout=3.0)
        udp = udp_request(pod, KUBERNETES_IP, 53, timeout=3.0)
        for reply in (tcp, udp):
            assert reply.pod == "apihost"
            assert reply.peer_ip == NODE_IP  # masqueraded to the node's address
            assert reply.peer_port in NAT_PORTS
    counters = env.agent.dump()["counters"]
    assert counters["snat_new"] >= 2 and counters["snat_reverse"] >= 10


def test_a_pod_reaches_a_host_network_endpoint_of_its_own_node(env: Env) -> None:
    """The reply of node A's own stack leaves through the pod's veth: the egress
    hook makes it come from the Service again; the endpoint sees the pod."""
    pod = env.world.pod_client
    for _ in range(5):
        tcp = tcp_request(pod, HOSTSVC_IP, 443, timeout=3.0)
        udp = udp_request(pod, HOSTSVC_IP, 53, timeout=3.0)  # checks the reply's source
        for reply in (tcp, udp):
            assert reply.pod == "nodea"
            assert reply.peer_ip == pod.ip  # delivered locally: nothing to masquerade
    assert env.agent.dump()["counters"]["egress_reverse_nat"] >= 10


def test_an_outside_client_reaches_a_host_network_endpoint_through_a_node_port(
    env: Env,
) -> None:
    """The same from outside: no masquerade (it would make the packet a martian
    with node A's own source), the client's address kept as kube-proxy keeps
    it for an endpoint on the node itself, the reply translated on ext0's egress."""
    client = env.world.client
    for _ in range(3):
        tcp = tcp_request(client, NODE_IP, HOSTSVC_NODE_PORT, timeout=3.0)
        udp = udp_request(client, NODE_IP, HOSTSVC_NODE_PORT + 1, timeout=3.0)
        for reply in (tcp, udp):
            assert reply.pod == "nodea"
            assert reply.peer_ip == CLIENT_IP


def test_a_pod_on_another_node_behind_a_cluster_ip(env: Env) -> None:
    """With the cluster CIDR known, a pod behind a ClusterIP sees the client pod,
    as under kube-proxy; knowing only node A's pod range, lbctl cannot tell
    node B's pods from hosts outside, and masquerades as the CNI's rule would."""
    pod = env.world.pod_client
    tcp = tcp_request(pod, WEB_IP, 443, timeout=3.0)
    udp = udp_request(pod, WEB_IP, 53, timeout=3.0)
    node = env.agent.dump()["node"]
    for reply in (tcp, udp):
        assert reply.pod == "b0"
        if node["cluster_cidrs"] == [extlab.CLUSTER_CIDR]:
            assert reply.peer_ip == pod.ip
        else:
            assert node["cluster_cidrs"] == [NODE_POD_CIDR]
            assert reply.peer_ip == NODE_IP


def test_the_xdp_fast_path_leaves_these_flows_to_tc(tmp_path: Path, pin_dir: Path) -> None:
    """With XDP on the external interface: an outside client's flow to the node
    itself goes to tc (the FIB says local), and the API server's replies to a
    masqueraded pod flow arrive on api0, where no XDP program runs."""
    with Lab() as lab:
        env = _start(
            tmp_path, pin_dir, lab, True, "--xdp", "generic", "--external-interfaces", "ext0"
        )
        try:
            env.agent.start()
            env.agent.wait_for_log("synced:")
            client, pod = env.world.client, env.world.pod_client
            for _ in range(3):
                assert tcp_request(client, NODE_IP, HOSTSVC_NODE_PORT, timeout=3.0).peer_ip == (
                    CLIENT_IP
                )
                assert udp_request(client, NODE_IP, HOSTSVC_NODE_PORT + 1).peer_ip == CLIENT_IP
                assert tcp_request(pod, KUBERNETES_IP, 443, timeout=3.0).peer_ip == NODE_IP
            counters = env.agent.dump()["counters"]
            assert counters["xdp_to_tc"] >= 2 and counters["egress_reverse_nat"] >= 6
        finally:
            env.agent.stop()


def test_trace_status_and_dump_tell_what_happens(env: Env) -> None:
    """`lbctl trace` says a pod's flow to the API server is masqueraded and why,
    and that the node's own endpoint is answered through the egress hook;
    `lbctl maps dump` shows where each backend is and where the CIDRs came from;
    `lbctl status` shows the egress program on every interface."""
    pod = env.world.pod_client
    node, pin = env.world.node_a, ["--bpffs", str(env.agent.pin_dir)]
    run = ("trace", *pin, "--address", "127.0.0.1:1", "--timeout", "1")
    api = lbctl(*run, "--src", pod.ip, "--dst", f"{KUBERNETES_IP}:443", node=node, check=False)
    assert api.returncode == 0, api.stderr
    verdict = api.stdout.strip().splitlines()[-1]
    assert verdict.startswith("VERDICT  forward: "), verdict
    assert f"masqueraded as {NODE_IP} (a pod " in verdict, verdict
    assert f"reaching {API_HOST_IP}, outside " in verdict
    own = lbctl(*run, "--src", pod.ip, "--dst", f"{HOSTSVC_IP}:443", node=node, check=False)
    assert own.returncode == 0, own.stderr
    assert "client address kept" in own.stdout.splitlines()[-1]
    assert "tc egress hook (lbctl_tc_egress)" in own.stdout

    data = env.agent.dump()
    where = {
        (fe["address"], be["address"]): be["placement"]
        for fe in data["frontends"]
        for be in fe["backends"]
    }
    assert where[(KUBERNETES_IP, API_HOST_IP)] == "outside-pod-network"
    assert where[(HOSTSVC_IP, NODE_IP)] == "this-node"
    remote = env.world.pods_b[0].ip
    with_cidr = data["node"]["cluster_cidrs"] == [extlab.CLUSTER_CIDR]
    assert where[(WEB_IP, remote)] == ("pod-network" if with_cidr else "outside-pod-network")
    assert data["node"]["cluster_cidrs_from"] == (
        "clusterCIDR" if with_cidr else "the Node's spec.podCIDRs"
    )
    table = lbctl("maps", "dump", "services", *pin, node=node).stdout
    assert any(
        row.split()[-3:-1] == ["ready", "node"] and f"{NODE_IP}:6443" in row
        for row in table.splitlines()
    ), table

    report = json.loads(lbctl("status", "-o", "json", *pin, node=node, check=False).stdout)
    hooks = {
        i["name"]: {p["hook"] for p in i["programs"] if p["owner"] == "lbctl"}
        for i in report["kernel"]["interfaces"]
    }
    assert hooks["lxcpc"] == hooks["api0"] == hooks["ext0"] == {"tc ingress", "tc egress"}


def _bridged_pod(lab: Lab, node: Netns) -> Pod:
    """A pod behind a bridge, as the bridge CNI of the issue's node wires it: its
    veth a port of cni0 (which holds the gateway), bridged frames through
    iptables (br_netfilter's bridge-nf-call-iptables, as Kubernetes asks)."""
    node.ip("link", "add", "cni0", "type", "bridge")
    node.ip("addr", "add", "10.244.0.129/25", "dev", "cni0")
    node.ip("link", "set", "cni0", "up")
    node.sysctl("net.bridge.bridge-nf-call-iptables", 1)
    ns = lab.netns("bpod")
    netlab.veth(node, "vethbpod", ns, "eth0")
    node.ip("link", "set", "vethbpod", "master", "cni0")
    ns.ip("addr", "add", "10.244.0.140/25", "dev", "eth0")
    ns.ip("route", "add", "default", "via", "10.244.0.129")
    netlab.tx_checksum_offload(ns, "eth0", on=False)
    for link in ("cni0", "vethbpod"):
        netlab.tx_checksum_offload(node, link, on=False)
    return Pod(ns=ns, name="bpod", ip="10.244.0.140", host_if="vethbpod")


def test_a_pod_behind_a_bridge_cni(tmp_path: Path, pin_dir: Path) -> None:
    """The same three Services from a pod on a bridge: the node's replies leave
    through cni0 and then the pod's port, each with lbctl's egress program."""
    with Lab() as lab:
        env = _start(tmp_path, pin_dir, lab, True)
        pod = _bridged_pod(lab, env.world.node_a)
        try:
            env.agent.start()
            env.agent.wait_for_log("synced:")
            deadline = time.monotonic() + 10  # the agent attaches new links every second
            while (
                "lbctl_tc_ingress"
                not in env.world.node_a.run(
                    "tc", "filter", "show", "dev", "vethbpod", "ingress"
                ).stdout
            ):
                assert time.monotonic() < deadline, "vethbpod never got lbctl's program"
                time.sleep(0.1)
            for _ in range(3):
                for ask in (tcp_request, udp_request):
                    port = 443 if ask is tcp_request else 53
                    api = ask(pod, KUBERNETES_IP, port, timeout=3.0)
                    assert (api.pod, api.peer_ip) == ("apihost", NODE_IP)
                    own = ask(pod, HOSTSVC_IP, port, timeout=3.0)
                    assert (own.pod, own.peer_ip) == ("nodea", pod.ip)
                    web = ask(pod, WEB_IP, port, timeout=3.0)
                    assert (web.pod, web.peer_ip) == ("b0", pod.ip)
            assert env.agent.dump()["counters"]["egress_reverse_nat"] >= 6
        finally:
            env.agent.stop()
