"""ClusterIP balancing with real packets: client and pods in namespaces, lbctl on the node.

Every test runs the real agent (`lbctl run --manifests DIR`) in the node's
namespace, with tx checksum offload off on the senders unless said
otherwise, and a conntrack INVALID drop rule in the node's FORWARD chain as
real nodes have.
"""

from __future__ import annotations

import collections
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbctl.datapath.ebpf.maps import Maps
from tests import k8s_yaml, netlab
from tests.agent_proc import AgentProcess, lbctl
from tests.netlab import (
    Cluster,
    Lab,
    RequestError,
    TcpServer,
    TcpSession,
    UdpServer,
    build_cluster,
    tcp_request,
    udp_request,
)

pytestmark = pytest.mark.netns

VIP = "10.96.0.10"
PORTS = [("http", "TCP", 80), ("dns", "UDP", 53)]
TARGET_PORTS = [("http", "TCP", 8080), ("dns", "UDP", 5353)]


class Env:
    def __init__(self, cluster: Cluster, agent: AgentProcess, manifests: Path) -> None:
        self.cluster = cluster
        self.agent = agent
        self.manifests = manifests
        self.servers: dict[str, TcpServer] = {}

    @property
    def client(self) -> object:
        return self.cluster.client

    def publish(self, pods: list[str] | None = None) -> None:
        ips = [p.ip for p in self.cluster.pods if pods is None or p.name in pods]
        k8s_yaml.write(
            self.manifests / "web.yaml",
            k8s_yaml.service("web", VIP, PORTS),
            k8s_yaml.endpoint_slice("web", ips, TARGET_PORTS),
        )

    def wait_backends(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frontends = self.agent.dump()["frontends"]
            if frontends and all(len(f["backends"]) == count for f in frontends):
                return
            time.sleep(0.05)
        raise AssertionError(f"backends never became {count}: {self.agent.dump()}")


def start_env(tmp_path: Path, pin_dir: Path, lab: Lab, offload: bool = False) -> Env:
    cluster = build_cluster(lab, pods=3, offload=offload)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    agent = AgentProcess(cluster.node, manifests, pin_dir, tmp_path / "agent.log")
    env = Env(cluster, agent, manifests)
    for pod in cluster.pods:
        env.servers[pod.name] = TcpServer(pod, 8080)
        UdpServer(pod, 5353)
    env.publish()
    agent.start()
    agent.wait_for_log("synced:")
    return env


@pytest.fixture
def env(tmp_path: Path, pin_dir: Path) -> Iterator[Env]:
    with Lab() as lab:
        e = start_env(tmp_path, pin_dir, lab)
        try:
            yield e
        finally:
            e.agent.stop()


def spread(replies: list[str]) -> dict[str, float]:
    counts = collections.Counter(replies)
    return {pod: counts[pod] / len(replies) for pod in ("pod0", "pod1", "pod2")}


@pytest.mark.parametrize("offload", [False, True], ids=["offload-off", "offload-on"])
def test_tcp_and_udp_spread_over_all_pods(tmp_path: Path, pin_dir: Path, offload: bool) -> None:
    with Lab() as lab:
        env = start_env(tmp_path, pin_dir, lab, offload=offload)
        try:
            client = env.cluster.client
            tcp = [tcp_request(client, VIP, 80) for _ in range(300)]
            # udp_request checks the reply comes from VIP:53 (reverse NAT)
            udp = [udp_request(client, VIP, 53) for _ in range(300)]
            counters = env.agent.dump()["counters"]
        finally:
            env.agent.stop()
    for replies in (tcp, udp):
        shares = spread([r.pod for r in replies])
        assert min(shares.values()) >= 0.15, shares
        # a ClusterIP reached from a pod keeps the client's address
        assert {r.peer_ip for r in replies} == {client.ip}
    # nearly every request was a new flow (a client port reused within the
    # conntrack lifetime continues its flow), and NATed packets bypassed the stack
    assert counters["new_flows"] >= 550
    assert counters["reverse_nat"] >= 600
    assert counters["redirected"] >= counters["new_flows"] + counters["reverse_nat"]
    assert counters["drop_no_backend"] == 0


def test_removed_backend_keeps_its_connection(env: Env) -> None:
    client = env.cluster.client
    with TcpSession(client, VIP, 80) as session:
        victim = session.ask("first").pod
        env.publish([p.name for p in env.cluster.pods if p.name != victim])
        env.wait_backends(2)
        for i in range(20):
            assert session.ask(f"still there {i}").pod == victim
        fresh = [tcp_request(client, VIP, 80).pod for _ in range(60)]
        assert victim not in fresh
        assert len(set(fresh)) == 2
        assert session.ask("last").pod == victim


def test_deleting_the_service_stops_translation(env: Env) -> None:
    client = env.cluster.client
    assert tcp_request(client, VIP, 80).pod.startswith("pod")
    accepted = sum(s.accepted for s in env.servers.values())
    (env.manifests / "web.yaml").unlink()
    deadline = time.monotonic() + 5
    while env.agent.dump()["frontends"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env.agent.dump()["frontends"] == []
    with pytest.raises(RequestError):
        tcp_request(client, VIP, 80, timeout=1.0)
    with pytest.raises(RequestError):
        udp_request(client, VIP, 53, timeout=1.0)
    assert sum(s.accepted for s in env.servers.values()) == accepted


def test_manifest_change_reaches_the_maps_within_a_second(env: Env) -> None:
    maps = Maps.open_pinned(env.agent.pin_dir)
    try:
        from lbctl.datapath.ebpf import layout

        key = layout.new(
            "struct lb4_key", addr=layout.ip4("10.96.0.11"), port=layout.port(8000), proto=6
        )
        assert maps.lb4_services.lookup(key) is None
        started = time.monotonic()
        k8s_yaml.write(
            env.manifests / "api.yaml",
            k8s_yaml.service("api", "10.96.0.11", [("http", "TCP", 8000)]),
            k8s_yaml.endpoint_slice("api", [env.cluster.pods[1].ip], [("http", "TCP", 8080)]),
        )
        while maps.lb4_services.lookup(key) is None and time.monotonic() - started < 5:
            time.sleep(0.005)
        elapsed = time.monotonic() - started
    finally:
        maps.close()
    assert elapsed < 1.0, f"the change took {elapsed:.2f} s to reach the datapath"
    assert tcp_request(env.cluster.client, "10.96.0.11", 8000).pod == "pod1"


BAD_FILES = {
    "broken.yaml": ("apiVersion: v1\nkind: Service\nmetadata: {name: [oops\n", "cannot parse"),
    "badip.yaml": (
        k8s_yaml.service("badip", "10.96.0.300", [("http", "TCP", 80)]),
        "Service test/badip: spec.clusterIPs[0]: '10.96.0.300' is not a valid IP address",
    ),
    "badport.yaml": (
        k8s_yaml.service("badport", "10.96.0.12", [("http", "TCP", 70000)]),
        "Service test/badport: spec.ports[0].port: 70000 is out of range (1-65535)",
    ),
    "badproto.yaml": (
        k8s_yaml.service("badproto", "10.96.0.13", [("http", "ICMP", 80)]),
        "Service test/badproto: spec.ports[0].protocol: unknown protocol 'ICMP'",
    ),
}


def test_bad_manifests_are_reported_and_the_rest_keeps_working(env: Env) -> None:
    for name, (content, _) in BAD_FILES.items():
        path = env.manifests / name
        if isinstance(content, str):
            path.write_text(content)
        else:
            k8s_yaml.write(path, content)
    for name, (_, message) in BAD_FILES.items():
        env.agent.wait_for_log(message, timeout=5)
        line = next(li for li in env.agent.log_text().splitlines() if message in li)
        assert str(env.manifests / name) in line, line
    # the agent is alive, the good service still has its backends and serves
    assert env.agent.proc is not None and env.agent.proc.poll() is None
    assert [f["service"] for f in env.agent.dump()["frontends"]] == ["test/web", "test/web"]
    replies = {tcp_request(env.cluster.client, VIP, 80).pod for _ in range(30)}
    assert replies == {"pod0", "pod1", "pod2"}
    assert udp_request(env.cluster.client, VIP, 53).pod.startswith("pod")


def test_maps_dump_shows_services_and_backends(env: Env) -> None:
    data = env.agent.dump()
    by_port = {f["port"]: f for f in data["frontends"]}
    assert set(by_port) == {53, 80}
    http = by_port[80]
    assert (http["service"], http["port_name"], http["address"], http["protocol"]) == (
        "test/web",
        "http",
        VIP,
        "TCP",
    )
    assert sorted((b["address"], b["port"], b["state"]) for b in http["backends"]) == [
        (p.ip, 8080, "ready") for p in env.cluster.pods
    ]
    assert data["maps"]["lb4_services"] == {"entries": 2, "capacity": 65536}
    table = lbctl("maps", "dump", "--bpffs", str(env.agent.pin_dir)).stdout
    header, first = table.splitlines()[:2]
    assert header.split() == [
        "SERVICE",
        "PORT",
        "KIND",
        "FRONTEND",
        "PROTO",
        "SCHED",
        "FLAGS",
        "SLOT",
        "BACKEND",
        "STATE",
        "WHERE",
        "OPEN",
    ]
    assert first.split()[:7] == ["test/web", "dns", "ClusterIP", f"{VIP}:53", "UDP", "random", "-"]
    assert (http["scheduler"], http["affinity_timeout_s"], http["table"]) == ("random", 0, None)


def test_new_interfaces_are_attached_and_cleanup_detaches(env: Env) -> None:
    node = env.cluster.node

    def filtered() -> set[str]:
        out = set()
        for line in node.ip("-o", "link", "show").stdout.splitlines():
            ifname = line.split(":")[1].strip().split("@")[0]
            if (
                ifname != "lo"
                and "lbctl_tc_ingress"
                in node.run("tc", "filter", "show", "dev", ifname, "ingress").stdout
            ):
                out.add(ifname)
        return out

    assert filtered() == {"lxcclient", "lxcpod0", "lxcpod1", "lxcpod2"}

    def wait_attached(name: str) -> None:
        deadline = time.monotonic() + 5
        while name not in filtered() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert name in filtered()

    # a new pod's veth, and an L3 device the Ethernet parser must not be given
    node.ip("tuntap", "add", "mode", "tun", "name", "tun0")
    node.ip("link", "add", "name", "lxcnew", "type", "veth", "peer", "name", "lxcnewp")
    wait_attached("lxcnew")
    assert {"lxcnew", "lxcnewp"} <= filtered()
    assert "tun0" not in filtered()
    # the pod restarts: its veth is made again under the same name
    node.ip("link", "del", "lxcnew")
    node.ip("link", "add", "name", "lxcnew", "type", "veth", "peer", "name", "lxcnewp")
    wait_attached("lxcnew")
    # while the agent runs, cleanup refuses and names it
    busy = lbctl("cleanup", "--bpffs", str(env.agent.pin_dir), node=node, check=False)
    assert env.agent.proc is not None
    assert busy.returncode == 1, busy
    assert f"in use by pid {env.agent.proc.pid} " in busy.stderr
    assert "--force" in busy.stderr
    assert (env.agent.pin_dir / "lb4_services").exists() and "lxcnew" in filtered()
    env.agent.stop()
    assert filtered() == set()
    assert not env.agent.pin_dir.exists()


def test_service_without_endpoints_is_rejected_at_once(env: Env) -> None:
    """A reset for TCP and an ICMP port unreachable for UDP, as kube-proxy rejects."""
    k8s_yaml.write(
        env.manifests / "empty.yaml",
        k8s_yaml.service("empty", "10.96.0.20", PORTS),
        k8s_yaml.endpoint_slice("empty", [], TARGET_PORTS),
    )
    deadline = time.monotonic() + 5
    while len(env.agent.dump()["frontends"]) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    client = env.cluster.client.ns

    started = time.monotonic()
    with client.open_socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.settimeout(5)
        with pytest.raises(ConnectionRefusedError):
            tcp.connect(("10.96.0.20", 80))
    assert time.monotonic() - started < 1.0, "the connection hung instead of being reset"

    unreachable_before = netlab.snmp_counters(client)["Icmp.InDestUnreachs"]
    with client.open_socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        udp.connect(("10.96.0.20", 53))
        udp.send(b"query")
        with pytest.raises(ConnectionRefusedError):  # the ICMP error, reported on the socket
            udp.recv(100)
    assert netlab.snmp_counters(client)["Icmp.InDestUnreachs"] == unreachable_before + 1
    assert env.agent.dump()["counters"]["rejected_no_backend"] == 2
    # the service with endpoints is not affected
    assert tcp_request(env.cluster.client, VIP, 80).pod.startswith("pod")


def test_a_program_removed_by_hand_is_attached_again_at_the_periodic_sync(
    tmp_path: Path, pin_dir: Path
) -> None:
    config = tmp_path / "lbctl.yaml"
    config.write_text("apiVersion: lbctl.io/v1alpha1\nkind: LbctlConfiguration\nsyncPeriod: 1s\n")
    with Lab() as lab:
        cluster = build_cluster(lab, pods=1)
        manifests = tmp_path / "manifests"
        manifests.mkdir()
        TcpServer(cluster.pods[0], 8080)
        k8s_yaml.write(
            manifests / "web.yaml",
            k8s_yaml.service("web", VIP, PORTS),
            k8s_yaml.endpoint_slice("web", [cluster.pods[0].ip], TARGET_PORTS),
        )
        agent = AgentProcess(
            cluster.node, manifests, pin_dir, tmp_path / "agent.log", "--config", str(config)
        )
        agent.start()
        try:
            agent.wait_for_log("synced:")
            assert tcp_request(cluster.client, VIP, 80).pod == "pod0"
            node = cluster.node
            node.run("tc", "filter", "del", "dev", "lxcclient", "ingress")
            assert (
                "lbctl_tc_ingress"
                not in node.run("tc", "filter", "show", "dev", "lxcclient", "ingress").stdout
            )
            agent.wait_for_log("re-attaching", timeout=20)
            deadline = time.monotonic() + 10  # the warning comes just before the attach
            while (
                "lbctl_tc_ingress"
                not in node.run("tc", "filter", "show", "dev", "lxcclient", "ingress").stdout
            ):
                assert time.monotonic() < deadline, "the filter was never attached again"
                time.sleep(0.05)
            assert tcp_request(cluster.client, VIP, 80).pod == "pod0"
            status = lbctl(
                "status",
                "-o",
                "json",
                "--timeout",
                "10",
                "--bpffs",
                str(pin_dir),
                node=node,
                check=False,
            )
            assert "removed from lxcclient (tc ingress) by something else" in status.stdout
            # the egress program too: `lbctl status` says so while it is missing
            node.run("tc", "filter", "del", "dev", "lxcpod0", "egress")
            agent.wait_for_log("lxcpod0 (tc egress)", timeout=20)
            deadline = time.monotonic() + 10
            while (
                "lbctl_tc_egress"
                not in node.run("tc", "filter", "show", "dev", "lxcpod0", "egress").stdout
            ):
                assert time.monotonic() < deadline, "the egress filter was never attached again"
                time.sleep(0.05)
        finally:
            agent.stop()
