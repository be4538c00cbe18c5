"""Tuple clashes under BPF_PROG_TEST_RUN: a client that reaches a backend through a
Service and then straight at the backend's own address from the same source port.

Both flows have the same reply tuple (backend:port -> client:port).  The
balanced flow's reverse entry must not rewrite the direct flow's replies to come
from the VIP (bpf/flow.h, "tuple clashes"): a direct SYN takes the tuple over from
a closing balanced flow, a SYN-ACK never belongs to one, and for UDP the newest
sender owns the tuple.  Every step is checked on the frame that comes out and on
the conntrack and NAT maps.
"""

from __future__ import annotations

import ipaddress

import pytest

from lbctl.datapath import NodeConfig
from lbctl.datapath.ebpf import layout
from lbctl.datapath.ebpf.datapath import BpfDatapath
from tests import packets
from tests.test_bpf_prog import (
    CLIENT,
    CT_DIR_FORWARD,
    CT_DIR_REVERSE,
    STAT_PASS,
    TCP_PORT,
    TCP_TARGET,
    UDP_PORT,
    UDP_TARGET,
    VIP,
    assert_passes_unchanged,
    checked,
    ct_key,
    run,
    stat_delta,
    stats,
    syn,
    tcp_service,
    udp_service,
)

TCP = packets.IPPROTO_TCP
UDP = packets.IPPROTO_UDP
STAT_RETIRED = layout.const("LB_STAT_REPLY_RETIRED")


def reverse_key(backend: str, sport: int, proto: int = TCP, target: int = TCP_TARGET) -> object:
    return ct_key(backend, CLIENT, target, sport, proto, CT_DIR_REVERSE)


def forward_key(sport: int, proto: int = TCP, port: int = TCP_PORT) -> object:
    return ct_key(CLIENT, VIP, sport, port, proto, CT_DIR_FORWARD)


def close_balanced(dp: BpfDatapath, backend: str, sport: int) -> None:
    """The client closes first: FIN, the backend's FIN-ACK, the client's last ACK."""
    checked(run(dp, packets.ipv4_tcp(CLIENT, VIP, sport, TCP_PORT, "FA")))
    out = checked(run(dp, packets.ipv4_tcp(backend, CLIENT, TCP_TARGET, sport, "FA")))
    assert (out.src, out.sport) == (VIP, TCP_PORT), "the balanced flow's FIN-ACK is translated"
    checked(run(dp, packets.ipv4_tcp(CLIENT, VIP, sport, TCP_PORT, "A")))


def assert_retires(dp: BpfDatapath, frame: bytes) -> None:
    """The frame passes untouched and takes a balanced flow's reply tuple over."""
    before = stats(dp)
    result = run(dp, frame)
    assert result.retval == 0 and result.data == frame, "a direct flow's packet was modified"
    assert stat_delta(before, stats(dp)) == {STAT_PASS: 1, STAT_RETIRED: 1}


def test_direct_syn_after_a_closed_balanced_flow_keeps_its_replies(
    clean_datapath: BpfDatapath,
) -> None:
    dp = clean_datapath
    tcp_service(dp)
    sport = 53000
    backend = syn(dp, sport)
    checked(run(dp, packets.ipv4_tcp(backend, CLIENT, TCP_TARGET, sport, "SA")))
    close_balanced(dp, backend, sport)
    assert dp.maps.ct4.lookup(reverse_key(backend, sport)) is not None

    assert_retires(dp, packets.ipv4_tcp(CLIENT, backend, sport, TCP_TARGET, "S", seq=5))
    assert dp.maps.ct4.lookup(reverse_key(backend, sport)) is None
    fwd = dp.maps.ct4.lookup(forward_key(sport))
    assert fwd is not None and fwd.retired == layout.const("CT_RETIRED_REPLY")
    # The direct flow's handshake and data come back from the backend's own address.
    for flags, payload in (("SA", b""), ("A", b""), ("PA", b"hello"), ("FA", b"")):
        assert_passes_unchanged(
            dp, packets.ipv4_tcp(backend, CLIENT, TCP_TARGET, sport, flags, payload)
        )
        assert_passes_unchanged(
            dp, packets.ipv4_tcp(CLIENT, backend, sport, TCP_TARGET, "A", payload)
        )


def test_syn_ack_to_a_closed_balanced_flow_is_a_direct_flows(clean_datapath: BpfDatapath) -> None:
    """The direct SYN did not pass this program (the node's own socket): the
    backend's SYN-ACK alone shows the tuple has a new owner."""
    dp = clean_datapath
    tcp_service(dp)
    sport = 53100
    backend = syn(dp, sport)
    checked(run(dp, packets.ipv4_tcp(backend, CLIENT, TCP_TARGET, sport, "SA")))
    close_balanced(dp, backend, sport)

    assert_retires(dp, packets.ipv4_tcp(backend, CLIENT, TCP_TARGET, sport, "SA"))
    assert dp.maps.ct4.lookup(reverse_key(backend, sport)) is None
    assert_passes_unchanged(dp, packets.ipv4_tcp(backend, CLIENT, TCP_TARGET, sport, "PA", b"x"))


def test_open_balanced_connection_keeps_its_tuple(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    tcp_service(dp)
    sport = 53200
    backend = syn(dp, sport)
    checked(run(dp, packets.ipv4_tcp(backend, CLIENT, TCP_TARGET, sport, "SA")))
    # A direct SYN on the tuple of an open connection: the backend answers it
    # with that connection's ACK, so the connection keeps its translation.
    assert_passes_unchanged(dp, packets.ipv4_tcp(CLIENT, backend, sport, TCP_TARGET, "S"))
    for flags in ("A", "SA"):  # its challenge ACK, or a retransmitted SYN-ACK
        out = checked(run(dp, packets.ipv4_tcp(backend, CLIENT, TCP_TARGET, sport, flags)))
        assert (out.src, out.sport) == (VIP, TCP_PORT)


def test_a_new_syn_to_the_vip_takes_the_tuple_back(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    tcp_service(dp)
    sport = 53300
    backend = syn(dp, sport)
    checked(run(dp, packets.ipv4_tcp(backend, CLIENT, TCP_TARGET, sport, "SA")))
    close_balanced(dp, backend, sport)
    assert_retires(dp, packets.ipv4_tcp(CLIENT, backend, sport, TCP_TARGET, "S"))
    # The direct flow ends; the client reuses the port for the Service again,
    # within the closed flow's lifetime: it restarts on the same backend.
    assert syn(dp, sport) == backend
    assert dp.maps.ct4.lookup(reverse_key(backend, sport)) is not None
    out = checked(run(dp, packets.ipv4_tcp(backend, CLIENT, TCP_TARGET, sport, "SA")))
    assert (out.src, out.sport) == (VIP, TCP_PORT)


def test_leftover_reverse_entry_without_its_flow_is_retired(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    tcp_service(dp)
    sport = 53400
    backend = syn(dp, sport)
    assert dp.maps.ct4.delete(forward_key(sport))
    assert_retires(dp, packets.ipv4_tcp(CLIENT, backend, sport, TCP_TARGET, "S"))
    assert dp.maps.ct4.lookup(reverse_key(backend, sport)) is None


def test_udp_newest_sender_owns_the_reply_tuple(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    udp_service(dp)
    sport = 53500
    out = checked(run(dp, packets.ipv4_udp(CLIENT, VIP, sport, UDP_PORT, b"q1")))
    backend = out.dst

    def reply() -> packets.Parsed:
        return checked(run(dp, packets.ipv4_udp(backend, CLIENT, UDP_TARGET, sport, b"a")))

    assert (reply().src, reply().sport) == (VIP, UDP_PORT)
    # The same port, straight to the backend: its reply is the backend's own.
    assert_retires(dp, packets.ipv4_udp(CLIENT, backend, sport, UDP_TARGET, b"q2"))
    assert dp.maps.ct4.lookup(reverse_key(backend, sport, UDP, UDP_TARGET)) is None
    assert_passes_unchanged(dp, packets.ipv4_udp(backend, CLIENT, UDP_TARGET, sport, b"a"))
    assert_passes_unchanged(dp, packets.ipv4_udp(CLIENT, backend, sport, UDP_TARGET, b"q3"))
    # The Service is asked again from that port: its replies are the VIP's again.
    out = checked(run(dp, packets.ipv4_udp(CLIENT, VIP, sport, UDP_PORT, b"q4")))
    assert out.dst == backend
    assert (reply().src, reply().sport) == (VIP, UDP_PORT)
    fwd = dp.maps.ct4.lookup(forward_key(sport, UDP, UDP_PORT))
    assert fwd is not None and fwd.retired == 0


NODE = "192.0.2.1"
OUTSIDE = "198.51.100.7"


@pytest.fixture
def masq_dp(clean_datapath: BpfDatapath) -> BpfDatapath:
    clean_datapath.configure(
        NodeConfig(
            snat_address=ipaddress.IPv4Address(NODE),
            nat_ports=(61000, 61000),
            cluster_cidrs=(ipaddress.IPv4Network("10.244.0.0/16"),),
        )
    )
    return clean_datapath


def test_masqueraded_flow_gives_its_nat_port_to_a_node_socket(masq_dp: BpfDatapath) -> None:
    """An outside client's flow is masqueraded to NODE:61000 and closes; then a
    socket of the node itself connects from port 61000 straight to the backend."""
    dp = masq_dp
    tcp_service(dp)  # a ClusterIP: outside clients are masqueraded
    sport = 53600
    out = checked(run(dp, packets.ipv4_tcp(OUTSIDE, VIP, sport, TCP_PORT, "S")))
    backend, nat_port = out.dst, out.sport
    assert (out.src, nat_port) == (NODE, 61000)
    back = checked(run(dp, packets.ipv4_tcp(backend, NODE, TCP_TARGET, nat_port, "SA")))
    assert (back.src, back.dst, back.dport) == (VIP, OUTSIDE, sport)
    checked(run(dp, packets.ipv4_tcp(OUTSIDE, VIP, sport, TCP_PORT, "FA")))
    checked(run(dp, packets.ipv4_tcp(backend, NODE, TCP_TARGET, nat_port, "FA")))
    nat_key = ct_key(backend, NODE, TCP_TARGET, nat_port, TCP, CT_DIR_REVERSE)
    assert dp.maps.nat4.lookup(nat_key) is not None

    assert_retires(dp, packets.ipv4_tcp(backend, NODE, TCP_TARGET, nat_port, "SA"))
    assert dp.maps.nat4.lookup(nat_key) is None
    assert_passes_unchanged(
        dp, packets.ipv4_tcp(backend, NODE, TCP_TARGET, nat_port, "PA", b"for the node")
    )
