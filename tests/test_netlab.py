"""Self-tests of the namespace lab and the packet helpers (no BPF involved)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests import packets
from tests.netlab import (
    Lab,
    RequestError,
    TcpServer,
    TcpSession,
    UdpServer,
    alive_namespaces,
    build_cluster,
    current_netns_inode,
    inject_frame,
    link_mac,
    ns_exists,
    snmp_counters,
    tcp_request,
    tx_checksum_offload_enabled,
    udp_request,
)

PORT = 8080

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as the_lab:
        yield the_lab


@pytest.mark.netns
@needs_root
@pytest.mark.parametrize("offload", [False, True], ids=["offload-off", "offload-on"])
def test_client_reaches_every_pod_directly(lab: Lab, offload: bool) -> None:
    cluster = build_cluster(lab, pods=3, offload=offload)
    client = cluster.client
    assert [p.ip for p in cluster.pods] == ["10.244.0.20", "10.244.0.21", "10.244.0.22"]
    for pod in [client, *cluster.pods]:
        assert tx_checksum_offload_enabled(pod.ns, "eth0") is offload
    for pod in cluster.pods:
        TcpServer(pod, PORT)
        UdpServer(pod, PORT)

    for pod in cluster.pods:
        reply = tcp_request(client, pod.ip, PORT, line=f"to {pod.name}")
        assert (reply.pod, reply.peer_ip, reply.text) == (pod.name, client.ip, f"to {pod.name}")

        reply = udp_request(client, pod.ip, PORT, payload="dgram")
        assert (reply.pod, reply.peer_ip, reply.text) == (pod.name, client.ip, "dgram")
        assert reply.source == f"{pod.ip}:{PORT}"

    with TcpSession(client, cluster.pods[0].ip, PORT) as session:
        replies = [session.ask(f"n{i}") for i in range(3)]
    assert {r.peer for r in replies} == {session.local}
    assert [r.text for r in replies] == ["n0", "n1", "n2"]


@pytest.mark.netns
@needs_root
def test_node_setup_and_failures(lab: Lab) -> None:
    cluster = build_cluster(lab, pods=1)
    rules = cluster.node.run("iptables", "-S", "FORWARD").stdout
    assert "--ctstate INVALID -j DROP" in rules
    assert cluster.node.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"

    pod = cluster.pods[0]
    with pytest.raises(RequestError, match="refused"):
        tcp_request(cluster.client, pod.ip, PORT + 1)
    with pytest.raises(RequestError, match="timed out"):
        udp_request(cluster.client, pod.ip, PORT + 1, timeout=0.3)

    before = current_netns_inode()
    with pod.ns.entered():
        assert current_netns_inode() != before
    assert current_netns_inode() == before


@pytest.mark.netns
@needs_root
def test_pods_verify_checksums(lab: Lab) -> None:
    """A frame with a wrong UDP checksum reaching a pod is dropped, a correct one is not."""
    cluster = build_cluster(lab, pods=1)
    pod, client = cluster.pods[0], cluster.client
    server = UdpServer(pod, PORT)
    node_mac, pod_mac = link_mac(cluster.node, pod.host_if), link_mac(pod.ns, "eth0")
    bad, good = (
        packets.ipv4_udp(
            client.ip, pod.ip, sport, PORT, b"x", csum_ok=ok, src_mac=node_mac, dst_mac=pod_mac
        )
        for sport, ok in [(40000, False), (40001, True)]
    )
    assert packets.parse(bad).l4_csum_ok is False

    inject_frame(cluster.node, pod.host_if, bad)
    inject_frame(cluster.node, pod.host_if, good)
    deadline = time.monotonic() + 2.0
    while server.received < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.received == 1  # the good one; the bad one was queued first and dropped
    assert snmp_counters(pod.ns)["Udp.InCsumErrors"] == 1


@pytest.mark.netns
@needs_root
def test_close_removes_everything() -> None:
    lab = Lab()
    try:
        cluster = build_cluster(lab, pods=2)
        servers = [TcpServer(pod, PORT) for pod in cluster.pods]
        names = [ns.name for ns in lab.namespaces]
        assert len(names) == 4 and all(n.startswith("lbt") and ns_exists(n) for n in names)
        assert tcp_request(cluster.client, cluster.pods[1].ip, PORT).pod == "pod1"
    finally:
        lab.close()
    assert not any(ns_exists(n) for n in names)
    assert not any(s.running for s in servers)
    assert alive_namespaces() == []
    lab.close()  # idempotent


def test_tcp_frame_roundtrip() -> None:
    frame = packets.ipv4_tcp(
        "10.0.0.1", "10.96.0.10", 40000, 80, flags="PA", payload=b"GET /", seq=7, ack=9, ttl=33
    )
    p = packets.parse(frame)
    assert p.ethertype == packets.ETH_P_IP and p.proto == packets.IPPROTO_TCP
    assert (p.src, p.dst, p.sport, p.dport) == ("10.0.0.1", "10.96.0.10", 40000, 80)
    assert (p.flags, p.seq, p.ack, p.ttl, p.payload) == ("PA", 7, 9, 33, b"GET /")
    assert p.ip_csum_ok and p.l4_csum_ok is True and not p.truncated

    corrupted = bytearray(frame)
    corrupted[-1] ^= 0xFF
    assert packets.parse(bytes(corrupted)).l4_csum_ok is False
    assert (
        packets.parse(packets.ipv4_tcp("1.1.1.1", "2.2.2.2", 1, 2, csum_ok=False)).l4_csum_ok
        is False
    )

    with_options = packets.parse(
        packets.ipv4_tcp("1.1.1.1", "2.2.2.2", 1, 2, "SA", ip_options=b"\x01\x01\x01\x01")
    )
    assert with_options.ip_header_len == 24 and with_options.flags == "SA"
    assert with_options.ip_csum_ok and with_options.l4_csum_ok is True

    short = packets.parse(packets.truncate(frame, 40))
    assert short.truncated and short.l4_csum_ok is None


def test_udp_frame_roundtrip() -> None:
    frame = packets.ipv4_udp("10.0.0.1", "10.96.0.10", 5353, 53, b"query")
    p = packets.parse(frame)
    assert (p.proto, p.src, p.dst, p.sport, p.dport) == (17, "10.0.0.1", "10.96.0.10", 5353, 53)
    assert p.payload == b"query" and p.ip_csum_ok and p.l4_csum_ok is True
    assert not p.udp_csum_zero

    corrupted = bytearray(frame)
    corrupted[-1] ^= 0x01
    assert packets.parse(bytes(corrupted)).l4_csum_ok is False

    zero = packets.parse(
        packets.ipv4_udp("10.0.0.1", "10.96.0.10", 1, 53, b"x", zero_checksum=True)
    )
    assert zero.udp_csum_zero and zero.l4_csum_ok is True

    v6 = packets.parse(packets.ipv6_udp("fd00::1", "fd00::2", 1000, 53, b"six"))
    assert (v6.ethertype, v6.src, v6.payload, v6.l4_csum_ok) == (0x86DD, "fd00::1", b"six", True)

    frag = packets.parse(packets.ipv4_udp("10.0.0.1", "10.0.0.2", 1, 2, b"tail", frag_off=1480))
    assert frag.is_fragment and frag.sport is None and frag.l4_csum_ok is None


def test_other_frames() -> None:
    arp = packets.parse(packets.arp_request("10.244.0.20", "10.244.0.1"))
    assert (arp.ethertype, arp.arp_op, arp.src, arp.dst) == (0x0806, 1, "10.244.0.20", "10.244.0.1")
    assert arp.dst_mac == packets.BROADCAST_MAC

    ping = packets.parse(packets.ipv4_icmp_echo("10.0.0.1", "10.0.0.2", payload=b"abc"))
    assert (ping.proto, ping.icmp_type, ping.payload) == (1, 8, b"abc")
    assert ping.ip_csum_ok and ping.l4_csum_ok is True
