"""The XDP fast path: the program under BPF_PROG_TEST_RUN, then the real agent with --xdp.

Part 1 runs `lbctl_xdp` on frames with BPF_PROG_TEST_RUN while the test's thread is
in a namespace of its own (`fib` below), so the program's FIB lookup sees real routes
and neighbours: an ingress interface in0 towards the outside, out0 towards the pods.
It checks that XDP translates exactly as tc does, redirects only what it can finish,
and hands everything else to tc untouched and without a trace in the maps.

Part 2 runs `lbctl run --xdp generic|native --external-interfaces ext0` in node A of
tests/extlab.py's world and sends real traffic from the outside client.

Checksums: XDP updates them by hand, which is right only for packets that carry a full
checksum.  extlab's senders have tx checksum offload off (a local stack sending over
veth with offload on leaves a partial checksum that XDP cannot tell apart and would
corrupt); see docs/datapath.md, "XDP".
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from lbctl.datapath import NodeConfig
from lbctl.datapath.ebpf import layout, libbpf, tc, xdp
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.model import IPNetwork, Protocol, ServiceRef
from lbctl.plan.planner import Backend, Frontend, FrontendKey
from tests import extlab, netlab, packets
from tests import test_external as external
from tests.agent_proc import AgentProcess
from tests.extlab import CLIENT_IP, LB_IP, NODE_IP
from tests.netlab import Lab, Netns, RequestError, TcpServer, UdpServer, tcp_request, udp_request
from tests.test_bpf_prog import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, stat_delta, stats

pytestmark = pytest.mark.netns

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)

STAT = {name: layout.const(f"LB_STAT_{name}") for name in (
    "PASS",
    "DNAT_NEW",
    "DNAT_EST",
    "RNAT",
    "REDIRECT",
    "REJECT",
    "SNAT_NEW",
    "SNAT_REVERSE",
    "DROP_SOURCE_RANGE",
    "DROP_NO_LOCAL",
    "DROP_NO_BACKEND",
    "PASS_FRAGMENT",
    "XDP_REDIRECT",
    "XDP_PASS",
    "XDP_TO_TC",
)}  # fmt: skip
CT_F_SEEN_REPLY = layout.const("CT_F_SEEN_REPLY")

NODE = "192.0.2.1"  # node address on in0: NodePorts, masquerade
OUTSIDE = "198.51.100.7"  # the outside client, behind in0
VIP = "10.96.0.10"
BACKENDS = ("10.244.0.20", "10.244.0.21", "10.244.0.22")  # neighbours on out0
NO_NEIGH = "10.244.0.99"  # routed over out0, no neighbour entry
SMALL_MTU = "10.244.1.20"  # routed over out0 with a (locked) route MTU of 1000
CLIENT_MAC = "02:00:00:00:0c:01"
BACKEND_MAC = "02:00:00:00:0b:01"
NODE_PORT = 30080
TARGET = 8080
ETH_HLEN = 14


# ------------------------------------------------------------------ part 1: test runs


@dataclasses.dataclass
class Fib:
    """The namespace whose routes and neighbours the test runs' FIB lookups see."""

    ns: Netns
    in_index: int
    out_index: int
    in_mac: str
    out_mac: str
    nf_index: int  # an interface that does not forward


def _index(ns: Netns, ifname: str) -> int:
    return int(json.loads(ns.ip("-j", "link", "show", "dev", ifname).stdout)[0]["ifindex"])


@pytest.fixture(scope="module")
def fib() -> Iterator[Fib]:
    with Lab() as lab:
        ns = lab.netns("xdpfib")
        ns.sysctl("net.ipv4.ip_forward", 1)
        netlab.veth(ns, "in0", ns, "in1")
        netlab.veth(ns, "out0", ns, "out1")
        netlab.veth(ns, "nf0", ns, "nf1")
        ns.sysctl("net.ipv4.conf.nf0.forwarding", 0)
        ns.ip("addr", "add", f"{NODE}/24", "dev", "in0")
        ns.ip("route", "add", "198.51.100.0/24", "dev", "in0")
        ns.ip("neigh", "add", OUTSIDE, "lladdr", CLIENT_MAC, "dev", "in0", "nud", "permanent")
        ns.ip("route", "add", "10.244.0.0/24", "dev", "out0")
        ns.ip("route", "add", "10.244.1.0/24", "dev", "out0", "mtu", "lock", "1000")
        for addr in (*BACKENDS, SMALL_MTU):
            ns.ip("neigh", "add", addr, "lladdr", BACKEND_MAC, "dev", "out0", "nud", "permanent")
        yield Fib(
            ns,
            _index(ns, "in0"),
            _index(ns, "out0"),
            netlab.link_mac(ns, "in0"),
            netlab.link_mac(ns, "out0"),
            _index(ns, "nf0"),
        )


def xdp_fd(dp: BpfDatapath) -> int:
    fd = dp.prog_fds.get("lbctl_xdp")
    assert fd is not None, f"lbctl_xdp did not load: {dp.failed_programs}"
    return fd


def run_xdp(dp: BpfDatapath, fib: Fib, frame: bytes, ifindex: int = 0) -> libbpf.TestRun:
    """One frame through lbctl_xdp as if it arrived on in0 (or on `ifindex`)."""
    # struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    ctx = struct.pack("=6I", 0, len(frame), 0, ifindex or fib.in_index, 0, 0)
    with fib.ns.entered():
        result = libbpf.prog_test_run(xdp_fd(dp), frame, ctx=ctx)
    assert len(result.data) == len(frame), "XDP must not resize the frame"
    return result


def run_tc(dp: BpfDatapath, frame: bytes) -> libbpf.TestRun:
    return libbpf.prog_test_run(dp.prog_fd, frame)


def ip(addr: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(addr)


def frontend(
    address: str,
    port: int,
    proto: Protocol,
    backends: tuple[str, ...],
    kind: str,
    ranges: tuple[IPNetwork, ...] = (),
    drop_empty: bool = False,
) -> Frontend:
    return Frontend(
        FrontendKey(ip(address), port, proto),
        ServiceRef("ns", "web"),
        "p",
        kind,
        tuple(Backend(ip(b), TARGET, proto) for b in backends),
        drop_empty=drop_empty,
        source_ranges=ranges,
    )


def publish(dp: BpfDatapath, *frontends: Frontend) -> None:
    errors = dp.reconcile({fe.key: fe for fe in frontends})
    assert errors == []


def masquerading(dp: BpfDatapath) -> None:
    """The node masquerades with NODE and one NAT port, so tc and XDP must agree on it."""
    dp.configure(
        NodeConfig(
            snat_address=ip(NODE),
            nat_ports=(61000, 61000),
            cluster_cidrs=(ipaddress.IPv4Network("10.244.0.0/16"),),
        )
    )


def flush_flows(dp: BpfDatapath) -> None:
    for bpf_map in (dp.maps.ct4, dp.maps.nat4):
        for key in list(bpf_map.keys()):
            bpf_map.delete(key)


def flows(dp: BpfDatapath) -> int:
    return len(dp.maps.ct4) + len(dp.maps.nat4)


def l3l4_without_forwarding(frame: bytes) -> bytes:
    """IP header and segment with the TTL and IP checksum zeroed: what NAT alone decides."""
    out = bytearray(frame[ETH_HLEN:])
    out[8] = 0
    out[10:12] = b"\0\0"
    return bytes(out)


def valid(result: libbpf.TestRun) -> packets.Parsed:
    out = packets.parse(result.data)
    assert out.ip_csum_ok, "IPv4 header checksum is wrong"
    assert out.l4_csum_ok is True, f"L4 checksum is wrong: {out}"
    return out


def syn_from_outside(dst: str, dport: int, sport: int = 40000, **kw: Any) -> bytes:
    return packets.ipv4_tcp(OUTSIDE, dst, sport, dport, "S", b"hello", seq=7000, **kw)


NEW_FLOWS = {
    # name: (masquerade?, frame, expected (src, sport, dst, dport))
    "nodeport-tcp-masqueraded": (
        True,
        syn_from_outside(NODE, NODE_PORT, tcp_options=b"\x02\x04\x05\xb4"),
        (NODE, 61000, BACKENDS[0], TARGET),
    ),
    "nodeport-udp-masqueraded": (
        True,
        packets.ipv4_udp(OUTSIDE, NODE, 40001, NODE_PORT, b"query"),
        (NODE, 61000, BACKENDS[0], TARGET),
    ),
    "clusterip-tcp": (
        False,
        syn_from_outside(VIP, 80, sport=40002),
        (OUTSIDE, 40002, BACKENDS[0], TARGET),
    ),
    "clusterip-udp": (
        False,
        packets.ipv4_udp(OUTSIDE, VIP, 40003, 80, b"query"),
        (OUTSIDE, 40003, BACKENDS[0], TARGET),
    ),
}


def publish_one_backend(dp: BpfDatapath, masq: bool, frame: bytes) -> None:
    parsed = packets.parse(frame)
    assert parsed.dst is not None and parsed.dport is not None
    proto = Protocol(parsed.proto)
    if masq:
        masquerading(dp)
        fe = frontend(NODE, NODE_PORT, proto, BACKENDS[:1], "NodePort")
    else:
        fe = frontend(VIP, 80, proto, BACKENDS[:1], "ClusterIP")
    publish(dp, fe)


@pytest.mark.parametrize("name", list(NEW_FLOWS))
def test_xdp_and_tc_translate_a_new_flow_identically(
    clean_datapath: BpfDatapath, fib: Fib, name: str
) -> None:
    dp = clean_datapath
    masq, frame, (src, sport, dst, dport) = NEW_FLOWS[name]
    publish_one_backend(dp, masq, frame)
    assert packets.parse(frame).l4_csum_ok is True

    before = stats(dp)
    by_xdp = run_xdp(dp, fib, frame)
    assert by_xdp.retval == XDP_REDIRECT
    out = valid(by_xdp)
    assert (out.src, out.sport, out.dst, out.dport) == (src, sport, dst, dport)
    assert out.ttl == 63, "XDP forwards like a router: TTL decremented"
    assert (out.src_mac, out.dst_mac) == (fib.out_mac, BACKEND_MAC)
    want = {STAT["DNAT_NEW"]: 1, STAT["XDP_REDIRECT"]: 1}
    if masq:
        want[STAT["SNAT_NEW"]] = 1
    assert stat_delta(before, stats(dp)) == want
    recorded = flows(dp)
    assert recorded == 2  # forward entry and a reverse (ct4 or nat4) entry

    # The same packet through tc, from the same (empty) flow state.
    flush_flows(dp)
    by_tc = run_tc(dp, frame)
    assert by_tc.retval in (TC_ACT_OK, TC_ACT_REDIRECT)
    tc_out = valid(by_tc)
    assert l3l4_without_forwarding(by_xdp.data) == l3l4_without_forwarding(by_tc.data)
    # Byte for byte, the L4 checksum included, the two computed the same.
    ihl = out.ip_header_len
    assert by_xdp.data[ETH_HLEN + ihl :] == by_tc.data[ETH_HLEN + ihl :]
    assert tc_out.ttl == (63 if by_tc.retval == TC_ACT_REDIRECT else 64)
    assert flows(dp) == recorded


def test_xdp_follows_a_flow_and_restores_its_replies(clean_datapath: BpfDatapath, fib: Fib) -> None:
    dp = clean_datapath
    masquerading(dp)
    publish(dp, frontend(NODE, NODE_PORT, Protocol.TCP, BACKENDS, "NodePort"))
    first = valid(run_xdp(dp, fib, syn_from_outside(NODE, NODE_PORT)))
    backend, nat_port = first.dst, first.sport
    assert backend in BACKENDS and first.src == NODE and nat_port is not None

    before = stats(dp)
    for n in range(20):
        frame = packets.ipv4_tcp(OUTSIDE, NODE, 40000, NODE_PORT, "PA", b"x%d" % n, seq=7006 + n)
        result = run_xdp(dp, fib, frame)
        assert result.retval == XDP_REDIRECT
        out = valid(result)
        assert (out.src, out.sport, out.dst, out.dport) == (NODE, nat_port, backend, TARGET)
        assert out.payload == b"x%d" % n
    assert stat_delta(before, stats(dp)) == {STAT["DNAT_EST"]: 20, STAT["XDP_REDIRECT"]: 20}

    # The backend's reply, as if it arrived on out0: back to the client, from the NodePort.
    before = stats(dp)
    reply = packets.ipv4_tcp(backend, NODE, TARGET, nat_port, "SA", b"", seq=1, ack=7001)
    result = run_xdp(dp, fib, reply, fib.out_index)
    assert result.retval == XDP_REDIRECT
    out = valid(result)
    assert (out.src, out.sport, out.dst, out.dport) == (NODE, NODE_PORT, OUTSIDE, 40000)
    assert (out.src_mac, out.dst_mac, out.ttl) == (fib.in_mac, CLIENT_MAC, 63)
    assert stat_delta(before, stats(dp)) == {STAT["SNAT_REVERSE"]: 1, STAT["XDP_REDIRECT"]: 1}
    fwd = forward_entry(dp, packets.parse(syn_from_outside(NODE, NODE_PORT)))
    assert fwd is not None and fwd.flags & CT_F_SEEN_REPLY


def test_xdp_restores_replies_of_an_unmasqueraded_flow(
    clean_datapath: BpfDatapath, fib: Fib
) -> None:
    dp = clean_datapath
    publish(dp, frontend(VIP, 53, Protocol.UDP, BACKENDS, "ClusterIP"))
    out = valid(run_xdp(dp, fib, packets.ipv4_udp(OUTSIDE, VIP, 40100, 53, b"q")))
    assert out.src == OUTSIDE and out.dst in BACKENDS
    before = stats(dp)
    reply = packets.ipv4_udp(out.dst, OUTSIDE, TARGET, 40100, b"answer")
    result = run_xdp(dp, fib, reply, fib.out_index)
    assert result.retval == XDP_REDIRECT
    back = valid(result)
    assert (back.src, back.sport, back.dst, back.dport) == (VIP, 53, OUTSIDE, 40100)
    assert back.payload == b"answer"
    assert stat_delta(before, stats(dp)) == {STAT["RNAT"]: 1, STAT["XDP_REDIRECT"]: 1}


def test_xdp_leaves_a_flow_to_the_node_itself_to_tc_unmasqueraded(
    clean_datapath: BpfDatapath, fib: Fib
) -> None:
    """A NodePort whose endpoint is the node itself (hostNetwork): the FIB says
    local, so XDP hands tc the packet untouched, having recorded the flow as tc
    would: unmasqueraded, no NAT port (the node's stack answers; the egress
    hook translates the reply)."""
    dp = clean_datapath
    dp.configure(
        NodeConfig(
            snat_address=ip(NODE),
            nat_ports=(61000, 61000),
            cluster_cidrs=(ipaddress.IPv4Network("10.244.0.0/16"),),
            host_addresses=frozenset({ip(NODE)}),
        )
    )
    publish(dp, frontend(NODE, NODE_PORT, Protocol.TCP, (NODE,), "NodePort"))
    frame = syn_from_outside(NODE, NODE_PORT)
    before = stats(dp)
    result = run_xdp(dp, fib, frame)
    assert (result.retval, result.data) == (XDP_PASS, frame)
    assert stat_delta(before, stats(dp)) == {STAT["XDP_TO_TC"]: 1}
    assert len(dp.maps.nat4) == 0
    with fib.ns.entered():
        by_tc = libbpf.prog_test_run(dp.prog_fd, frame)
    out = valid(by_tc)
    assert (out.src, out.sport, out.dst, out.dport) == (OUTSIDE, 40000, NODE, TARGET)
    assert stat_delta(before, stats(dp)).get(STAT["DNAT_NEW"]) == 1


def test_xdp_checksums_hold_for_many_tuples(clean_datapath: BpfDatapath, fib: Fib) -> None:
    """Random ports, payloads and both protocols: every carry of RFC 1624 gets exercised."""
    dp = clean_datapath
    masquerading(dp)
    dp.configure(
        NodeConfig(
            snat_address=ip(NODE),
            nat_ports=(61000, 65535),
            cluster_cidrs=(ipaddress.IPv4Network("10.244.0.0/16"),),
        )
    )
    publish(
        dp,
        frontend(NODE, NODE_PORT, Protocol.TCP, BACKENDS, "NodePort"),
        frontend(NODE, NODE_PORT, Protocol.UDP, BACKENDS, "NodePort"),
    )
    rng = random.Random(7)
    for _ in range(300):
        sport = rng.randrange(1024, 65536)
        payload = rng.randbytes(rng.randrange(0, 64))
        if rng.random() < 0.5:
            frame = packets.ipv4_tcp(OUTSIDE, NODE, sport, NODE_PORT, "S", payload, seq=sport)
        else:
            frame = packets.ipv4_udp(OUTSIDE, NODE, sport, NODE_PORT, payload)
        result = run_xdp(dp, fib, frame)
        assert result.retval == XDP_REDIRECT
        out = valid(result)
        assert out.src == NODE and out.dst in BACKENDS and out.payload == payload


def test_xdp_udp_checksum_zero_stays_zero_and_a_zero_sum_becomes_ffff(
    clean_datapath: BpfDatapath, fib: Fib
) -> None:
    dp = clean_datapath
    publish(dp, frontend(VIP, 53, Protocol.UDP, BACKENDS[:1], "ClusterIP"))
    frame = packets.ipv4_udp(OUTSIDE, VIP, 41000, 53, b"no-csum", zero_checksum=True)
    out = valid(run_xdp(dp, fib, frame))
    assert out.udp_csum_zero and out.dst == BACKENDS[0]

    # The 2-byte payload that makes the translated datagram's checksum fold to zero.
    pseudo = ip(OUTSIDE).packed + ip(BACKENDS[0]).packed + bytes([0, 17]) + (10).to_bytes(2)
    plain = packets.ipv4_udp(OUTSIDE, BACKENDS[0], 41001, TARGET, b"\0\0", zero_checksum=True)
    payload = packets.checksum(pseudo + plain[ETH_HLEN + 20 :]).to_bytes(2, "big")
    result = run_xdp(dp, fib, packets.ipv4_udp(OUTSIDE, VIP, 41001, 53, payload))
    out = valid(result)
    assert not out.udp_csum_zero
    assert result.data[ETH_HLEN + 26 : ETH_HLEN + 28] == b"\xff\xff"


def _no_backends(dp: BpfDatapath) -> None:
    publish(
        dp,
        frontend(VIP, 80, Protocol.TCP, (), "ClusterIP"),
        frontend(VIP, 53, Protocol.UDP, (), "ClusterIP"),
    )


HANDED_TO_TC: dict[str, tuple[tuple[str, ...], bytes, str]] = {
    # name: (backends of VIP:80/TCP and VIP:53/UDP, frame, how it arrives)
    "no-neighbour-yet": ((NO_NEIGH,), syn_from_outside(VIP, 80), "in0"),
    "ttl-1": (BACKENDS, syn_from_outside(VIP, 80, ttl=1), "in0"),
    "local-destination": ((NODE,), syn_from_outside(VIP, 80), "in0"),
    "bigger-than-route-mtu": (
        (SMALL_MTU,),
        packets.ipv4_udp(OUTSIDE, VIP, 40000, 53, b"x" * 1100),
        "in0",
    ),
    "forwarding-off-on-ingress": (BACKENDS, syn_from_outside(VIP, 80), "nf0"),
    "reject-tcp-syn": ((), syn_from_outside(VIP, 80), "in0"),
    "reject-udp": ((), packets.ipv4_udp(OUTSIDE, VIP, 40000, 53, b"q"), "in0"),
}


@pytest.mark.parametrize("name", list(HANDED_TO_TC))
def test_xdp_hands_what_it_cannot_finish_to_tc_untouched(
    clean_datapath: BpfDatapath, fib: Fib, name: str
) -> None:
    dp = clean_datapath
    backends, frame, arrives = HANDED_TO_TC[name]
    publish(
        dp,
        frontend(VIP, 80, Protocol.TCP, backends, "ClusterIP"),
        frontend(VIP, 53, Protocol.UDP, backends, "ClusterIP"),
    )
    before = stats(dp)
    result = run_xdp(dp, fib, frame, fib.nf_index if arrives == "nf0" else fib.in_index)
    assert result.retval == XDP_PASS
    assert result.data == frame, "a packet handed to tc was modified"
    assert stat_delta(before, stats(dp)) == {STAT["XDP_TO_TC"]: 1}
    parsed = packets.parse(frame)
    chosen = forward_entry(dp, parsed)

    # tc then does the whole job: it follows the flow XDP recorded, or rejects.
    before = stats(dp)
    by_tc = run_tc(dp, frame)
    delta = stat_delta(before, stats(dp))
    if backends:
        assert chosen is not None, "XDP decided, so it recorded the flow for tc to follow"
        assert by_tc.retval in (TC_ACT_OK, TC_ACT_REDIRECT)
        assert valid(by_tc).dst == layout.ip4_str(chosen.nat_addr)
        # the flow counts once as new, where its first packet was translated
        assert delta.get(STAT["DNAT_NEW"]) == 1 and STAT["DNAT_EST"] not in delta, delta
        assert flows(dp) == 2
    else:
        assert chosen is None and flows(dp) == 0
        assert by_tc.retval == TC_ACT_REDIRECT  # the reset or ICMP error, back out
        assert delta == {STAT["REJECT"]: 1}


def forward_entry(dp: BpfDatapath, p: packets.Parsed) -> Any:
    assert p.src and p.dst and p.sport is not None and p.dport is not None
    key = layout.new(
        "struct ct4_key",
        saddr=layout.ip4(p.src),
        daddr=layout.ip4(p.dst),
        sport=layout.port(p.sport),
        dport=layout.port(p.dport),
        proto=p.proto,
        dir=0,
    )
    return dp.maps.ct4.lookup(key)


_VIP_SYN = syn_from_outside(VIP, 80)
PASSED: dict[str, bytes] = {
    "ip-options-to-vip": syn_from_outside(VIP, 80, ip_options=b"\x94\x04\0\0"),
    "first-fragment-to-vip": packets.ipv4_tcp(
        OUTSIDE, VIP, 40000, 80, "S", b"01234567", more_fragments=True
    ),
    "later-fragment-to-vip": packets.ipv4_tcp(
        OUTSIDE, VIP, 40000, 80, payload=b"x" * 8, frag_off=8
    ),
    "icmp-echo-to-vip": packets.ipv4_icmp_echo(OUTSIDE, VIP),
    "arp-for-vip": packets.arp_request(OUTSIDE, VIP),
    "ipv6-udp": packets.ipv6_udp("fd00::1", "fd00::10", 40000, 53, b"x"),
    "tcp-other-port": syn_from_outside(VIP, 81),
    "tcp-header-cut": _VIP_SYN[: ETH_HLEN + 20 + 19],
    "datagram-cut": packets.ipv4_udp(OUTSIDE, VIP, 40000, 53, b"0123456789")[:-4],
    "reply-without-a-flow": packets.ipv4_tcp(BACKENDS[0], OUTSIDE, TARGET, 40000, "SA"),
}


@pytest.mark.parametrize("name", list(PASSED))
def test_xdp_passes_what_is_not_a_plain_balanced_packet(
    clean_datapath: BpfDatapath, fib: Fib, name: str
) -> None:
    dp = clean_datapath
    publish(
        dp,
        frontend(VIP, 80, Protocol.TCP, BACKENDS, "ClusterIP"),
        frontend(VIP, 53, Protocol.UDP, BACKENDS, "ClusterIP"),
    )
    frame = PASSED[name]
    before = stats(dp)
    result = run_xdp(dp, fib, frame)
    assert result.retval == XDP_PASS
    assert result.data == frame
    assert stat_delta(before, stats(dp)) == {STAT["XDP_PASS"]: 1}
    assert flows(dp) == 0


def test_xdp_drops_what_tc_would_drop(clean_datapath: BpfDatapath, fib: Fib) -> None:
    dp = clean_datapath
    masquerading(dp)
    publish(
        dp,
        frontend(
            NODE, NODE_PORT, Protocol.TCP, BACKENDS, "LoadBalancer",
            ranges=(ipaddress.IPv4Network("203.0.113.0/24"),),
        ),
        frontend(NODE, NODE_PORT, Protocol.UDP, (), "NodePort", drop_empty=True),
        frontend(VIP, 80, Protocol.TCP, (), "ClusterIP"),
    )  # fmt: skip
    cases = [
        (syn_from_outside(NODE, NODE_PORT), "DROP_SOURCE_RANGE"),
        (packets.ipv4_udp(OUTSIDE, NODE, 40000, NODE_PORT, b"q"), "DROP_NO_LOCAL"),
        (packets.ipv4_tcp(OUTSIDE, VIP, 40000, 80, "A"), "DROP_NO_BACKEND"),
    ]
    for frame, stat in cases:
        before = stats(dp)
        assert run_xdp(dp, fib, frame).retval == XDP_DROP, stat
        assert stat_delta(before, stats(dp)) == {STAT[stat]: 1}
        # tc's verdict on the same packet is the same
        assert run_tc(dp, frame).retval == TC_ACT_SHOT
    assert flows(dp) == 0


def test_a_flow_xdp_recorded_is_followed_by_tc(clean_datapath: BpfDatapath, fib: Fib) -> None:
    """A later packet XDP hands over (here: TTL 1) goes to the backend XDP chose."""
    dp = clean_datapath
    masquerading(dp)
    publish(dp, frontend(NODE, NODE_PORT, Protocol.TCP, BACKENDS, "NodePort"))
    first = valid(run_xdp(dp, fib, syn_from_outside(NODE, NODE_PORT)))
    late = packets.ipv4_tcp(OUTSIDE, NODE, 40000, NODE_PORT, "A", ttl=1, seq=7006)
    assert run_xdp(dp, fib, late).retval == XDP_PASS
    before = stats(dp)
    out = valid(run_tc(dp, late))
    assert (out.src, out.sport, out.dst) == (NODE, first.sport, first.dst)
    assert STAT["DNAT_EST"] in stat_delta(before, stats(dp))


# ---------------------------------------------------------------- attaching


def test_attach_replace_and_detach_only_lbctls_program(datapath: BpfDatapath) -> None:
    from bcc import BPF

    other = BPF(text=b"int other_xdp(struct xdp_md *ctx) { return XDP_PASS; }")
    other_fd = other.load_func(b"other_xdp", BPF.XDP).fd
    with Lab() as lab:
        ns = lab.netns("xdpattach")
        netlab.veth(ns, "x0", ns, "x1")
        ns.ip("link", "add", "br0", "type", "bridge")  # no native XDP in its driver
        with ns.entered():
            links = {link.name: link for link in tc.all_links()}
            x0, x1, br0 = links["x0"], links["x1"], links["br0"]
            xdp.attach(x0, xdp_fd(datapath), "generic")
            xdp.attach(x0, xdp_fd(datapath), "generic")  # a restart: replaced in place
            assert xdp.attached_interfaces() == ["x0"]
            xdp.attach(x0, xdp_fd(datapath), "native")  # a mode change
            assert " xdp " in ns.ip("link", "show", "x0").stdout  # native: "xdp", not "xdpgeneric"
            # someone else's program is never replaced, nor removed
            with foreign_xdp(ns, "x1", other_fd):
                with pytest.raises(tc.AttachError, match="x1: another XDP program"):
                    xdp.attach(x1, xdp_fd(datapath), "generic")
                assert xdp.detach(["x0", "x1", "gone0"]) == ["x0"]
                assert "prog/xdp" in ns.ip("link", "show", "x1").stdout
            assert xdp.attached_interfaces() == []
            with pytest.raises(tc.AttachError, match=r"br0: .*native mode.*--xdp generic"):
                xdp.attach(br0, xdp_fd(datapath), "native")
            with pytest.raises(tc.AttachError, match="unknown XDP mode"):
                xdp.attach(br0, xdp_fd(datapath), "fast")
    other.cleanup()


@contextlib.contextmanager
def foreign_xdp(ns: Netns, ifname: str, fd: int) -> Iterator[None]:
    """Someone else's XDP program (generic) on an interface, for the duration."""
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.link("set", index=index, xdp={"attrs": [("IFLA_XDP_FD", fd)]})
    try:
        yield
    finally:
        ns.ip("link", "set", ifname, "xdpgeneric", "off")


# ---------------------------------------------------------- part 2: the real agent


class XdpEnv(external.Env):
    """test_external's world and agent, the agent running with --xdp `mode`."""

    def __init__(self, world: extlab.World, agent: AgentProcess, manifests: Path, mode: str):
        super().__init__(world, agent, manifests)
        self.mode = mode


def start(tmp_path: Path, pin_dir: Path, lab: Lab, mode: str) -> XdpEnv:
    world = extlab.build(lab)
    if mode == "native":
        # Native XDP_REDIRECT into a veth drops everything unless the receiving end
        # runs NAPI: GRO on for the peers, inside the test's namespaces only.
        for pod in world.pods_a:
            pod.ns.run("ethtool", "-K", "eth0", "gro", "on")
        world.node_b.run("ethtool", "-K", "und0", "gro", "on")
    for pod in world.pods_a + world.pods_b:
        TcpServer(pod, 8080)
        UdpServer(pod, 5353)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    flags = [*extlab.agent_flags(), "--xdp", mode, "--external-interfaces", "ext0"]
    agent = AgentProcess(world.node_a, manifests, pin_dir, tmp_path / "agent.log", *flags)
    return XdpEnv(world, agent, manifests, mode)


def run_agent(env: XdpEnv, **spec: object) -> None:
    env.publish(**spec)
    env.agent.start()
    env.agent.wait_for_log("synced:")
    env.agent.wait_for_log(f"attached XDP program ({env.mode}) to ext0")
    with env.world.node_a.entered():
        assert xdp.attached_interfaces() == ["ext0"]
        ext0 = {link.name: link for link in tc.all_links()}["ext0"]
        with IPRoute() as ipr:
            assert [p.mode for p in xdp.programs(ipr, ext0.index)] == [env.mode]


def assert_xdp_forwarded(
    delta: dict[str, int], tcp_requests: int, udp_requests: int, next_hops: int
) -> None:
    """XDP, not tc, forwarded the client's packets towards the pods.

    Every packet of a balanced flow from the client meets XDP first, which counts it
    as xdp_redirected or xdp_to_tc; whoever translates it counts new_flows or
    established.  XDP hands a packet to tc only while the neighbour of its next hop
    is unresolved: tc's bpf_redirect_neigh resolves it, so that is the first packet
    towards each pod of node A and towards node B.  tc's own forwarding (redirected)
    is then the pods' replies plus those few packets.
    """
    forward = delta["new_flows"] + delta["established"]
    assert forward >= 3 * tcp_requests + udp_requests, delta  # SYN, ACK, data; a datagram
    assert delta["xdp_redirected"] + delta["xdp_to_tc"] == forward, delta
    assert delta["xdp_to_tc"] <= next_hops, delta
    replies = delta["reverse_nat"] + delta["snat_reverse"]
    assert delta["redirected"] <= replies + delta["xdp_to_tc"], delta


def counters(env: XdpEnv) -> dict[str, int]:
    data: dict[str, int] = env.agent.dump()["counters"]
    return data


def csum_errors(ns: Netns) -> int:
    snmp = netlab.snmp_counters(ns)
    return snmp["Tcp.InCsumErrors"] + snmp["Udp.InCsumErrors"]


MODES = ["generic", "native"]


@pytest.fixture(params=MODES)
def xenv(request: pytest.FixtureRequest, tmp_path: Path, pin_dir: Path) -> Iterator[XdpEnv]:
    with Lab() as lab:
        env = start(tmp_path, pin_dir, lab, request.param)
        try:
            yield env
        finally:
            env.agent.stop()


def test_xdp_forwards_outside_traffic_to_both_nodes_masqueraded(xenv: XdpEnv) -> None:
    run_agent(xenv)
    w = xenv.world
    everyone = {p.name for p in w.pods_a + w.pods_b}
    before = counters(xenv)
    n = 40
    for address, tcp_port, udp_port in ((NODE_IP, 30080, 30081), (LB_IP, 80, 53)):
        tcp = [tcp_request(w.client, address, tcp_port) for _ in range(n)]
        udp = [udp_request(w.client, address, udp_port) for _ in range(n)]  # source checked
        for replies in (tcp, udp):
            assert {r.pod for r in replies} == everyone, address
            assert {r.peer_ip for r in replies} == {NODE_IP}  # masqueraded
            assert all(61000 <= r.peer_port <= 65535 for r in replies)
    delta = {k: v - before[k] for k, v in counters(xenv).items()}
    assert_xdp_forwarded(delta, tcp_requests=2 * n, udp_requests=2 * n, next_hops=3)
    assert delta["snat_new"] == delta["new_flows"]  # every flow masqueraded
    assert delta["snat_reverse"] >= 2 * 2 * n + 2 * n  # SYN-ACK and data per TCP request
    for pod in w.pods_a + w.pods_b:
        assert csum_errors(pod.ns) == 0, pod.name


def test_xdp_local_policy_keeps_the_client_address(xenv: XdpEnv) -> None:
    run_agent(xenv, externalTrafficPolicy="Local")
    w = xenv.world
    local = {p.name for p in w.pods_a}
    before = counters(xenv)
    for address, port in ((NODE_IP, 30080), (LB_IP, 80)):
        replies = [tcp_request(w.client, address, port) for _ in range(30)]
        assert {r.pod for r in replies} == local
        assert {r.peer_ip for r in replies} == {CLIENT_IP}
        udp = udp_request(w.client, address, 30081 if address == NODE_IP else 53)
        assert udp.pod in local and udp.peer_ip == CLIENT_IP
    delta = {k: v - before[k] for k, v in counters(xenv).items()}
    assert_xdp_forwarded(delta, tcp_requests=2 * 30, udp_requests=2, next_hops=2)
    assert delta["snat_new"] == 0 and delta["reverse_nat"] >= 2 * 2 * 30, delta
    for pod in w.pods_a:
        assert csum_errors(pod.ns) == 0, pod.name


def _icmp_port_unreachable(sock: socket.socket, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            packet = sock.recv(2048)
        except TimeoutError:
            return False
        ihl = (packet[0] & 0x0F) * 4
        if packet[ihl] == 3 and packet[ihl + 1] == 3:
            return True
    return False


def test_xdp_service_without_endpoints_still_rejects_at_once(xenv: XdpEnv) -> None:
    run_agent(xenv, pods=[])
    w = xenv.world
    before = counters(xenv)
    started = time.monotonic()
    with pytest.raises(RequestError, match="refused"):
        tcp_request(w.client, NODE_IP, 30080, timeout=3.0)
    assert time.monotonic() - started < 1.0
    with w.client.entered():
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        with w.client.open_socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.connect((LB_IP, 53))
            udp.send(b"anyone?")
            assert _icmp_port_unreachable(raw, 2.0), "no ICMP port unreachable arrived"
    finally:
        raw.close()
    delta = {k: v - before[k] for k, v in counters(xenv).items()}
    assert delta["xdp_to_tc"] >= 2 and delta["rejected_no_backend"] >= 2, delta
    assert delta["xdp_redirected"] == 0, delta


def test_xdp_restart_replaces_the_program_without_a_gap(tmp_path: Path, pin_dir: Path) -> None:
    """kill -9 and a new agent: traffic flows throughout, the new program replaces the old."""
    with Lab() as lab:
        env = start(tmp_path, pin_dir, lab, "generic")
        try:
            run_agent(env)
            w = env.world
            with w.node_a.entered(), IPRoute() as ipr:
                ext0 = ipr.link_lookup(ifname="ext0")[0]
                old = xdp.programs(ipr, ext0)
            session = netlab.TcpSession(w.client, NODE_IP, 30080, timeout=2.0)
            try:
                first = session.ask("before")
                env.agent.kill()
                # the datapath outlives the agent
                assert session.ask("orphaned").pod == first.pod
                assert tcp_request(w.client, LB_IP, 80).peer_ip == NODE_IP
                env.agent.start()
                deadline = time.monotonic() + 30
                while env.agent.log_text().count("attached XDP program (generic) to ext0") < 2:
                    assert time.monotonic() < deadline, env.agent.log_text()
                    time.sleep(0.05)
                assert session.ask("after").pod == first.pod
            finally:
                session.close()
            with w.node_a.entered(), IPRoute() as ipr:
                new = xdp.programs(ipr, ext0)
            assert [p.ours for p in new] == [True] and new[0].prog_id != old[0].prog_id
            before = counters(env)
            replies = [udp_request(w.client, LB_IP, 53) for _ in range(10)]
            assert {r.peer_ip for r in replies} == {NODE_IP}
            delta = {k: v - before[k] for k, v in counters(env).items()}
            # the new program forwards; only a pod not reached before goes through tc once
            assert delta["xdp_redirected"] + delta["xdp_to_tc"] == 10, delta
            assert delta["xdp_to_tc"] <= 3, delta
        finally:
            env.agent.stop()
