"""Tuple clashes with real packets: one client reaches pods through a Service and
then straight at the pods' own addresses, reusing its source ports.

The outside check that found this bug made 5,000 short TCP connections to a
ClusterIP and then 5,000 straight to the same pods: about 20 of the direct ones
stalled for 10-14 s, because the closed Service flow that had used the same
client port still rewrote the pod's SYN-ACK to come from the VIP.  Here the
client's ephemeral port range is narrowed to a few dozen ports, so every direct
connection reuses a port a Service flow used moments before: as demanding as
thousands of connections, in a fraction of the time.  Clients close with FIN
(the way most do), leaving TIME_WAIT on their side only.

A stall is a request slower than STALL_S: a lost SYN or SYN-ACK costs the client
a one-second retransmission timer, a translated SYN-ACK far more.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import extlab, k8s_yaml
from tests.agent_proc import AgentProcess, lbctl
from tests.netlab import (
    Cluster,
    Lab,
    Netns,
    RequestError,
    TcpServer,
    UdpServer,
    build_cluster,
    tcp_request,
    udp_request,
)
from tests.test_clusterip import PORTS, TARGET_PORTS, VIP
from tests.test_external import NODE_PORT, start

pytestmark = pytest.mark.netns

STALL_S = 0.5
PORT_RANGE = (40000, 40039)  # the clients' ephemeral ports: 40 of them
ROUNDS = 40


def timed(request: Callable[[], object]) -> tuple[float, str | None]:
    """How long one request took, and its error (None: answered)."""
    start = time.monotonic()
    try:
        request()
    except RequestError as exc:
        return time.monotonic() - start, str(exc)
    return time.monotonic() - start, None


def report(what: str, results: list[tuple[float, str | None]]) -> list[str]:
    """Print the figures; the requests that failed or stalled."""
    times = sorted(t for t, _ in results)
    bad = [f"{t:.2f}s {err or 'stalled'}" for t, err in results if err or t > STALL_S]
    print(
        f"{what}: {len(results)} requests, slowest {times[-1] * 1000:.0f} ms, "
        f"median {times[len(times) // 2] * 1000:.1f} ms, {len(bad)} failed or stalled"
    )
    return bad


@pytest.fixture
def cluster_env(tmp_path: Path, pin_dir: Path) -> Iterator[tuple[AgentProcess, Cluster]]:
    with Lab() as lab:
        cluster = build_cluster(lab, pods=3)
        cluster.client.ns.sysctl("net.ipv4.ip_local_port_range", f"{PORT_RANGE[0]} {PORT_RANGE[1]}")
        for pod in cluster.pods:
            TcpServer(pod, 8080)
            UdpServer(pod, 5353)
        manifests = tmp_path / "manifests"
        manifests.mkdir()
        k8s_yaml.write(
            manifests / "web.yaml",
            k8s_yaml.service("web", VIP, PORTS),
            k8s_yaml.endpoint_slice("web", [p.ip for p in cluster.pods], TARGET_PORTS),
        )
        agent = AgentProcess(cluster.node, manifests, pin_dir, tmp_path / "agent.log")
        agent.start()
        try:
            agent.wait_for_log("synced:")
            yield agent, cluster
        finally:
            agent.stop()


def test_service_then_direct_connections_from_the_same_ports(
    cluster_env: tuple[AgentProcess, Cluster],
) -> None:
    agent, cluster = cluster_env
    client, pods = cluster.client, cluster.pods
    via_service = [
        timed(lambda: tcp_request(client, VIP, 80, timeout=3, rst_close=False))
        for _ in range(ROUNDS)
    ]
    direct = [
        timed(lambda i=i: tcp_request(client, pods[i % 3].ip, 8080, timeout=3, rst_close=False))
        for i in range(ROUNDS)
    ]
    udp_service = [timed(lambda: udp_request(client, VIP, 53)) for _ in range(ROUNDS)]
    # udp_request insists that the reply comes from the address asked: a reply
    # rewritten to the VIP fails it.
    udp_direct = [
        timed(lambda i=i: udp_request(client, pods[i % 3].ip, 5353)) for i in range(ROUNDS)
    ]
    # Then the Service again, from ports the direct flows took over.
    udp_again = [timed(lambda: udp_request(client, VIP, 53)) for _ in range(ROUNDS)]
    counters = agent.dump()["counters"]
    bad = {
        what: report(what, results)
        for what, results in (
            ("TCP via the ClusterIP", via_service),
            ("TCP straight to the pods", direct),
            ("UDP via the ClusterIP", udp_service),
            ("UDP straight to the pods", udp_direct),
            ("UDP via the ClusterIP again", udp_again),
        )
    }
    print(f"reply tuples taken over by direct flows: {counters.get('reply_retired', 0)}")
    assert not any(bad.values()), bad
    # About a third of the direct flows reused a port whose Service flow went to
    # the same pod: the clash really happened and was resolved.
    assert counters.get("reply_retired", 0) >= 2 * ROUNDS // 10, counters


# ------------------------------------------------------------- from outside, XDP, masquerade


def bound_request(ns: Netns, sport: int, ip: str, port: int, proto: str, source: str = "") -> str:
    """One request from a fixed source port; the reply.  Raises RequestError."""
    kind = socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM
    with ns.open_socket(socket.AF_INET, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(3)
        sock.bind((source, sport))
        try:
            if kind == socket.SOCK_STREAM:
                sock.connect((ip, port))
                sock.sendall(b"hi\n")
                reply = sock.recv(1024)
            else:
                sock.sendto(b"hi", (ip, port))
                reply, src = sock.recvfrom(1024)
                if src != (ip, port):
                    raise RequestError(f"UDP {ip}:{port}: reply came from {src[0]}:{src[1]}")
        except OSError as exc:
            raise RequestError(f"{proto} {ip}:{port} from port {sport}: {exc}") from exc
    return reply.decode()


@pytest.mark.parametrize("xdp", [False, True], ids=["tc", "xdp"])
def test_outside_client_nodeport_local_then_direct(
    tmp_path: Path, pin_dir: Path, xdp: bool
) -> None:
    """externalTrafficPolicy Local keeps the client's address, so its NodePort
    flows hold the same reply tuples as its direct flows to the pods."""
    with Lab() as lab:
        env = start(tmp_path, pin_dir, lab, pods_b=0)
        w = env.world
        w.client.ip("route", "add", extlab.CLUSTER_CIDR, "via", extlab.NODE_IP)
        if xdp:
            env.agent.extra = (
                *env.agent.extra,
                "--xdp",
                "generic",
                "--external-interfaces",
                "ext0",
            )
        env.publish(externalTrafficPolicy="Local")
        env.agent.start()
        try:
            env.agent.wait_for_log("synced:")
            if xdp:
                env.agent.wait_for_log("attached XDP program (generic) to ext0")
            results: list[tuple[float, str | None]] = []
            for i, (proto, port) in enumerate([("TCP", NODE_PORT), ("UDP", NODE_PORT + 1)] * 6):
                sport = 41000 + i
                target = 8080 if proto == "TCP" else 5353
                reply = bound_request(w.client, sport, extlab.NODE_IP, port, proto)
                pod_name, peer = reply.split()[:2]
                assert peer == f"{extlab.CLIENT_IP}:{sport}", "Local keeps the client's address"
                pod = next(p for p in w.pods_a if p.name == pod_name)
                if proto == "TCP":
                    time.sleep(0.05)  # the FINs of the closed connection pass the node
                    traced = lbctl(
                        "trace",
                        "--src",
                        f"{extlab.CLIENT_IP}:{sport}",
                        "--dst",
                        f"{pod.ip}:{target}",
                        "-o",
                        "json",
                        "--bpffs",
                        str(pin_dir),
                        node=w.node_a,
                        check=False,
                    )
                    steps = {s["step"]: s["result"] for s in json.loads(traced.stdout)["steps"]}
                    assert "takes it over" in steps["reply tuple"], steps
                results.append(
                    timed(
                        lambda s=sport, pr=proto, t=target, ip=pod.ip: bound_request(
                            w.client, s, ip, t, pr
                        )
                    )
                )
            counters = env.agent.dump()["counters"]
        finally:
            env.agent.stop()
    bad = report(f"direct after NodePort ({'xdp' if xdp else 'tc'})", results)
    assert not bad, bad
    assert counters.get("reply_retired", 0) >= 12, counters
    if xdp:  # XDP saw every packet from the client, and left the direct ones to tc
        assert counters["xdp_passed"] >= 12 and counters["xdp_redirected"] > 0, counters


def test_nat_port_of_a_closed_flow_then_a_node_socket(tmp_path: Path, pin_dir: Path) -> None:
    """A masqueraded flow leaves with NODE_IP:61000 and closes; a process of the
    node itself then connects from that very port straight to the pod.  Its
    SYN never meets lbctl (it leaves the node towards the pod), only the pod's
    SYN-ACK does."""
    with Lab() as lab:
        env = start(tmp_path, pin_dir, lab, pods_a=1, pods_b=0)
        env.agent.extra = (*env.agent.extra, "--nat-port-range", "61000-61000")
        env.publish()
        env.agent.start()
        w = env.world
        try:
            env.agent.wait_for_log("synced:")
            reply = bound_request(w.client, 42000, extlab.NODE_IP, NODE_PORT, "TCP")
            assert reply.split()[1] == f"{extlab.NODE_IP}:61000", "masqueraded to the one NAT port"
            time.sleep(0.05)
            pod = w.pods_a[0]
            took = timed(
                lambda: bound_request(w.node_a, 61000, pod.ip, 8080, "TCP", source=extlab.NODE_IP)
            )
            counters = env.agent.dump()["counters"]
        finally:
            env.agent.stop()
    assert not report("node socket on the NAT port", [took])
    assert counters.get("reply_retired", 0) == 1, counters
