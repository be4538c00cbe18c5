"""ICMP errors about balanced flows, under BPF_PROG_TEST_RUN.

An error about a packet lbctl translated must reach the host that sent it,
quoting the addresses that host used (netfilter NAT's "related" packets):
otherwise path MTU discovery through the balancer breaks.  Each test opens a
flow, sends the error a router or the far host would send, and compares the
frame that comes out with the error the sender should get, checksums (outer
IP, ICMP, the quoted IP header and UDP checksum) included.
"""

from __future__ import annotations

import ipaddress

import pytest

from lbctl.datapath import NodeConfig
from lbctl.datapath.ebpf import layout
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.model import Protocol, ServiceRef
from lbctl.plan.planner import Backend, Frontend, FrontendKey
from tests import packets
from tests.test_bpf_prog import TC_ACT_OK, run, stat_delta, stats, ttl_after

VIP = "10.96.0.10"
BACKEND = "10.244.0.20"
CLIENT = "10.244.3.9"  # a pod: not masqueraded
OUTSIDE = "198.51.100.7"  # outside the cluster CIDR: masqueraded
NODE = "192.0.2.1"
ROUTER = "10.244.0.1"
STAT_ICMP = layout.const("LB_STAT_ICMP_ERROR")
STAT_PASS = layout.const("LB_STAT_PASS")
PAYLOAD = b"a datagram of some length"


def ip(a: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(a)


@pytest.fixture
def dp(clean_datapath: BpfDatapath) -> BpfDatapath:
    clean_datapath.configure(
        NodeConfig(
            snat_address=ip(NODE),
            cluster_cidrs=(ipaddress.IPv4Network("10.244.0.0/16"),),
        )
    )
    fes = [
        Frontend(
            FrontendKey(ip(VIP), port, proto),
            ServiceRef("ns", "web"),
            proto.name.lower(),
            "ClusterIP",
            (Backend(ip(BACKEND), target, proto),),
        )
        for port, target, proto in ((80, 8080, Protocol.TCP), (53, 5353, Protocol.UDP))
    ]
    clean_datapath.reconcile({fe.key: fe for fe in fes})
    return clean_datapath


def unchecked(frame: bytes) -> bytes:
    """The frame with the outer IP and ICMP checksum fields zeroed (checked apart)."""
    out = bytearray(frame)
    out[24:26] = b"\0\0"
    out[36:38] = b"\0\0"
    return bytes(out)


def assert_translated(dp: BpfDatapath, error: bytes, want: bytes) -> None:
    before = stats(dp)
    result = run(dp, error)
    assert result.retval in (TC_ACT_OK, 7), result.retval
    out = packets.parse(result.data)
    assert out.ip_csum_ok, "outer IP checksum wrong"
    icmp = result.data[34:]
    assert packets.checksum(icmp) == 0, "ICMP checksum wrong"
    want = want[:22] + bytes([ttl_after(result.retval, want[22])]) + want[23:]
    assert unchecked(result.data) == unchecked(want)
    quote = icmp[8:28]
    assert packets.checksum(quote) == 0, "quoted IP header checksum wrong"
    assert stat_delta(before, stats(dp)).get(STAT_ICMP) == 1


def test_an_error_about_a_forward_packet_reaches_the_client(dp: BpfDatapath) -> None:
    run(dp, packets.ipv4_tcp(CLIENT, VIP, 40000, 80, "S"))
    sent = packets.ipv4_tcp(CLIENT, BACKEND, 40000, 8080, "A", b"x" * 100)
    meant = packets.ipv4_tcp(CLIENT, VIP, 40000, 80, "A", b"x" * 100)
    # from a router on the way: only the quote changes
    assert_translated(
        dp,
        packets.ipv4_icmp_error(ROUTER, CLIENT, sent),
        packets.ipv4_icmp_error(ROUTER, CLIENT, meant),
    )
    # from the backend itself: it reads as coming from the service
    assert_translated(
        dp,
        packets.ipv4_icmp_error(BACKEND, CLIENT, sent, code=3),
        packets.ipv4_icmp_error(VIP, CLIENT, meant, code=3),
    )


def test_an_error_about_a_masqueraded_packet_goes_to_the_client(dp: BpfDatapath) -> None:
    out = packets.parse(run(dp, packets.ipv4_udp(OUTSIDE, VIP, 40001, 53, PAYLOAD)).data)
    assert (out.src, out.dst) == (NODE, BACKEND)
    sent = packets.ipv4_udp(NODE, BACKEND, out.sport, 5353, PAYLOAD)
    meant = packets.ipv4_udp(OUTSIDE, VIP, 40001, 53, PAYLOAD)
    # the quoted UDP checksum is that of the datagram the client sent
    assert_translated(
        dp,
        packets.ipv4_icmp_error(ROUTER, NODE, sent),
        packets.ipv4_icmp_error(ROUTER, OUTSIDE, meant),
    )


def test_an_error_about_a_reply_reaches_the_backend(dp: BpfDatapath) -> None:
    run(dp, packets.ipv4_tcp(CLIENT, VIP, 40002, 80, "S"))
    # the client's side says the service's reply was too big
    sent = packets.ipv4_tcp(VIP, CLIENT, 80, 40002, "A", b"y" * 100)
    meant = packets.ipv4_tcp(BACKEND, CLIENT, 8080, 40002, "A", b"y" * 100)
    assert_translated(
        dp,
        packets.ipv4_icmp_error("10.244.3.1", VIP, sent),
        packets.ipv4_icmp_error("10.244.3.1", BACKEND, meant),
    )
    # masqueraded: the backend sent its reply to the NAT address and port
    out = packets.parse(run(dp, packets.ipv4_udp(OUTSIDE, VIP, 40003, 53, PAYLOAD)).data)
    sent = packets.ipv4_udp(VIP, OUTSIDE, 53, 40003, PAYLOAD)
    meant = packets.ipv4_udp(BACKEND, NODE, 5353, out.sport, PAYLOAD)
    assert_translated(
        dp,
        packets.ipv4_icmp_error("198.51.100.1", VIP, sent, icmp_type=11, code=0, mtu=0),
        packets.ipv4_icmp_error("198.51.100.1", BACKEND, meant, icmp_type=11, code=0, mtu=0),
    )


def test_errors_about_other_traffic_pass_untouched(dp: BpfDatapath) -> None:
    run(dp, packets.ipv4_tcp(CLIENT, VIP, 40004, 80, "S"))
    for error in (
        # a flow lbctl never saw
        packets.ipv4_icmp_error(
            ROUTER, CLIENT, packets.ipv4_tcp(CLIENT, BACKEND, 40099, 8080, "A")
        ),
        # the right addresses but another port of the client
        packets.ipv4_icmp_error(
            ROUTER, CLIENT, packets.ipv4_tcp(CLIENT, BACKEND, 40005, 8080, "A")
        ),
        # not an error at all
        packets.ipv4_icmp_echo(CLIENT, VIP),
    ):
        before = stats(dp)
        result = run(dp, error)
        assert (result.retval, result.data) == (TC_ACT_OK, error)
        assert stat_delta(before, stats(dp)) == {STAT_PASS: 1}


def test_an_error_about_a_node_port_reply_reaches_the_backend(dp: BpfDatapath) -> None:
    """The service address is the node's own, also the masquerade address."""
    fe = Frontend(
        FrontendKey(ip(NODE), 30053, Protocol.UDP),
        ServiceRef("ns", "web"),
        "udp",
        "NodePort",
        (Backend(ip(BACKEND), 5353, Protocol.UDP),),
    )
    dp.table.upsert(fe)
    out = packets.parse(run(dp, packets.ipv4_udp(OUTSIDE, NODE, 40006, 30053, PAYLOAD)).data)
    assert (out.src, out.dst) == (NODE, BACKEND)
    sent = packets.ipv4_udp(NODE, OUTSIDE, 30053, 40006, PAYLOAD)
    meant = packets.ipv4_udp(BACKEND, NODE, 5353, out.sport, PAYLOAD)
    assert_translated(
        dp,
        packets.ipv4_icmp_error("198.51.100.1", NODE, sent),
        packets.ipv4_icmp_error("198.51.100.1", BACKEND, meant),
    )


@pytest.mark.parametrize("ethertype", [0x88B5, 0x86DD, 0x0806, 0x4800])
def test_only_an_ipv4_frame_is_an_icmp_error(dp: BpfDatapath, ethertype: int) -> None:
    """The same bytes as an error about a balanced flow (translated above), but in a
    frame that is not IPv4: nobody's ICMP error, passed as it came.  The packet
    fuzzer (tests/test_reliability_packets.py) found such frames rewritten."""
    run(dp, packets.ipv4_tcp(CLIENT, VIP, 40010, 80, "S"))
    sent = packets.ipv4_tcp(CLIENT, BACKEND, 40010, 8080, "A", b"x" * 100)
    error = packets.ipv4_icmp_error(ROUTER, CLIENT, sent)
    frame = error[:12] + ethertype.to_bytes(2, "big") + error[14:]
    before = stats(dp)
    result = run(dp, frame)
    assert (result.retval, result.data) == (TC_ACT_OK, frame)
    assert stat_delta(before, stats(dp)) == {STAT_PASS: 1}


@pytest.mark.parametrize("total", [20, 28, 55])
def test_a_quote_past_the_datagrams_end_is_no_error(dp: BpfDatapath, total: int) -> None:
    """The IP total length ends before the quote (found by the packet fuzzer): the
    stack sees an ICMP message too short to quote anything, so the bytes after it
    are no quote to translate (doing so broke the checksum of what the length
    covers)."""
    run(dp, packets.ipv4_tcp(CLIENT, VIP, 40011, 80, "S"))
    sent = packets.ipv4_tcp(CLIENT, BACKEND, 40011, 8080, "A", b"x" * 100)
    error = bytearray(packets.ipv4_icmp_error(ROUTER, CLIENT, sent))
    error[16:18] = total.to_bytes(2, "big")
    error[24:26] = b"\0\0"
    error[24:26] = packets.checksum(bytes(error[14:34])).to_bytes(2, "big")
    before = stats(dp)
    result = run(dp, bytes(error))
    assert (result.retval, result.data) == (TC_ACT_OK, bytes(error))
    assert stat_delta(before, stats(dp)) == {STAT_PASS: 1}
