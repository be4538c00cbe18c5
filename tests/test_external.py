"""Traffic from outside the node, with real packets: NodePort, LoadBalancer IPs,
externalTrafficPolicy, source ranges, masquerade with the NAT table, hairpin.

The world of tests/extlab.py: an outside client, node A running the real agent,
node B over an underlay, pods on both.  Servers answer with their pod name and
the peer address they saw, so every test can tell where a connection landed
and whether it was masqueraded.
"""

from __future__ import annotations

import collections
import resource
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests import extlab, k8s_yaml
from tests.agent_proc import AgentProcess, lbctl
from tests.extlab import CLIENT_IP, LB_IP, NODE_IP, OTHER_CLIENT_IP, World
from tests.netlab import (
    Lab,
    Netns,
    RequestError,
    TcpServer,
    TcpSession,
    UdpServer,
    tcp_request,
    udp_request,
)

pytestmark = pytest.mark.netns

CLUSTER_IP = "10.96.0.50"
NODE_PORT = 30080
PORTS = [("http", "TCP", 80), ("dns", "UDP", 53)]
TARGETS = [("http", "TCP", 8080), ("dns", "UDP", 5353)]


class Env:
    def __init__(self, world: World, agent: AgentProcess, manifests: Path) -> None:
        self.world = world
        self.agent = agent
        self.manifests = manifests

    def publish(self, pods: list[str] | None = None, **spec: object) -> None:
        """The Service `web` (LoadBalancer, NodePort 30080) on the named pods."""
        w = self.world
        chosen = [p for p in w.pods_a + w.pods_b if pods is None or p.name in pods]
        nodes = {p.ip: w.node_of(p) for p in chosen}
        svc = k8s_yaml.service("web", CLUSTER_IP, PORTS, type="LoadBalancer", **spec)
        for port in svc["spec"]["ports"]:
            port["nodePort"] = NODE_PORT if port["protocol"] == "TCP" else NODE_PORT + 1
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
        k8s_yaml.write(
            self.manifests / "web.yaml",
            svc,
            k8s_yaml.endpoint_slice("web", [p.ip for p in chosen], TARGETS, nodes=nodes),
        )


def start(
    tmp_path: Path,
    pin_dir: Path,
    lab: Lab,
    pods_a: int = 2,
    pods_b: int = 2,
    node_a_rules: bool = True,
) -> Env:
    world = extlab.build(lab, pods_a, pods_b, node_a_rules)
    for pod in world.pods_a + world.pods_b:
        TcpServer(pod, 8080)
        UdpServer(pod, 5353)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    agent = AgentProcess(
        world.node_a, manifests, pin_dir, tmp_path / "agent.log", *extlab.agent_flags()
    )
    return Env(world, agent, manifests)


@pytest.fixture
def env(tmp_path: Path, pin_dir: Path) -> Iterator[Env]:
    with Lab() as lab:
        e = start(tmp_path, pin_dir, lab)
        try:
            yield e
        finally:
            e.agent.stop()


def run(env: Env, **spec: object) -> None:
    env.publish(**spec)
    env.agent.start()
    env.agent.wait_for_log("synced:")


def bound_tcp(ns: Netns, source: str, ip: str, port: int, timeout: float = 2.0) -> str:
    """One request from a given source address; the reply line."""
    with ns.open_socket() as sock:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect((ip, port))
        sock.sendall(b"hi\n")
        return sock.recv(1024).decode()


def test_cluster_policy_reaches_both_nodes_masqueraded(env: Env) -> None:
    run(env)
    w = env.world
    everyone = {p.name for p in w.pods_a + w.pods_b}
    for address, tcp_port, udp_port in ((NODE_IP, NODE_PORT, NODE_PORT + 1), (LB_IP, 80, 53)):
        tcp = [tcp_request(w.client, address, tcp_port) for _ in range(80)]
        udp = [udp_request(w.client, address, udp_port) for _ in range(80)]
        for replies in (tcp, udp):
            assert {r.pod for r in replies} == everyone, address
            # every pod saw node A, never the client: the reply must come back through it
            assert {r.peer_ip for r in replies} == {NODE_IP}
            ports = [r.peer_port for r in replies]
            assert all(61000 <= p <= 65535 for p in ports), ports
    counters = env.agent.dump()["counters"]
    # 320 requests; a client port reused within the conntrack lifetime (the
    # kernel picks them at random) continues its flow instead of a new one
    assert counters["snat_new"] >= 300
    assert counters["snat_reverse"] >= 320


def test_maps_dump_decodes_one_services_flows_nat_and_affinity(env: Env) -> None:
    """`lbctl maps dump --service` follows one open, masqueraded flow through
    conntrack, the NAT table and the affinity map, as the backend saw it."""
    run(env, sessionAffinity="ClientIP")
    w = env.world
    ips = {p.name: p.ip for p in w.pods_a + w.pods_b}
    pin = ["--bpffs", str(env.agent.pin_dir)]
    session = TcpSession(w.client, NODE_IP, NODE_PORT)
    try:
        reply = session.ask()
        out = lbctl("maps", "dump", "--service", "test/web", "-o", "yaml", *pin).stdout
    finally:
        session.close()
    data = yaml.safe_load(out)
    assert {fe["service"] for fe in data["frontends"]} == {"test/web"}
    backend = f"{ips[reply.pod]}:8080"
    masquerade = f"{NODE_IP}:{reply.peer.split(':')[1]}"
    [flow] = [f for f in data["flows"] if f["client"] == session.local]
    assert (flow["service"], flow["frontend"], flow["backend"], flow["protocol"]) == (
        "test/web",
        f"{NODE_IP}:{NODE_PORT}",
        backend,
        "TCP",
    )
    assert (flow["masquerade"], flow["state"]) == (masquerade, "established")
    [nat] = [n for n in data["nat"] if n["masquerade"] == masquerade]
    assert (nat["client"], nat["frontend"], nat["backend"]) == (
        session.local,
        f"{NODE_IP}:{NODE_PORT}",
        backend,
    )
    assert 0 <= nat["age_s"] < 30
    [affinity] = [a for a in data["affinity"] if a["frontend"] == f"{NODE_IP}:{NODE_PORT}"]
    assert (affinity["client"], affinity["backend"]) == (CLIENT_IP, backend)
    assert 10_700 < affinity["expires_in_s"] <= 10_800  # the default ClientIP timeout
    # one section by its map's name, as a table
    table = lbctl("maps", "dump", "nat4", "--service", "test/web", *pin).stdout.splitlines()
    assert table[0].split() == ["MASQUERADE", "BACKEND", "PROTO", "CLIENT", "FRONTEND", "AGE"]
    assert any(line.split()[:4] == [masquerade, backend, "TCP", session.local] for line in table)
    # mistakes name the object and the fix, on stderr, with exit code 1
    missing = lbctl("maps", "dump", "--service", "test/nope", *pin, check=False)
    assert missing.returncode == 1 and "service test/nope has no frontend" in missing.stderr
    unknown = lbctl("maps", "dump", "ct6", *pin, check=False)
    assert unknown.returncode == 1 and "no map or section 'ct6'" in unknown.stderr
    assert "nat4" in unknown.stderr


def test_local_policy_keeps_the_client_address_and_this_nodes_pods(env: Env) -> None:
    run(env, externalTrafficPolicy="Local")
    w = env.world
    local = {p.name for p in w.pods_a}
    for address, port in ((NODE_IP, NODE_PORT), (LB_IP, 80)):
        replies = [tcp_request(w.client, address, port) for _ in range(40)]
        assert {r.pod for r in replies} == local
        assert {r.peer_ip for r in replies} == {CLIENT_IP}
        udp = [udp_request(w.client, address, port + 1 if address == NODE_IP else 53)]
        assert udp[0].pod in local and udp[0].peer_ip == CLIENT_IP
    # a pod of the cluster is not outside: it keeps every endpoint, unmasqueraded
    inside = [tcp_request(w.pod_client, LB_IP, 80) for _ in range(60)]
    assert {r.pod for r in inside} == {p.name for p in w.pods_a + w.pods_b}
    assert {r.peer_ip for r in inside} == {w.pod_client.ip}


def test_local_policy_without_local_endpoints_drops_outside_traffic(env: Env) -> None:
    run(env, pods=["b0", "b1"], externalTrafficPolicy="Local")
    w = env.world
    for address, port in ((NODE_IP, NODE_PORT), (LB_IP, 80)):
        started = time.monotonic()
        with pytest.raises(RequestError, match="timed out"):
            tcp_request(w.client, address, port, timeout=1.0)
        assert time.monotonic() - started >= 0.9  # dropped, not refused
    # the same service from a pod still reaches node B's endpoints
    replies = [tcp_request(w.pod_client, LB_IP, 80) for _ in range(20)]
    assert {r.pod for r in replies} == {"b0", "b1"}
    assert env.agent.dump()["counters"]["drop_no_local_endpoint"] >= 2


def test_source_ranges_let_in_only_matching_clients(env: Env) -> None:
    run(env, loadBalancerSourceRanges=[f"{CLIENT_IP}/32", "192.0.2.0/24"])
    w = env.world
    assert bound_tcp(w.client, CLIENT_IP, LB_IP, 80).startswith(("a", "b"))
    with pytest.raises(TimeoutError):
        bound_tcp(w.client, OTHER_CLIENT_IP, LB_IP, 80, timeout=1.0)
    # the ranges guard the LoadBalancer IP, not the NodePort (as kube-proxy)
    assert bound_tcp(w.client, OTHER_CLIENT_IP, NODE_IP, NODE_PORT).startswith(("a", "b"))
    assert env.agent.dump()["counters"]["drop_source_range"] >= 1
    # removing the ranges opens the IP to everyone
    env.publish()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert bound_tcp(w.client, OTHER_CLIENT_IP, LB_IP, 80, timeout=0.5)
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def _icmp_port_unreachable(sock: socket.socket, timeout: float) -> bytes | None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            return None
        packet = sock.recv(2048)
        ihl = (packet[0] & 0x0F) * 4
        if packet[ihl] == 3 and packet[ihl + 1] == 3:
            return packet
    return None


def test_no_endpoints_rejects_from_outside_at_once(env: Env) -> None:
    run(env, pods=[])
    w = env.world
    started = time.monotonic()
    with pytest.raises(RequestError, match="refused"):
        tcp_request(w.client, NODE_IP, NODE_PORT, timeout=3.0)
    assert time.monotonic() - started < 1.0
    # UDP: the ICMP port unreachable itself must arrive at the client
    raw = _raw_icmp(w.client)
    try:
        with w.client.open_socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.connect((LB_IP, 53))
            udp.send(b"anyone?")
            packet = _icmp_port_unreachable(raw, 2.0)
            assert packet is not None, "no ICMP port unreachable arrived"
            ihl = (packet[0] & 0x0F) * 4
            assert socket.inet_ntoa(packet[12:16]) == LB_IP  # from the address asked
            quoted = packet[ihl + 8 :]
            assert socket.inet_ntoa(quoted[16:20]) == LB_IP
            udp.settimeout(1.0)
            with pytest.raises(ConnectionRefusedError):
                udp.recv(100)
    finally:
        raw.close()


def _raw_icmp(ns: Netns) -> socket.socket:
    with ns.entered():
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)


def test_hairpin_pod_reaching_itself_through_its_service(env: Env) -> None:
    run(env, pods=["a0"])
    w = env.world
    a0 = w.pods_a[0]
    for _ in range(5):
        reply = tcp_request(a0, CLUSTER_IP, 80)
        assert reply.pod == "a0"
        assert reply.peer_ip == NODE_IP  # masqueraded, so the reply came back through the node
        udp = udp_request(a0, CLUSTER_IP, 53)
        assert udp.pod == "a0" and udp.peer_ip == NODE_IP


def test_a_thousand_concurrent_connections_through_snat(tmp_path: Path, pin_dir: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    with Lab() as lab:
        env = start(tmp_path, pin_dir, lab, pods_a=0, pods_b=2)
        try:
            run(env)
            sessions = []
            try:
                for _ in range(1000):
                    sessions.append(TcpSession(env.world.client, NODE_IP, NODE_PORT, timeout=5))
                replies = [s.ask("hold") for s in sessions]
            finally:
                for s in sessions:
                    s.close()
            nat = env.agent.dump()["counters"]
        finally:
            env.agent.stop()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(replies) == 1000
    assert {r.peer_ip for r in replies} == {NODE_IP}
    by_pod = collections.defaultdict(set)
    for r in replies:
        by_pod[r.pod].add(r.peer_port)
    # the same NAT port twice towards one backend would be a collision
    assert sum(len(ports) for ports in by_pod.values()) == 1000
    assert set(by_pod) == {"b0", "b1"}
    assert nat["nat_exhausted"] == 0


def test_no_iptables_or_nftables_rule_on_the_node(tmp_path: Path, pin_dir: Path) -> None:
    """Masquerade, policy, source ranges and rejects need no rule: node A has none."""
    with Lab() as lab:
        env = start(tmp_path, pin_dir, lab, node_a_rules=False)
        try:
            run(env, loadBalancerSourceRanges=[f"{CLIENT_IP}/32"])
            w = env.world
            everyone = {p.name for p in w.pods_a + w.pods_b}
            for address, tcp_port, udp_port in (
                (NODE_IP, NODE_PORT, NODE_PORT + 1),
                (LB_IP, 80, 53),
            ):
                assert {tcp_request(w.client, address, tcp_port).pod for _ in range(40)} == everyone
                assert {udp_request(w.client, address, udp_port).pod for _ in range(40)} == everyone
            with pytest.raises(TimeoutError):  # outside the source ranges: dropped
                bound_tcp(w.client, OTHER_CLIENT_IP, LB_IP, 80, timeout=0.5)
            ipt = w.node_a.run("iptables-save").stdout
            nft = w.node_a.run("nft", "list", "ruleset").stdout
        finally:
            env.agent.stop()
    assert not [line for line in ipt.splitlines() if line.startswith("-A")], ipt
    assert nft.strip() == "", nft
