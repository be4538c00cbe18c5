"""Endpoints outside the pod network and on the node itself, under BPF_PROG_TEST_RUN:
the backend's say in masquerading (lb4_backend flags the agent sets from the pod
network and the node's addresses) and the egress program that translates the
replies of the node's own stack.

The egress program is run as the kernel runs it on an interface's egress hook:
a packet the node's stack sent has no ingress interface, one that was received
and is being forwarded (pod to pod) has one, which the test sets in the
context (struct __sk_buff.ingress_ifindex).  Every frame that comes out has its
IPv4 and TCP/UDP (pseudo-header included) or ICMP checksums verified.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from pathlib import Path

import pytest

from lbctl.datapath import NodeConfig
from lbctl.datapath.ebpf import layout, libbpf
from lbctl.datapath.ebpf.compiler import EGRESS_PROGRAM
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.model import Protocol, ServiceRef
from lbctl.plan.planner import Backend, Frontend, FrontendKey
from tests import packets
from tests.test_bpf_prog import TC_ACT_OK, checked, run, stat_delta, stats

NODE = "192.0.2.1"  # the node's address: masquerade address, and a hostNetwork endpoint
POD = "10.244.0.10"  # a client pod
OTHER_POD = "10.244.1.20"  # a pod on another node
API = "192.168.50.10"  # the API server: outside the pod network
OUTSIDE = "198.51.100.7"  # a client outside the cluster
CIDR = "10.244.0.0/16"
KUBERNETES = "10.96.0.1"
HOSTSVC = "10.96.0.2"
MIXED = "10.96.0.3"
NODE_PORT = 30443

STAT_RNAT = layout.const("LB_STAT_RNAT")
STAT_EGRESS = layout.const("LB_STAT_EGRESS_RNAT")
STAT_SNAT_NEW = layout.const("LB_STAT_SNAT_NEW")
STAT_SNAT_REVERSE = layout.const("LB_STAT_SNAT_REVERSE")
STAT_ICMP = layout.const("LB_STAT_ICMP_ERROR")
INGRESS_IFINDEX_OFFSET = 36  # offsetof(struct __sk_buff, ingress_ifindex), uapi


def ip(a: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(a)


def frontend(
    vip: str, port: int, proto: Protocol, backends: list[tuple[str, int]], kind: str = "ClusterIP"
) -> Frontend:
    return Frontend(
        FrontendKey(ip(vip), port, proto),
        ServiceRef("default", f"svc-{vip}-{port}"),
        proto.name.lower(),
        kind,
        tuple(Backend(ip(a), target, proto) for a, target in backends),
    )


SERVICES = [
    frontend(KUBERNETES, 443, Protocol.TCP, [(API, 6443)]),
    frontend(KUBERNETES, 53, Protocol.UDP, [(API, 5353)]),
    frontend(HOSTSVC, 443, Protocol.TCP, [(NODE, 6443)]),
    frontend(HOSTSVC, 53, Protocol.UDP, [(NODE, 6053)]),
    frontend(NODE, NODE_PORT, Protocol.TCP, [(NODE, 6443)], kind="NodePort"),
    frontend(MIXED, 80, Protocol.TCP, [(OTHER_POD, 8080)]),
]


def configure(dp: BpfDatapath, cidrs: tuple[str, ...] = (CIDR,), **kw: object) -> None:
    dp.configure(
        NodeConfig(
            snat_address=ip(NODE),
            cluster_cidrs=tuple(ipaddress.IPv4Network(c) for c in cidrs),
            host_addresses=frozenset({ip(NODE)}),
            **kw,  # type: ignore[arg-type]
        )
    )


@pytest.fixture
def dp(clean_datapath: BpfDatapath) -> BpfDatapath:
    configure(clean_datapath)
    assert clean_datapath.reconcile({fe.key: fe for fe in SERVICES}) == []
    return clean_datapath


def egress(dp: BpfDatapath, frame: bytes, ingress_ifindex: int = 0) -> libbpf.TestRun:
    """One frame through lbctl_tc_egress; ingress_ifindex 0: the node's stack sent it."""
    ctx = bytearray(INGRESS_IFINDEX_OFFSET + 4)
    struct.pack_into("=I", ctx, INGRESS_IFINDEX_OFFSET, ingress_ifindex)
    result = libbpf.prog_test_run(dp.prog_fds[EGRESS_PROGRAM], frame, ctx=bytes(ctx))
    assert len(result.data) == len(frame), "the program must not resize the frame"
    return result


def backend_flags(dp: BpfDatapath) -> dict[str, int]:
    return {
        layout.ip4_str(v.addr): int(v.flags)
        & (layout.const("LB_BACKEND_F_HOST") | layout.const("LB_BACKEND_F_MASQ_PODS"))
        for _, v in dp.maps.lb4_backends.items()
    }


def test_the_agent_flags_each_backend_by_where_it_is(dp: BpfDatapath) -> None:
    host, outside = layout.const("LB_BACKEND_F_HOST"), layout.const("LB_BACKEND_F_MASQ_PODS")
    assert backend_flags(dp) == {API: outside, NODE: host, OTHER_POD: 0}
    # with only this node's pod range known, a pod of another node is outside too
    configure(dp, cidrs=("10.244.0.0/24",), node_cidrs=True)
    assert backend_flags(dp) == {API: outside, NODE: host, OTHER_POD: outside}
    # nothing known: no client can be told to be a pod, so nothing is outside
    configure(dp, cidrs=())
    assert backend_flags(dp) == {API: 0, NODE: host, OTHER_POD: 0}
    # the node loses that address: its endpoint is a host outside like any other
    dp.configure(NodeConfig(snat_address=ip(NODE), cluster_cidrs=(ipaddress.IPv4Network(CIDR),)))
    assert backend_flags(dp) == {API: outside, NODE: outside, OTHER_POD: 0}


@pytest.mark.parametrize("proto", [Protocol.TCP, Protocol.UDP])
def test_a_pods_flow_to_an_endpoint_outside_the_pod_network_is_masqueraded(
    dp: BpfDatapath, proto: Protocol
) -> None:
    """Issue 18 bug 4: the SYN left with the pod's address, which the API host cannot
    route back; the node's CNI masquerade rule never saw it (lbctl redirects)."""
    tcp = proto is Protocol.TCP
    port, target = (443, 6443) if tcp else (53, 5353)

    def frame(src: str, dst: str, sport: int, dport: int, flags: str) -> bytes:
        if tcp:
            return packets.ipv4_tcp(src, dst, sport, dport, flags, b"hello")
        return packets.ipv4_udp(src, dst, sport, dport, b"hello")

    before = stats(dp)
    out = checked(run(dp, frame(POD, KUBERNETES, 40000, port, "S")))
    assert (out.src, out.dst, out.dport) == (NODE, API, target)
    assert 61000 <= out.sport <= 65535
    assert stat_delta(before, stats(dp)).get(STAT_SNAT_NEW) == 1
    back = checked(run(dp, frame(API, NODE, target, out.sport, "SA")))
    assert (back.src, back.sport, back.dst, back.dport) == (KUBERNETES, port, POD, 40000)
    assert stat_delta(before, stats(dp)).get(STAT_SNAT_REVERSE) == 1
    # a pod behind a ClusterIP on another node keeps the pod's address (kube-proxy's)
    to_pod = checked(run(dp, frame(POD, MIXED, 40001, 80, "S"))) if tcp else None
    if to_pod is not None:
        assert (to_pod.src, to_pod.sport, to_pod.dst) == (POD, 40001, OTHER_POD)
    # an outside client is masqueraded by the ClusterIP rule already: the same
    far = checked(run(dp, frame(OUTSIDE, KUBERNETES, 40002, port, "S")))
    assert far.src == NODE


def test_knowing_only_this_nodes_pod_range_masquerades_pods_of_other_nodes(
    dp: BpfDatapath,
) -> None:
    configure(dp, cidrs=("10.244.0.0/24",), node_cidrs=True)
    out = checked(run(dp, packets.ipv4_tcp(POD, MIXED, 40010, 80, "S")))
    assert (out.src, out.dst) == (NODE, OTHER_POD)


def test_without_a_pod_network_nothing_changes(dp: BpfDatapath) -> None:
    """No cluster CIDR and no Node pod range: no client is a pod, as before."""
    configure(dp, cidrs=())
    out = checked(run(dp, packets.ipv4_tcp(POD, KUBERNETES, 40020, 443, "S")))
    assert (out.src, out.dst) == (POD, API)


@pytest.mark.parametrize("proto", [Protocol.TCP, Protocol.UDP])
def test_the_node_stacks_reply_to_a_pod_gets_the_service_address_back(
    dp: BpfDatapath, proto: Protocol
) -> None:
    tcp = proto is Protocol.TCP
    port, target = (443, 6443) if tcp else (53, 6053)
    if tcp:
        syn = packets.ipv4_tcp(POD, HOSTSVC, 40100, port, "S")
        reply = packets.ipv4_tcp(NODE, POD, target, 40100, "SA", b"welcome", ack=1001)
    else:
        syn = packets.ipv4_udp(POD, HOSTSVC, 40100, port, b"q")
        reply = packets.ipv4_udp(NODE, POD, target, 40100, b"an answer")
    inbound = checked(run(dp, syn))
    # delivered to the node's own stack, unmasqueraded: it sees the pod
    assert (inbound.src, inbound.sport, inbound.dst, inbound.dport) == (POD, 40100, NODE, target)
    before = stats(dp)
    result = egress(dp, reply)
    assert result.retval == TC_ACT_OK
    out = checked(result)
    assert (out.src, out.sport, out.dst, out.dport) == (HOSTSVC, port, POD, 40100)
    assert out.payload == packets.parse(reply).payload
    assert stat_delta(before, stats(dp)) == {STAT_RNAT: 1, STAT_EGRESS: 1}


def test_a_udp_reply_without_checksum_keeps_none(dp: BpfDatapath) -> None:
    checked(run(dp, packets.ipv4_udp(POD, HOSTSVC, 40101, 53, b"q")))
    reply = packets.ipv4_udp(NODE, POD, 6053, 40101, b"an answer", zero_checksum=True)
    out = checked(egress(dp, reply))
    assert out.src == HOSTSVC and out.udp_csum_zero


def test_forwarded_packets_and_the_nodes_own_traffic_pass_untouched(dp: BpfDatapath) -> None:
    checked(run(dp, packets.ipv4_tcp(POD, HOSTSVC, 40200, 443, "S")))
    reply = packets.ipv4_tcp(NODE, POD, 6443, 40200, "SA", ack=1001)
    before = stats(dp)
    # received on an interface (a bridge or a router forwards it): its ingress hook saw it
    forwarded = egress(dp, reply, ingress_ifindex=7)
    assert (forwarded.retval, forwarded.data) == (TC_ACT_OK, reply)
    # the node's own connections, and a reply whose flow is not this one
    for frame in (
        packets.ipv4_tcp(NODE, POD, 50000, 8080, "S"),
        packets.ipv4_tcp(NODE, POD, 6443, 40201, "SA", ack=1001),
        packets.ipv4_udp(NODE, API, 40000, 53, b"q"),
        packets.arp_request(NODE, POD),
    ):
        result = egress(dp, frame)
        assert (result.retval, result.data) == (TC_ACT_OK, frame)
    assert stat_delta(before, stats(dp)) == {}, "nothing was counted as passed or translated"


def test_a_reply_whose_flow_moved_to_another_backend_is_left_alone(dp: BpfDatapath) -> None:
    """The forward twin decides, as on ingress: a later flow of the same client
    tuple to another backend makes the old reverse entry a stranger's."""
    checked(run(dp, packets.ipv4_tcp(POD, HOSTSVC, 40300, 443, "S")))
    dp.reconcile(
        {
            fe.key: fe
            for fe in [
                *SERVICES[:2],
                frontend(HOSTSVC, 443, Protocol.TCP, [(OTHER_POD, 8080)]),
                *SERVICES[3:],
            ]
        }
    )
    checked(run(dp, packets.ipv4_tcp(POD, HOSTSVC, 40300, 443, "S")))
    reply = packets.ipv4_tcp(NODE, POD, 6443, 40300, "SA", ack=1001)
    result = egress(dp, reply)
    assert (result.retval, result.data) == (TC_ACT_OK, reply)


@pytest.mark.parametrize("masquerade_all", [False, True])
def test_an_endpoint_on_the_node_is_never_masqueraded(
    dp: BpfDatapath, masquerade_all: bool
) -> None:
    """A NodePort (policy Cluster) masquerades, and masqueradeAll does: not towards
    the node itself, where the source would be the node's own address (a martian)."""
    configure(dp, masquerade_all=masquerade_all)
    inbound = checked(run(dp, packets.ipv4_tcp(OUTSIDE, NODE, 40400, NODE_PORT, "S")))
    assert (inbound.src, inbound.sport, inbound.dst, inbound.dport) == (OUTSIDE, 40400, NODE, 6443)
    out = checked(egress(dp, packets.ipv4_tcp(NODE, OUTSIDE, 6443, 40400, "SA", ack=1001)))
    assert (out.src, out.sport, out.dst, out.dport) == (NODE, NODE_PORT, OUTSIDE, 40400)
    pod = checked(run(dp, packets.ipv4_tcp(POD, HOSTSVC, 40401, 443, "S")))
    assert (pod.src, pod.dst) == (POD, NODE)


def test_the_node_stacks_icmp_error_about_a_flow_reaches_the_pod_from_the_service(
    dp: BpfDatapath,
) -> None:
    """No socket on the hostNetwork endpoint's UDP port: the node's port
    unreachable must quote what the pod sent (to the Service) and come from it."""
    sent = packets.ipv4_udp(POD, HOSTSVC, 40500, 53, b"anyone?")
    delivered = run(dp, sent).data
    assert packets.parse(delivered).dst == NODE
    error = packets.ipv4_icmp_error(NODE, POD, delivered, code=3)
    want = packets.ipv4_icmp_error(HOSTSVC, POD, sent, code=3)
    before = stats(dp)
    result = egress(dp, error)
    assert result.retval == TC_ACT_OK
    out = packets.parse(result.data)
    assert out.ip_csum_ok, "outer IP checksum wrong"
    assert packets.checksum(result.data[34:]) == 0, "ICMP checksum wrong"
    quote = result.data[42:62]
    assert packets.checksum(quote) == 0, "quoted IP header checksum wrong"
    assert (out.src, out.dst) == (HOSTSVC, POD)
    assert result.data[42:] == want[42:], "the quote is what the pod sent"
    assert stat_delta(before, stats(dp)) == {STAT_ICMP: 1, STAT_EGRESS: 1}
    # an error about a reply it received was routed to the VIP: left alone here
    about_reply = packets.ipv4_icmp_error(NODE, HOSTSVC, packets.ipv4_udp(HOSTSVC, POD, 53, 40500))
    result = egress(dp, about_reply)
    assert (result.retval, result.data) == (TC_ACT_OK, about_reply)


def test_maps_of_an_older_agent_get_the_backends_place_when_adopted(dp: BpfDatapath) -> None:
    """Backends written without a place (an agent from before) are rewritten by the
    restarted agent as soon as it knows the node, before new flows need it."""
    from lbctl.datapath.ebpf.frontends import FrontendWriter
    from lbctl.datapath.ebpf.nodeconf import Placement

    for key, value in list(dp.maps.lb4_backends.items()):
        value.flags &= layout.const("LB_BACKEND_F_READY") | layout.const("LB_BACKEND_F_SERVING")
        dp.maps.lb4_backends.update(key, value)
    assert set(backend_flags(dp).values()) == {0}
    restarted = FrontendWriter(dp.maps, dp.settings.table_size)
    restarted.adopt()
    conf = NodeConfig(
        snat_address=ip(NODE),
        cluster_cidrs=(ipaddress.IPv4Network(CIDR),),
        host_addresses=frozenset({ip(NODE)}),
    )
    assert restarted.set_placement(Placement.of(conf)) == []
    host, outside = layout.const("LB_BACKEND_F_HOST"), layout.const("LB_BACKEND_F_MASQ_PODS")
    assert backend_flags(dp) == {API: outside, NODE: host, OTHER_POD: 0}
    assert all(restarted.matches(fe) for fe in SERVICES)


def test_an_lb_stats_pinned_by_an_older_lbctl_grows(pin_dir: Path) -> None:
    """Adopted as it is, an lb_stats with the 21 counters of the lbctl before the
    egress hook would never count egress_reverse_nat (a lookup beyond its end
    fails): the upgrade copies it into one of this lbctl's size."""
    import subprocess

    from lbctl.datapath.ebpf.settings import BpfSettings

    pin_dir.mkdir(parents=True)
    old = pin_dir / "lb_stats"
    subprocess.run(
        ["bpftool", "map", "create", str(old), "type", "percpu_array", "key", "4", "value", "8",
         "entries", "21", "name", "lb_stats"],
        check=True,
    )  # fmt: skip
    fd = libbpf.obj_get(str(old))
    assert libbpf.map_info(fd).max_entries == 21
    os.close(fd)
    dp = BpfDatapath(BpfSettings(pin_dir=pin_dir))
    try:
        assert dp.maps.lb_stats.max_entries == layout.const("LB_STAT_MAX") > 21
        before = stats(dp)
        configure(dp)
        assert dp.reconcile({fe.key: fe for fe in SERVICES}) == []
        checked(run(dp, packets.ipv4_udp(POD, HOSTSVC, 40600, 53, b"q")))
        checked(egress(dp, packets.ipv4_udp(NODE, POD, 6053, 40600, b"a")))
        assert stat_delta(before, stats(dp))[STAT_EGRESS] == 1
    finally:
        dp.close()
