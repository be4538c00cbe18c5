"""The event stream under BPF_PROG_TEST_RUN: each event site, the switch, the stale stamp.

Frames go through the session's tc program; what `lbctl monitor` would print is
read from the pinned lb_events ring buffer by lbctl/cli/monitor.py's own Monitor, so
the decoding and naming are those of the command.
"""

from __future__ import annotations

import io
import ipaddress
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lbctl.cli import monitor
from lbctl.datapath import NodeConfig
from lbctl.datapath.ebpf import events, layout, libbpf
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.model import Protocol, ServiceRef
from lbctl.plan.planner import SCOPE_EXTERNAL, Backend, Frontend, FrontendKey
from tests import packets
from tests.test_bpf_prog import TC_ACT_SHOT, run

NODE = "192.0.2.1"
VIP = "10.96.0.10"
OUTSIDE = "198.51.100.7"
POD = "10.244.3.9"
BACKEND = "10.244.0.20"
ROUTER = "10.244.0.1"
NODE_PORT = 30053
ALL = list(events.TYPES)
XDP_DROP = 1


def ip(a: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(a)


def fe(
    addr: str,
    port: int,
    backends: list[str],
    proto: Protocol = Protocol.UDP,
    name: str = "dns",
    **kw: Any,
) -> Frontend:
    return Frontend(
        FrontendKey(ip(addr), port, proto, kw.pop("scope", 0)),
        ServiceRef("ns", name),
        "",
        kw.pop("kind", "NodePort"),
        tuple(Backend(ip(b), 5353, proto) for b in backends),
        **kw,
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


@pytest.fixture
def mon(dp: BpfDatapath) -> Iterator[monitor.Monitor]:
    m = monitor.Monitor(
        dp.settings.pin_dir, ALL, monitor.Filter(None, [], None), "json", 0, io.StringIO()
    )
    try:
        yield m
    finally:
        m.close()


def printed(m: monitor.Monitor) -> list[dict[str, Any]]:
    """What the monitor printed since the last call (the ring read at once)."""
    assert m.ring is not None
    m.ring.poll(0)
    out = m.out
    assert isinstance(out, io.StringIO)
    lines = out.getvalue().splitlines()
    out.seek(0)
    out.truncate()
    return [json.loads(line) for line in lines]


def udp(src: str, dst: str, sport: int, dport: int = NODE_PORT) -> bytes:
    return packets.ipv4_udp(src, dst, sport, dport, b"q")


def test_each_drop_and_reject_is_streamed_with_its_reason_and_service(
    dp: BpfDatapath, mon: monitor.Monitor
) -> None:
    ranges = (ipaddress.ip_network("198.51.100.0/29"),)
    dp.reconcile(
        {
            f.key: f
            for f in [
                fe(NODE, NODE_PORT, [BACKEND], kind="LoadBalancer", source_ranges=ranges),
                fe(VIP, 80, [], Protocol.TCP, "empty", kind="ClusterIP"),
                fe(NODE, 30080, [BACKEND], local=True),
                fe(NODE, 30080, [], scope=SCOPE_EXTERNAL, local=True, drop_empty=True),
            ]
        }
    )
    assert run(dp, udp("198.51.100.8", NODE, 40001)).retval == TC_ACT_SHOT
    run(dp, packets.ipv4_tcp(POD, VIP, 40002, 80, "S"))  # a reset comes back
    assert run(dp, udp(OUTSIDE, NODE, 40003, 30080)).retval == TC_ACT_SHOT
    got = printed(mon)
    assert [(e["type"], e["reason"], e["client"], e["service"]) for e in got] == [
        ("drop", "drop_source_range", "198.51.100.8:40001", "ns/dns:30053/udp"),
        ("reject", "rejected_no_backend", f"{POD}:40002", "ns/empty:80/tcp"),
        ("drop", "drop_no_local_endpoint", f"{OUTSIDE}:40003", "ns/dns:30080/udp"),
    ]
    assert got[1]["destination"] == f"{VIP}:80" and got[1]["proto"] == "tcp"
    assert all(e["hook"] == "tc-ingress" for e in got)
    assert mon.counts == {"drop": 2, "reject": 1}


def test_new_flows_nat_ports_and_their_exhaustion(dp: BpfDatapath, mon: monitor.Monitor) -> None:
    # a ClusterIP: clients outside the cluster CIDRs are masqueraded, pods not
    dp.reconcile({f.key: f for f in [fe(NODE, NODE_PORT, [BACKEND], kind="ClusterIP")]})
    run(dp, udp(POD, NODE, 41000))  # a pod: not masqueraded
    run(dp, udp(OUTSIDE, NODE, 41001))
    run(dp, udp(OUTSIDE, NODE, 41001))  # the same flow: no event
    run(dp, udp(OUTSIDE, NODE, 41002))
    assert run(dp, udp(OUTSIDE, NODE, 41003)).retval == TC_ACT_SHOT  # 2 NAT ports only
    events_ = printed(mon)
    printed_nat = [e for e in events_ if e["type"] == "nat"]
    got = [(e["type"], e["client"], e["backend"], e.get("nat")) for e in events_]
    ports = [nat for kind, _, _, nat in got if kind == "nat"]
    assert sorted(ports) == [f"{NODE}:61000", f"{NODE}:61001"]
    assert [(k, c, b) for k, c, b, _ in got] == [
        ("new-flow", f"{POD}:41000", f"{BACKEND}:5353"),
        ("new-flow", f"{OUTSIDE}:41001", f"{BACKEND}:5353"),
        ("nat", f"{OUTSIDE}:41001", f"{BACKEND}:5353"),
        ("new-flow", f"{OUTSIDE}:41002", f"{BACKEND}:5353"),
        ("nat", f"{OUTSIDE}:41002", f"{BACKEND}:5353"),
        ("nat-exhausted", f"{OUTSIDE}:41003", f"{BACKEND}:5353"),
    ]
    assert mon.reasons == {"nat_exhausted": 1}
    assert {e["reason"] for e in printed_nat} == {"snat_new"}


def test_a_translated_icmp_error_is_streamed(dp: BpfDatapath, mon: monitor.Monitor) -> None:
    web = fe(VIP, 80, [BACKEND], Protocol.TCP, "web", kind="ClusterIP")
    dp.reconcile({web.key: web})
    run(dp, packets.ipv4_tcp(POD, VIP, 40000, 80, "S"))
    sent = packets.ipv4_tcp(POD, BACKEND, 40000, 5353, "A", b"x" * 100)
    run(dp, packets.ipv4_icmp_error(ROUTER, POD, sent))
    got = printed(mon)
    assert [e["type"] for e in got] == ["new-flow", "icmp"]
    assert got[1]["service"] == "ns/web:80/tcp" and got[1]["backend"] == f"{BACKEND}:5353"
    # the error as it came (from the router to the pod), and where it was sent
    assert (got[1]["client"], got[1]["destination"], got[1]["nat"]) == (ROUTER, POD, POD)
    assert got[0]["reason"] == "new_flows" and got[1]["reason"] == "icmp_errors_translated"


def test_nothing_is_emitted_without_a_listener_or_with_a_stale_stamp(
    dp: BpfDatapath, mon: monitor.Monitor
) -> None:
    dp.reconcile({f.key: f for f in [fe(VIP, 80, [], Protocol.TCP, "empty", kind="ClusterIP")]})
    assert mon.switch is not None
    key = layout.ffi.new("__u32 *", 0)
    # a monitor killed 4 s ago: its mask is still set, its stamp stale
    stale = time.monotonic_ns() - 4 * 10**9
    mon.switch.map.update(key, layout.new("struct lb_monitor", alive_ns=stale, mask=~0 & 0xFFFF))
    run(dp, packets.ipv4_tcp(POD, VIP, 40010, 80, "S"))
    assert printed(mon) == []
    mon.switch.refresh()
    run(dp, packets.ipv4_tcp(POD, VIP, 40011, 80, "S"))
    assert [e["client"] for e in printed(mon)] == [f"{POD}:40011"]
    mon.switch.clear()
    mon.switch = None
    run(dp, packets.ipv4_tcp(POD, VIP, 40012, 80, "S"))
    assert printed(mon) == []


def test_only_the_types_asked_for_are_emitted(dp: BpfDatapath) -> None:
    dp.reconcile({f.key: f for f in [fe(NODE, NODE_PORT, [BACKEND], kind="ClusterIP")]})
    m = monitor.Monitor(
        dp.settings.pin_dir, ["nat"], monitor.Filter(None, [], None), "table", 0, io.StringIO()
    )
    try:
        run(dp, udp(POD, NODE, 42000))
        run(dp, udp(OUTSIDE, NODE, 42001))
        assert m.ring is not None
        m.ring.poll(0)
        assert m.counts == {"nat": 1}
        assert isinstance(m.out, io.StringIO)
        text = m.out.getvalue()
        assert " nat " in text and f"{OUTSIDE}:42001 -> {NODE}:{NODE_PORT}" in text
        assert f"service=ns/dns:{NODE_PORT}/udp backend={BACKEND}:5353 nat={NODE}:6100" in text
    finally:
        m.close()


def test_one_reader_at_a_time(dp: BpfDatapath, mon: monitor.Monitor) -> None:
    assert mon.switch is not None
    key = layout.ffi.new("__u32 *", 0)
    mask = events.mask_of(ALL)
    # another live process (pid 1) holds the stream, its stamp fresh
    held = layout.new("struct lb_monitor", alive_ns=time.monotonic_ns(), mask=mask, pid=1)
    mon.switch.map.update(key, held)
    with pytest.raises(events.MonitorBusy, match=r"another lbctl monitor \(pid 1\)"):
        events.Switch(dp.settings.pin_dir, mask)
    # the same holder, killed 4 s ago: its stamp is stale, the stream is free
    held.alive_ns = time.monotonic_ns() - 4 * 10**9
    mon.switch.map.update(key, held)
    events.Switch(dp.settings.pin_dir, mask).clear()
    assert mon.switch.map.lookup(key).mask == 0


def test_an_xdp_drop_is_streamed(dp: BpfDatapath, mon: monitor.Monitor) -> None:
    ranges = (ipaddress.ip_network("198.51.100.0/29"),)
    lb = fe(NODE, NODE_PORT, [BACKEND], kind="LoadBalancer", source_ranges=ranges)
    dp.reconcile({lb.key: lb})
    xdp = dp.prog_fds["lbctl_xdp"]
    # the drop comes before any FIB lookup: the test run's default device will do
    assert libbpf.prog_test_run(xdp, udp("198.51.100.8", NODE, 43000)).retval == XDP_DROP
    [ev] = printed(mon)
    assert (ev["type"], ev["reason"], ev["hook"]) == ("drop", "drop_source_range", "xdp")
    assert ev["service"] == f"ns/dns:{NODE_PORT}/udp" and ev["client"] == "198.51.100.8:43000"
