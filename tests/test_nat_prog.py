"""Masquerade, NAT ports, traffic policy and source ranges under BPF_PROG_TEST_RUN,
and the conntrack/NAT sweep of the agent on the entries real packets made."""

from __future__ import annotations

import ipaddress
import time

import pytest

from lbctl.datapath import NodeConfig
from lbctl.datapath.ebpf import conntrack_gc, layout
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.model import IPNetwork, Protocol, ServiceRef
from lbctl.plan.planner import SCOPE_EXTERNAL, Backend, Frontend, FrontendKey
from tests import packets
from tests.test_bpf_prog import TC_ACT_SHOT, checked, run, stat_delta, stats

NODE = "192.0.2.1"
OUTSIDE = "198.51.100.7"
POD_CLIENT = "10.244.3.9"
BACKEND = "10.244.0.20"
LOCAL = "10.244.0.21"
NODE_PORT = 30053

STAT_SNAT_NEW = layout.const("LB_STAT_SNAT_NEW")
STAT_NAT_EXHAUSTED = layout.const("LB_STAT_NAT_EXHAUSTED")
STAT_DROP_SOURCE_RANGE = layout.const("LB_STAT_DROP_SOURCE_RANGE")
STAT_DROP_NO_LOCAL = layout.const("LB_STAT_DROP_NO_LOCAL")


def ip(a: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(a)


def frontend(
    backends: list[str],
    scope: int = 0,
    local: bool = False,
    drop_empty: bool = False,
    ranges: tuple[IPNetwork, ...] = (),
    kind: str = "NodePort",
    proto: Protocol = Protocol.UDP,
) -> Frontend:
    return Frontend(
        FrontendKey(ip(NODE), NODE_PORT, proto, scope),
        ServiceRef("ns", "dns"),
        "",
        kind,
        tuple(Backend(ip(b), 5353, proto) for b in backends),
        local,
        drop_empty,
        ranges,
    )


@pytest.fixture
def dp(clean_datapath: BpfDatapath) -> BpfDatapath:
    clean_datapath.configure(
        NodeConfig(
            snat_address=ip(NODE),
            nat_ports=(61000, 61001),
            cluster_cidrs=(ipaddress.IPv4Network("10.244.0.0/16"),),
        )
    )
    return clean_datapath


def ask(dp: BpfDatapath, src: str, sport: int) -> packets.Parsed:
    return checked(run(dp, packets.ipv4_udp(src, NODE, sport, NODE_PORT, b"q")))


def test_outside_client_is_masqueraded_and_the_reply_restored(dp: BpfDatapath) -> None:
    dp.reconcile({fe.key: fe for fe in [frontend([BACKEND])]})
    before = stats(dp)
    out = ask(dp, OUTSIDE, 40000)
    assert (out.src, out.dst, out.dport) == (NODE, BACKEND, 5353)
    assert 61000 <= out.sport <= 61001
    assert stat_delta(before, stats(dp)).get(STAT_SNAT_NEW) == 1
    reply = run(dp, packets.ipv4_udp(BACKEND, NODE, 5353, out.sport, b"a"))
    back = checked(reply)
    assert (back.src, back.sport, back.dst, back.dport) == (NODE, NODE_PORT, OUTSIDE, 40000)


def test_nat_ports_run_out_and_come_back_after_the_sweep(dp: BpfDatapath) -> None:
    dp.reconcile({fe.key: fe for fe in [frontend([BACKEND])]})
    ports = {ask(dp, OUTSIDE, 40000 + i).sport for i in range(2)}
    assert ports == {61000, 61001}  # no collision: both ports of the range
    before = stats(dp)
    third = run(dp, packets.ipv4_udp(OUTSIDE, NODE, 40002, NODE_PORT, b"q"))
    assert third.retval == TC_ACT_SHOT
    assert stat_delta(before, stats(dp)) == {STAT_NAT_EXHAUSTED: 1}
    assert len(dp.maps.nat4) == 2
    # an hour later every flow has timed out: the sweep frees their ports
    swept = conntrack_gc.sweep(dp.maps, dp.settings, conntrack_gc.now_ns() + 3600 * 10**9)
    assert (swept.conntrack, swept.nat) == (2, 2)
    assert len(dp.maps.ct4) == 0 and len(dp.maps.nat4) == 0
    assert 61000 <= ask(dp, OUTSIDE, 40002).sport <= 61001


def test_a_tcp_flow_closed_both_ways_frees_its_nat_port_after_a_quiet_moment(
    dp: BpfDatapath,
) -> None:
    """Without this a NodePort under connection churn holds every closed flow's port
    for the closing timeout and runs dry at range/timeout new flows a second."""
    dp.reconcile({fe.key: fe for fe in [frontend([BACKEND], proto=Protocol.TCP)]})

    def syn(sport: int) -> packets.Parsed:
        return checked(run(dp, packets.ipv4_tcp(OUTSIDE, NODE, sport, NODE_PORT, "S")))

    closed, backend_first = syn(40000), syn(40001)
    assert {closed.sport, backend_first.sport} == {61000, 61001}
    # the first closes both ways, the client first; the second too, but the backend
    # first: the backend keeps that tuple in TIME_WAIT, where a new SYN may be refused
    checked(run(dp, packets.ipv4_tcp(OUTSIDE, NODE, 40000, NODE_PORT, "FA", seq=1001, ack=1)))
    checked(run(dp, packets.ipv4_tcp(BACKEND, NODE, 5353, closed.sport, "FA", seq=1, ack=1002)))
    checked(
        run(dp, packets.ipv4_tcp(BACKEND, NODE, 5353, backend_first.sport, "FA", seq=1, ack=1001))
    )
    checked(run(dp, packets.ipv4_tcp(OUTSIDE, NODE, 40001, NODE_PORT, "FA", seq=1001, ack=2)))
    before = stats(dp)
    too_soon = run(dp, packets.ipv4_tcp(OUTSIDE, NODE, 40002, NODE_PORT, "S"))
    assert too_soon.retval == TC_ACT_SHOT  # a closed flow's last ACK may still be on its way
    assert stat_delta(before, stats(dp)) == {STAT_NAT_EXHAUSTED: 1}
    time.sleep(dp.settings.nat_reuse_ms / 1000 + 0.1)
    reused = syn(40003)
    assert reused.sport == closed.sport
    reply = checked(run(dp, packets.ipv4_tcp(BACKEND, NODE, 5353, reused.sport, "SA", ack=1001)))
    assert (reply.dst, reply.dport) == (OUTSIDE, 40003)
    # the flow the backend closed first keeps its port
    before = stats(dp)
    assert run(dp, packets.ipv4_tcp(OUTSIDE, NODE, 40004, NODE_PORT, "S")).retval == TC_ACT_SHOT
    assert stat_delta(before, stats(dp)) == {STAT_NAT_EXHAUSTED: 1}
    # the first client reuses its port: its old binding is someone else's now, so
    # it must not restart on it (its SYN-ACK would go to 40003); no port is free
    before = stats(dp)
    assert run(dp, packets.ipv4_tcp(OUTSIDE, NODE, 40000, NODE_PORT, "S")).retval == TC_ACT_SHOT
    assert stat_delta(before, stats(dp)) == {STAT_NAT_EXHAUSTED: 1}
    # while a closed flow whose binding is still its own restarts on it
    checked(run(dp, packets.ipv4_tcp(OUTSIDE, NODE, 40003, NODE_PORT, "FA", seq=1001, ack=1)))
    checked(run(dp, packets.ipv4_tcp(BACKEND, NODE, 5353, reused.sport, "FA", seq=1, ack=1002)))
    again = syn(40003)
    assert again.sport == reused.sport


def test_a_closed_flows_port_is_free_at_once_after_the_clients_last_ack(
    dp: BpfDatapath,
) -> None:
    """The last ACK (or a RST) seen here means the backend's socket is gone: the
    port goes to a new flow after a millisecond, not after the quiet second, so
    a range of P ports takes far more than P new connections a second."""
    dp.reconcile({fe.key: fe for fe in [frontend([BACKEND], proto=Protocol.TCP)]})

    def send(src: str, sport: int, dport: int, flags: str, seq: int = 0, ack: int = 0) -> int:
        return run(dp, packets.ipv4_tcp(src, NODE, sport, dport, flags, seq=seq, ack=ack)).retval

    def syn(sport: int) -> packets.Parsed:
        return checked(run(dp, packets.ipv4_tcp(OUTSIDE, NODE, sport, NODE_PORT, "S")))

    acked, unacked = syn(40000), syn(40001)
    assert {acked.sport, unacked.sport} == {61000, 61001}
    for flow, client_port in ((acked, 40000), (unacked, 40001)):
        send(OUTSIDE, client_port, NODE_PORT, "FA", seq=1001, ack=1)
        send(BACKEND, 5353, flow.sport, "FA", seq=1, ack=1002)
    # only the first flow's client acknowledges the backend's FIN
    send(OUTSIDE, 40000, NODE_PORT, "A", seq=1002, ack=2)
    time.sleep(0.01)
    reused = syn(40002)
    assert reused.sport == acked.sport
    reply = checked(run(dp, packets.ipv4_tcp(BACKEND, NODE, 5353, reused.sport, "SA", ack=1)))
    assert (reply.dst, reply.dport) == (OUTSIDE, 40002)
    # the other port waits the quiet second: its last ACK may still be on its way
    before = stats(dp)
    assert run(dp, packets.ipv4_tcp(OUTSIDE, NODE, 40003, NODE_PORT, "S")).retval == TC_ACT_SHOT
    assert stat_delta(before, stats(dp)) == {STAT_NAT_EXHAUSTED: 1}
    # a RST ends the backend's socket as surely
    send(OUTSIDE, 40002, NODE_PORT, "R", seq=1)
    time.sleep(0.01)
    assert syn(40004).sport == reused.sport


def test_the_sweep_spares_a_nat_port_taken_over_after_it_looked(dp: BpfDatapath) -> None:
    """The sweep reads every entry first and deletes later; a port a new flow took
    over in between must stay, or that flow's replies lose their way back."""
    dp.configure(NodeConfig(snat_address=ip(NODE), nat_ports=(61000, 61000)))  # one port
    dp.reconcile({fe.key: fe for fe in [frontend([BACKEND], proto=Protocol.TCP)]})
    old = checked(run(dp, packets.ipv4_tcp(OUTSIDE, NODE, 40000, NODE_PORT, "S")))
    run(dp, packets.ipv4_tcp(OUTSIDE, NODE, 40000, NODE_PORT, "FA", seq=1001, ack=1))
    run(dp, packets.ipv4_tcp(BACKEND, NODE, 5353, old.sport, "FA", seq=1, ack=1002))
    run(dp, packets.ipv4_tcp(OUTSIDE, NODE, 40000, NODE_PORT, "A", seq=1002, ack=2))
    ((key, seen),) = list(dp.maps.nat4.items())  # as the sweep's walk read it
    time.sleep(0.01)
    new = checked(run(dp, packets.ipv4_tcp(OUTSIDE, NODE, 40001, NODE_PORT, "S")))
    assert new.sport == old.sport == 61000
    assert not conntrack_gc._delete_unchanged(dp.maps.nat4, key, seen)
    reply = checked(run(dp, packets.ipv4_tcp(BACKEND, NODE, 5353, new.sport, "SA", ack=1)))
    assert (reply.dst, reply.dport) == (OUTSIDE, 40001)
    assert conntrack_gc._delete_unchanged(dp.maps.nat4, key, dp.maps.nat4.lookup(key))


def test_the_sweep_spares_a_masqueraded_flow_made_after_its_conntrack_walk(
    dp: BpfDatapath, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep walks ct4, then nat4: a NAT entry made in between has no forward
    entry in what the walk read.  Deleting it as an orphan lost the flow's replies
    (test_external's thousand connections timed out, one run in two)."""
    dp.reconcile({fe.key: fe for fe in [frontend([BACKEND], proto=Protocol.TCP)]})
    walk = dp.maps.ct4.items
    made: list[packets.Parsed] = []

    def walk_then_connect() -> list[tuple[object, object]]:
        read = list(walk())
        made.append(checked(run(dp, packets.ipv4_tcp(OUTSIDE, NODE, 40000, NODE_PORT, "S"))))
        return read

    monkeypatch.setattr(dp.maps.ct4, "items", walk_then_connect)
    swept = conntrack_gc.sweep(dp.maps, dp.settings)
    monkeypatch.undo()
    assert (swept.conntrack, swept.nat) == (0, 0)
    reply = checked(run(dp, packets.ipv4_tcp(BACKEND, NODE, 5353, made[0].sport, "SA", ack=1)))
    assert (reply.dst, reply.dport) == (OUTSIDE, 40000)
    # a NAT entry older than the walk whose flow is gone is still an orphan
    ((forward, _),) = list(dp.maps.ct4.items())
    assert dp.maps.ct4.delete(forward)
    assert conntrack_gc.sweep(dp.maps, dp.settings).nat == 0  # made a moment ago
    assert conntrack_gc.sweep(dp.maps, dp.settings, conntrack_gc.now_ns() + 3 * 10**9).nat == 1


def test_the_sweep_spares_a_reverse_entry_whose_forward_entry_its_walk_missed(
    dp: BpfDatapath, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hash map's walk misses an entry put in a bucket it has passed: it may
    read a new flow's reverse entry without its forward one."""
    fes = [frontend([LOCAL], local=True), frontend([LOCAL], SCOPE_EXTERNAL, True)]
    dp.reconcile({fe.key: fe for fe in fes})
    walk = dp.maps.ct4.items
    reverse = layout.const("CT_DIR_REVERSE")

    def walk_missing_a_forward_entry() -> list[tuple[object, object]]:
        read = list(walk())
        ask(dp, OUTSIDE, 40000)  # unmasqueraded (Local policy): a reverse entry in ct4
        return read + [(k, v) for k, v in walk() if k.dir == reverse]

    monkeypatch.setattr(dp.maps.ct4, "items", walk_missing_a_forward_entry)
    swept = conntrack_gc.sweep(dp.maps, dp.settings)
    monkeypatch.undo()
    assert swept.conntrack == 0 and len(dp.maps.ct4) == 2
    back = checked(run(dp, packets.ipv4_udp(LOCAL, OUTSIDE, 5353, 40000, b"a")))
    assert (back.src, back.sport) == (NODE, NODE_PORT)


def test_a_flow_stamped_by_another_cpu_a_moment_later_is_alive(dp: BpfDatapath) -> None:
    """A CPU that read the clock before another CPU stamped a flow sees that stamp
    in its future; unsigned subtraction made the flow look ages old, and its NAT
    port went to a new flow while the backend still held the old connection
    (found by the data-plane benchmark as SYNs answered with a bare ACK)."""
    dp.configure(NodeConfig(snat_address=ip(NODE), nat_ports=(61000, 61000)))  # one port
    dp.reconcile({fe.key: fe for fe in [frontend([BACKEND], proto=Protocol.TCP)]})
    live = checked(run(dp, packets.ipv4_tcp(OUTSIDE, NODE, 40000, NODE_PORT, "S")))
    checked(run(dp, packets.ipv4_tcp(BACKEND, NODE, 5353, live.sport, "SA", ack=1)))
    forward = layout.const("CT_DIR_FORWARD")
    ((key, entry),) = [
        (k, v)
        for k, v in dp.maps.ct4.items()
        if k.dir == forward and layout.port_num(k.sport) == 40000
    ]
    entry.last_seen_ns = (
        conntrack_gc.now_ns() + 10**9
    )  # stamped "after" the next packet's clock read
    dp.maps.ct4.update(key, entry)
    before = stats(dp)
    assert run(dp, packets.ipv4_tcp(OUTSIDE, NODE, 40001, NODE_PORT, "S")).retval == TC_ACT_SHOT
    assert stat_delta(before, stats(dp)) == {STAT_NAT_EXHAUSTED: 1}
    # and the live flow's own packets still follow it
    same = checked(run(dp, packets.ipv4_tcp(OUTSIDE, NODE, 40000, NODE_PORT, "A", seq=1, ack=1)))
    assert (same.dst, same.sport) == (BACKEND, live.sport)


def test_the_sweep_keeps_live_flows(dp: BpfDatapath) -> None:
    dp.reconcile({fe.key: fe for fe in [frontend([BACKEND])]})
    ask(dp, OUTSIDE, 40000)
    assert conntrack_gc.sweep(dp.maps, dp.settings) == conntrack_gc.Swept(0, 0)
    assert len(dp.maps.ct4) == 1 and len(dp.maps.nat4) == 1
    flows = conntrack_gc.flows(dp.maps)
    assert flows[0]["client"] == f"{OUTSIDE}:40000" and flows[0]["masquerade"]


def test_local_policy_outside_gets_local_backends_unmasqueraded(dp: BpfDatapath) -> None:
    fes = [frontend([BACKEND, LOCAL], local=True), frontend([LOCAL], SCOPE_EXTERNAL, True)]
    dp.reconcile({fe.key: fe for fe in fes})
    for i in range(10):
        out = ask(dp, OUTSIDE, 41000 + i)
        assert (out.src, out.dst) == (OUTSIDE, LOCAL)
    # a pod keeps every backend, unmasqueraded
    seen = {ask(dp, POD_CLIENT, 42000 + i).dst for i in range(40)}
    assert seen == {BACKEND, LOCAL}


def test_local_policy_without_local_backends_drops(dp: BpfDatapath) -> None:
    fes = [
        frontend([BACKEND], local=True),
        frontend([], SCOPE_EXTERNAL, True, drop_empty=True),
    ]
    dp.reconcile({fe.key: fe for fe in fes})
    before = stats(dp)
    result = run(dp, packets.ipv4_udp(OUTSIDE, NODE, 40000, NODE_PORT, b"q"))
    assert result.retval == TC_ACT_SHOT
    assert stat_delta(before, stats(dp)) == {STAT_DROP_NO_LOCAL: 1}


def test_source_ranges(dp: BpfDatapath) -> None:
    allowed = (ipaddress.ip_network("198.51.100.0/29"),)
    fe = frontend([BACKEND], ranges=allowed, kind="LoadBalancer")
    dp.reconcile({fe.key: fe})
    assert ask(dp, OUTSIDE, 40000).dst == BACKEND  # .7 is inside /29
    before = stats(dp)
    result = run(dp, packets.ipv4_udp("198.51.100.8", NODE, 40001, NODE_PORT, b"q"))
    assert result.retval == TC_ACT_SHOT
    assert stat_delta(before, stats(dp)) == {STAT_DROP_SOURCE_RANGE: 1}
    # dropping the ranges removes both the flag and the entries
    open_fe = frontend([BACKEND], kind="LoadBalancer")
    dp.reconcile({open_fe.key: open_fe})
    assert len(dp.maps.lb4_source_ranges) == 0
    assert ask(dp, "198.51.100.8", 40002).dst == BACKEND
