"""Per-packet cost of lbctl's BPF programs: `make bench-program`.

Issue 7 asks that the per-packet cost not grow with the number of services.
bench/dataplane.py measures end to end through namespaces, where this shared
machine's noise (10-20%) hides the program's own cost.  This benchmark times
the programs themselves with BPF_PROG_TEST_RUN: the kernel runs the loaded
program on a frame given to it and reports how long the run took.

For each N (100, 1,000, 10,000, 100,000 services by default) one datapath is compiled
and loaded (attached nowhere), all alive at once: N services in total, the
few under test and decoy ClusterIPs with 10 endpoints each (as
bench/dataplane.py programs them).  The paths, each a batch of frames built
by tests/packets.py:

- ClusterIP from a pod: an established flow (conntrack hit, DNAT), its reply
  (reverse NAT), the first packet of a new flow (SYN: scheduler, conntrack
  insert); established flows to 90 decoys spread over all N ("spread": the
  same work, tables of another size) and to every decoy up to one per frame
  of a batch ("many": more active flows);
- NodePort from outside, masqueraded: new (SNAT port taken), established,
  reply; and the same NodePort through the XDP program (new, established);
- the schedulers on new flows to a service of 10 backends: random, maglev,
  sh, rr, lc, ClientIP affinity (a hit: the client's backend is remembered),
  and lc with 100 and 1,000 backends (the cost of its slot scan);
- a packet to no service: the tc program's cheapest path;
- the egress program: a forwarded packet (received on an interface: every
  pod -> pod packet on its way out of the receiving pod's veth), a packet of
  the node's own that answers no flow, and a reply it translates: the
  ClusterIP flow's reply as if the node's stack had sent it (no ingress
  interface), the same lookups and rewrite as a hostNetwork endpoint's reply.

Baselines, measured in the same run and the same way: a packet to no service,
and empty tc and XDP programs (return TC_ACT_OK / XDP_PASS) compiled here.
A path's *program cost* is its time minus the empty program's: what lbctl's
code costs on top of the kernel running any program at all.

Method.  BPF_PROG_TEST_RUN's `repeat` runs the program again on the frame it
has just rewritten: after a NAT path's first run the frame is already
translated, and the following runs take another path.  The benchmark shows
it (see "repeat trap" in its output): an established flow's frame with
repeat=1000 counts 1 `established` and 999 `passed`.  So every path is timed
with repeat=1, one BPF_PROG_TEST_RUN per frame, over many frames; a new flow
gets a new source port per frame.  The kernel's duration then includes its
clock reads around the run (the empty program's time shows them) and caches
as the system call left them; for the paths that leave the frame as it was
(no service, the empty programs) the run is also timed with a large repeat,
a hot loop, to show the difference (no service: about 240 ns once, 155 ns in
the loop, on the machine of README's figures).

Each run is checked: its verdict, the translated frame's addresses, and the
program's own lb_stats counters, which must move by exactly what the path
implies (e.g. `established` and `redirected` once per frame, nothing else),
so the benchmark cannot silently time another path.  Flows a batch creates
are removed after it, so every batch starts from the same state.

The forwarding after NAT is part of the cost: the runs happen inside a
network namespace this script creates, with routes and neighbours for the
backends and clients, and the frames carry an ingress interface, so the
programs' FIB lookups succeed and they redirect as on a node.

Repetitions alternate: each one runs every path at every N in turn, the
order rotating.  A figure is the median over repetitions of each batch's
median; noise is the interquartile range of the repetitions.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import monitor_cost
from bench.machine import machine
from lbctl.datapath import NodeConfig
from lbctl.datapath.ebpf import layout, libbpf
from lbctl.datapath.ebpf.compiler import EGRESS_PROGRAM
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.datapath.ebpf.inspect import read_counters
from lbctl.datapath.ebpf.maps import MAP_TYPES
from lbctl.datapath.ebpf.settings import BpfSettings
from lbctl.datapath.ebpf.upgrade import record
from lbctl.model import Protocol, ServiceRef
from lbctl.plan.planner import Backend, Frontend, FrontendKey
from tests import netlab, packets
from tests.netlab import Lab, Netns

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

TC_ACT_OK, TC_ACT_REDIRECT = 0, 7
XDP_PASS, XDP_REDIRECT = 2, 4

NODE = "192.0.2.1"  # the node's address on in0: NodePorts, masquerade
OUTSIDE = "198.51.100.7"  # a client outside the cluster, behind in0
CLIENT = "10.244.3.9"  # a pod, behind out0
NOWHERE = "10.95.255.254"  # no service there
CLUSTER_CIDR = "10.244.0.0/16"
NAT_PORTS = (32768, 65535)
VIP = "10.99.0.1"  # the ClusterIP under test
NODE_PORT, TARGET = 30080, 8080
NEIGH_MAC = "02:00:00:00:0b:01"
DECOY_ENDPOINTS = 10
DECOY_ENDPOINT_NET = "10.128.0.0/9"  # decoy i, endpoint j: 10.128.0.0 + 10 i + j
SERVICE_BACKENDS = ("10.244.0.20", "10.244.0.21")  # of the ClusterIP and the NodePort
# Backends of the scheduler services: the first n of a pool, all routed over out0.
POOL = [f"10.244.{10 + i // 250}.{i % 250 + 1}" for i in range(1000)]

# The services under test besides VIP and the NodePort: (name, VIP, scheduler,
# backends, ClientIP affinity timeout).
SCHED_SERVICES = [
    ("random-10", "10.99.1.1", "random", 10, 0),
    ("maglev-10", "10.99.1.2", "maglev", 10, 0),
    ("sh-10", "10.99.1.3", "sh", 10, 0),
    ("rr-10", "10.99.1.4", "rr", 10, 0),
    ("lc-10", "10.99.1.5", "lc", 10, 0),
    ("lc-100", "10.99.1.6", "lc", 100, 0),
    ("lc-1000", "10.99.1.7", "lc", 1000, 0),
    ("affinity-hit-10", "10.99.1.8", "random", 10, 10800),
]
TESTED = 2 + len(SCHED_SERVICES)  # services under test, counted in N
SPREAD = 90  # established flows of the spread path: one each to SPREAD decoys

# Paths: name -> what it is (README and report order).
PATHS = {
    "empty-tc": "empty tc program (TC_ACT_OK)",
    "no-service": "tc: packet to no service",
    "clusterip-established": "tc: ClusterIP, established (conntrack hit, DNAT)",
    "clusterip-established-spread": "tc: ClusterIP, established, 90 flows to 90 services across N",
    "clusterip-established-many": "tc: ClusterIP, established, a flow to each service (<= runs)",
    "clusterip-reply": "tc: ClusterIP, reply (reverse NAT)",
    "clusterip-new": "tc: ClusterIP, new flow (SYN; random)",
    "nodeport-new": "tc: NodePort from outside, new (SYN; masquerade, NAT port)",
    "nodeport-established": "tc: NodePort, established (DNAT+SNAT)",
    "nodeport-reply": "tc: NodePort, reply (reverse SNAT+DNAT)",
    "empty-xdp": "empty XDP program (XDP_PASS)",
    "xdp-no-service": "XDP: packet to no service",
    "xdp-nodeport-new": "XDP: NodePort from outside, new (SYN; masquerade)",
    "xdp-nodeport-established": "XDP: NodePort, established",
    "egress-forwarded": "tc egress: a forwarded packet (pod to pod): leaves at once",
    "egress-own-traffic": "tc egress: the node's own packet, no reply of a flow",
    "egress-reply": "tc egress: a reply translated (a hostNetwork endpoint's reply's work)",
    **{f"sched-{name}": f"tc: new flow (SYN), {name.replace('-', ' ')} backends"
       for name, *_ in SCHED_SERVICES},
}  # fmt: skip
PATHS["sched-affinity-hit-10"] = "tc: new flow (SYN), ClientIP affinity hit, 10 backends"
EMPTY = {"tc": "empty-tc", "xdp": "empty-xdp"}
BASE = {"tc": "no-service", "xdp": "xdp-no-service"}


def ip(addr: str | int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(addr)


# -- the services -----------------------------------------------------------------------


def service(
    name: str,
    address: str,
    port: int,
    backends: list[str],
    kind: str = "ClusterIP",
    scheduler: str = "random",
    affinity: int = 0,
) -> Frontend:
    return Frontend(
        FrontendKey(ip(address), port, Protocol.TCP),
        ServiceRef("bench", name),
        "http",
        kind,
        tuple(Backend(ip(b), TARGET, Protocol.TCP) for b in backends),
        scheduler=scheduler,
        affinity_timeout=affinity,
    )


def decoy(i: int) -> Frontend:
    """Decoy i: a ClusterIP with 10 endpoints of its own, as bench/dataplane.py's."""
    endpoints = [str(ip(0x0A800000 + i * DECOY_ENDPOINTS + j)) for j in range(DECOY_ENDPOINTS)]
    return service(f"decoy{i}", str(ip(0x0A600001 + i)), 80, endpoints)


def services(size: int) -> dict[FrontendKey, Frontend]:
    """N services: the ones under test and N - TESTED decoys."""
    fes = [
        service("tested", VIP, 80, list(SERVICE_BACKENDS)),
        service("nodeport", NODE, NODE_PORT, list(SERVICE_BACKENDS), kind="NodePort"),
        *(
            service(name, addr, 80, POOL[:n], scheduler=sched, affinity=aff)
            for name, addr, sched, n, aff in SCHED_SERVICES
        ),
        *(decoy(i) for i in range(size - TESTED)),
    ]
    return {fe.key: fe for fe in fes}


def settings(size: int, pin_dir: Path) -> BpfSettings:
    slots = size * DECOY_ENDPOINTS + 2 * len(POOL) + 1024
    return BpfSettings(
        pin_dir=pin_dir,
        max_services=max(1024, 2 * size),
        max_backends=max(4096, slots),
        max_slots=max(4096, slots),
        ct_size=65536,
        nat_size=65536,
    )


# -- the network namespace the programs' FIB lookups see ------------------------------


@dataclass
class Fib:
    ns: Netns
    in0: int  # towards the outside
    out0: int  # towards the pods


def build_fib(lab: Lab) -> Fib:
    ns = lab.netns("progbench")
    ns.sysctl("net.ipv4.ip_forward", 1)
    netlab.veth(ns, "in0", ns, "in1")
    netlab.veth(ns, "out0", ns, "out1")
    ns.ip("addr", "add", f"{NODE}/24", "dev", "in0")
    ns.ip("route", "add", "198.51.100.0/24", "dev", "in0")
    ns.ip("route", "add", CLUSTER_CIDR, "dev", "out0")
    # Decoy endpoints through a gateway with a neighbour, so their FIB lookups
    # end like the tested backends' (100,000 x 10 neighbour entries would not do).
    ns.ip("route", "add", DECOY_ENDPOINT_NET, "via", SERVICE_BACKENDS[0], "dev", "out0")
    neigh = [f"neigh add {OUTSIDE} lladdr {NEIGH_MAC} dev in0 nud permanent"]
    neigh += [
        f"neigh add {a} lladdr {NEIGH_MAC} dev out0 nud permanent"
        for a in [CLIENT, *SERVICE_BACKENDS, *POOL]
    ]
    subprocess.run(
        ["ip", "-n", ns.name, "-batch", "-"], input="\n".join(neigh) + "\n", text=True, check=True
    )

    def index(name: str) -> int:
        return int(json.loads(ns.ip("-j", "link", "show", "dev", name).stdout)[0]["ifindex"])

    return Fib(ns, index("in0"), index("out0"))


def tc_ctx(ifindex: int) -> bytes:
    """struct __sk_buff with ingress_ifindex (its 10th field) set; the rest zero."""
    ctx = bytearray(48)
    struct.pack_into("=I", ctx, 36, ifindex)
    return bytes(ctx)


def xdp_ctx(frame: bytes, ifindex: int) -> bytes:
    # struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    return struct.pack("=6I", 0, len(frame), 0, ifindex, 0, 0)


# -- the empty programs -----------------------------------------------------------------

EMPTY_SOURCE = b"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
int empty_tc(struct __sk_buff *skb) { return TC_ACT_OK; }
int empty_xdp(struct xdp_md *ctx) { return XDP_PASS; }
"""


def empty_programs() -> tuple[Any, dict[str, int]]:
    """The empty tc and XDP programs: the bcc object (keep it alive) and their fds."""
    from bcc import BPF

    bpf = BPF(text=EMPTY_SOURCE)
    return bpf, {
        "tc": bpf.load_func(b"empty_tc", BPF.SCHED_CLS).fd,
        "xdp": bpf.load_func(b"empty_xdp", BPF.XDP).fd,
    }


# -- the paths --------------------------------------------------------------------------


@dataclass
class Case:
    """One path at one N: frames, how to run them, and what must happen."""

    path: str
    prog: str  # "tc" or "xdp": which kind of program (for the empty baseline)
    fd: int
    frames: list[bytes]  # one per run, cycled; a new flow needs as many as runs
    ifindex: int
    verdict: int
    stats: dict[str, int]  # counters that move per frame, by `lbctl maps dump` names
    src: set[str] | None = None  # the translated frame's source and destination
    dst: set[str] | None = None
    new_flows: bool = False  # creates flows: they are removed after each batch
    ctxs: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.prog == "tc":
            self.ctxs = [tc_ctx(self.ifindex)]
        else:
            self.ctxs = [xdp_ctx(f, self.ifindex) for f in self.frames]


@dataclass
class Target:
    """One N: its datapath and its cases."""

    size: int
    dp: BpfDatapath
    cases: dict[str, Case]
    keep: dict[str, set[bytes]]  # flows set up before the batches: kept

    @property
    def maps(self) -> Any:
        return self.dp.maps


def tcp(src: str, dst: str, sport: int, dport: int, flags: str) -> bytes:
    return packets.ipv4_tcp(
        src, dst, sport, dport, flags, b"", seq=1000, ack=1 if "A" in flags else 0
    )


def syns(src: str, dst: str, dport: int, count: int) -> list[bytes]:
    """`count` first packets of distinct flows: a new source port each."""
    return [tcp(src, dst, 1024 + i % 60000, dport, "S") for i in range(count)]


def run_once(case: Case, i: int = 0) -> libbpf.TestRun:
    frame = case.frames[i % len(case.frames)]
    return libbpf.prog_test_run(case.fd, frame, ctx=case.ctxs[i % len(case.ctxs)])


def open_flow(dp: BpfDatapath, fib: Fib, src: str, dst: str, dport: int) -> tuple[str, int]:
    """Open a TCP flow through tc and answer it (so it counts as established);
    returns the backend and the source port the flow leaves with."""
    sport = 40000
    ifindex = fib.in0 if src == OUTSIDE else fib.out0
    out = libbpf.prog_test_run(dp.prog_fd, tcp(src, dst, sport, dport, "S"), ctx=tc_ctx(ifindex))
    got = packets.parse(out.data)
    if out.retval != TC_ACT_REDIRECT or got.dst is None or got.sport is None:
        raise RuntimeError(f"setting up a flow to {dst}:{dport} failed: verdict {out.retval}")
    reply = tcp(got.dst, got.src or "", TARGET, got.sport, "SA")
    back = libbpf.prog_test_run(dp.prog_fd, reply, ctx=tc_ctx(fib.out0))
    if back.retval != TC_ACT_REDIRECT or packets.parse(back.data).dst != src:
        raise RuntimeError(f"the reply of a flow to {dst}:{dport} was not translated")
    return got.dst, got.sport


def flow_keys(bpf_map: Any) -> set[bytes]:
    return {bytes(layout.ffi.buffer(k)) for k in list(bpf_map.keys())}


def forget_new_flows(target: Target) -> None:
    """Remove the flows a batch created; keep those set up before."""
    for name in ("ct4", "nat4"):
        bpf_map = getattr(target.maps, name)
        keep = target.keep[name]
        for key in list(bpf_map.keys()):
            if bytes(layout.ffi.buffer(key)) not in keep:
                bpf_map.delete(key)


def prepare(size: int, dp: BpfDatapath, fib: Fib, empty: dict[str, int], runs: int) -> Target:
    """Program N services into dp, open the flows the established paths follow,
    and build every path's case."""
    dp.configure(
        NodeConfig(
            snat_address=ip(NODE),
            nat_ports=NAT_PORTS,
            # the decoys' endpoints are pods too: a pod's flow to them keeps its address
            cluster_cidrs=tuple(
                ipaddress.IPv4Network(c) for c in (CLUSTER_CIDR, DECOY_ENDPOINT_NET)
            ),
        )
    )
    errors = dp.reconcile(services(size))
    if errors:
        raise RuntimeError(f"programming {size} services failed: {errors[:3]}")
    if len(dp.table.frontends) != size:
        raise RuntimeError(f"{len(dp.table.frontends)} services programmed, not {size}")
    xdp = dp.prog_fds.get("lbctl_xdp")
    if xdp is None:
        raise RuntimeError(f"lbctl_xdp did not load: {dp.failed_programs}")
    tc = dp.prog_fd
    egress = dp.prog_fds[EGRESS_PROGRAM]
    with fib.ns.entered():
        backend, _ = open_flow(dp, fib, CLIENT, VIP, 80)
        np_backend, nat_port = open_flow(dp, fib, OUTSIDE, NODE, NODE_PORT)
        # the first flow of the affinity service makes the client's entry
        aff_vip = next(addr for name, addr, *_ in SCHED_SERVICES if name == "affinity-hit-10")
        open_flow(dp, fib, CLIENT, aff_vip, 80)
        # flows to decoys: SPREAD of them evenly across all, and one to each (up to runs)
        decoys = size - TESTED
        step = max(1, decoys // SPREAD)
        spread = [str(decoy(i * step).key.address) for i in range(min(SPREAD, decoys))]
        many = [str(decoy(i).key.address) for i in range(min(decoys, runs))]
        for addr in dict.fromkeys([*spread, *many]):
            open_flow(dp, fib, CLIENT, addr, 80)
    backends = set(SERVICE_BACKENDS)
    est = tcp(CLIENT, VIP, 40000, 80, "A")
    np_est = tcp(OUTSIDE, NODE, 40000, NODE_PORT, "A")
    nowhere = tcp(CLIENT, NOWHERE, 40000, 80, "A")
    cases = [
        Case("empty-tc", "tc", empty["tc"], [nowhere], fib.out0, TC_ACT_OK, {}),
        Case("no-service", "tc", tc, [nowhere], fib.out0, TC_ACT_OK, {"passed": 1}),
        Case(
            "clusterip-established", "tc", tc, [est], fib.out0, TC_ACT_REDIRECT,
            {"established": 1, "redirected": 1}, {CLIENT}, {backend},
        ),
        Case(
            "clusterip-established-spread", "tc", tc,
            [tcp(CLIENT, addr, 40000, 80, "A") for addr in spread], fib.out0,
            TC_ACT_REDIRECT, {"established": 1, "redirected": 1}, {CLIENT},
        ),
        Case(
            "clusterip-established-many", "tc", tc,
            [tcp(CLIENT, addr, 40000, 80, "A") for addr in many], fib.out0,
            TC_ACT_REDIRECT, {"established": 1, "redirected": 1}, {CLIENT},
        ),
        Case(
            "clusterip-reply", "tc", tc, [tcp(backend, CLIENT, TARGET, 40000, "A")], fib.out0,
            TC_ACT_REDIRECT, {"reverse_nat": 1, "redirected": 1}, {VIP}, {CLIENT},
        ),
        Case(
            "clusterip-new", "tc", tc, syns(CLIENT, VIP, 80, runs), fib.out0, TC_ACT_REDIRECT,
            {"new_flows": 1, "redirected": 1}, {CLIENT}, backends, new_flows=True,
        ),
        Case(
            "nodeport-new", "tc", tc, syns(OUTSIDE, NODE, NODE_PORT, runs), fib.in0,
            TC_ACT_REDIRECT, {"new_flows": 1, "snat_new": 1, "redirected": 1}, {NODE}, backends,
            new_flows=True,
        ),
        Case(
            "nodeport-established", "tc", tc, [np_est], fib.in0, TC_ACT_REDIRECT,
            {"established": 1, "redirected": 1}, {NODE}, {np_backend},
        ),
        Case(
            "nodeport-reply", "tc", tc, [tcp(np_backend, NODE, TARGET, nat_port, "A")], fib.out0,
            TC_ACT_REDIRECT, {"snat_reverse": 1, "redirected": 1}, {NODE}, {OUTSIDE},
        ),
        Case("empty-xdp", "xdp", empty["xdp"], [nowhere], fib.in0, XDP_PASS, {}),
        Case("xdp-no-service", "xdp", xdp, [nowhere], fib.in0, XDP_PASS, {"xdp_passed": 1}),
        Case(
            "xdp-nodeport-new", "xdp", xdp, syns(OUTSIDE, NODE, NODE_PORT, runs), fib.in0,
            XDP_REDIRECT, {"new_flows": 1, "snat_new": 1, "xdp_redirected": 1}, {NODE}, backends,
            new_flows=True,
        ),
        Case(
            "xdp-nodeport-established", "xdp", xdp, [np_est], fib.in0, XDP_REDIRECT,
            {"established": 1, "xdp_redirected": 1}, {NODE}, {np_backend},
        ),
        Case(
            "egress-forwarded", "tc", egress, [tcp(backend, CLIENT, TARGET, 40000, "A")],
            fib.out0, TC_ACT_OK, {},
        ),
        Case(
            "egress-own-traffic", "tc", egress, [tcp(NODE, CLIENT, 50000, TARGET, "A")], 0,
            TC_ACT_OK, {},
        ),
        Case(
            "egress-reply", "tc", egress, [tcp(backend, CLIENT, TARGET, 40000, "A")], 0,
            TC_ACT_OK, {"reverse_nat": 1, "egress_reverse_nat": 1}, {VIP}, {CLIENT},
        ),
    ]  # fmt: skip
    for label, addr, _, n, aff in SCHED_SERVICES:
        want = {"new_flows": 1, "redirected": 1} | ({"affinity_followed": 1} if aff else {})
        cases.append(
            Case(
                f"sched-{label}", "tc", tc, syns(CLIENT, addr, 80, runs), fib.out0,
                TC_ACT_REDIRECT, want, {CLIENT}, set(POOL[:n]), new_flows=True,
            )
        )  # fmt: skip
    keep = {name: flow_keys(getattr(dp.maps, name)) for name in ("ct4", "nat4")}
    return Target(size, dp, {c.path: c for c in cases}, keep)


# -- measuring --------------------------------------------------------------------------


class WrongPath(RuntimeError):
    """A batch did not take the path it was meant to time."""


def batch(target: Target, case: Case, runs: int, fib: Fib) -> dict[str, Any]:
    """`runs` frames through the case's program, one BPF_PROG_TEST_RUN each."""
    if case.new_flows and runs > len(case.frames):
        raise ValueError(f"{case.path}: {runs} runs but {len(case.frames)} distinct frames")
    before = read_counters(target.maps)
    durations = []
    verdicts: Counter[int] = Counter()
    with fib.ns.entered():
        first = run_once(case)
        durations.append(first.duration_ns)
        verdicts[first.retval] += 1
        for i in range(1, runs):
            result = run_once(case, i)
            durations.append(result.duration_ns)
            verdicts[result.retval] += 1
    after = read_counters(target.maps)
    moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    where = f"{case.path} at {target.size} services"
    if verdicts != {case.verdict: runs}:
        raise WrongPath(f"{where}: verdicts {dict(verdicts)}, expected {case.verdict} every run")
    want = {k: v * runs for k, v in case.stats.items()}
    if moved != want:
        raise WrongPath(f"{where}: counters moved {moved}, expected {want}")
    if case.src is not None or case.dst is not None:
        out = packets.parse(first.data)
        if (case.src is not None and out.src not in case.src) or (
            case.dst is not None and out.dst not in case.dst
        ):
            raise WrongPath(f"{where}: translated to {out.src} -> {out.dst}")
        if not (out.ip_csum_ok and out.l4_csum_ok):
            raise WrongPath(f"{where}: the translated frame's checksums are wrong")
    if case.new_flows:
        forget_new_flows(target)
    return {
        "median_ns": statistics.median(durations),
        "resolution_ns": resolution(durations),
        "p10_ns": statistics.quantiles(durations, n=10)[0] if runs > 1 else durations[0],
        "p90_ns": statistics.quantiles(durations, n=10)[-1] if runs > 1 else durations[0],
        "verdicts": {str(k): v for k, v in verdicts.items()},
        "counters": moved,
    }


def repeated(case: Case, repeat: int, fib: Fib) -> float:
    """The kernel's average over `repeat` runs of one frame (one no run changes)."""
    with fib.ns.entered():
        result = libbpf.prog_test_run(case.fd, case.frames[0], repeat=repeat, ctx=case.ctxs[0])
    if result.retval != case.verdict:
        raise WrongPath(f"{case.path} repeated: verdict {result.retval}")
    return float(result.duration_ns)


def repeat_trap(target: Target, fib: Fib, repeat: int = 1000) -> dict[str, int]:
    """What repeat does to a NAT path: the counters an established flow's frame moves."""
    case = target.cases["clusterip-established"]
    before = read_counters(target.maps)
    with fib.ns.entered():
        libbpf.prog_test_run(case.fd, case.frames[0], repeat=repeat, ctx=case.ctxs[0])
    after = read_counters(target.maps)
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def resolution(durations: list[int]) -> int:
    """The smallest step between the durations the kernel reported: its clock's grain."""
    values = sorted(set(durations))
    steps = [b - a for a, b in itertools.pairwise(values)]
    return min(steps) if steps else 0


def rotate(items: list[Any], by: int) -> list[Any]:
    by %= len(items)
    return items[by:] + items[:by]


def spread(values: list[float]) -> float:
    """Interquartile range of the repetitions (ns)."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def measure(
    targets: list[Target],
    repetitions: int,
    runs: int,
    repeat: int,
    fib: Fib,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Every path at every N, `repetitions` times, alternating; the summary per N and path."""
    paths = list(PATHS)
    batches: dict[tuple[int, str], list[dict[str, Any]]] = {}
    hot: dict[tuple[int, str], list[float]] = {}
    for rep in range(repetitions):
        started = time.monotonic()
        for path in rotate(paths, rep):
            for target in rotate(targets, rep):
                case = target.cases[path]
                batches.setdefault((target.size, path), []).append(batch(target, case, runs, fib))
                if repeat > 1 and path in ("empty-tc", "no-service", "empty-xdp", "xdp-no-service"):
                    hot.setdefault((target.size, path), []).append(repeated(case, repeat, fib))
        log(f"repetition {rep + 1}/{repetitions}: {time.monotonic() - started:.1f} s")
    out: dict[str, Any] = {}
    for target in targets:
        per: dict[str, Any] = {}
        for path in paths:
            got = batches[(target.size, path)]
            medians = [b["median_ns"] for b in got]
            per[path] = {
                "ns": statistics.median(medians),
                "iqr_ns": spread(medians),
                "batch_medians_ns": medians,
                "p10_ns": statistics.median(b["p10_ns"] for b in got),
                "p90_ns": statistics.median(b["p90_ns"] for b in got),
                "runs": runs * len(got),
                "resolution_ns": min(b["resolution_ns"] for b in got),
                "verdicts": dict(sum((Counter(b["verdicts"]) for b in got), Counter())),
                "counters": dict(sum((Counter(b["counters"]) for b in got), Counter())),
            }
            if (target.size, path) in hot:
                per[path]["repeat_ns"] = statistics.median(hot[(target.size, path)])
        for path, fig in per.items():
            prog = (
                "xdp"
                if path in ("empty-xdp", "xdp-no-service") or path.startswith("xdp-")
                else "tc"
            )
            empty, base = per[EMPTY[prog]], per[BASE[prog]]
            fig["program_ns"] = fig["ns"] - empty["ns"]
            base_ns = base["ns"] - empty["ns"]
            fig["x_no_service"] = fig["program_ns"] / base_ns if base_ns > 0 else None
        out[str(target.size)] = per
    return out


# -- reporting --------------------------------------------------------------------------


def flatness(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per path and larger N: the program cost against the smallest N's, and the noise."""
    sizes = sorted(results["sizes"], key=int)
    small = results["sizes"][sizes[0]]
    out: dict[str, dict[str, Any]] = {}
    for path in PATHS:
        if path.startswith("empty-"):
            continue
        a = small[path]
        for size in sizes[1:]:
            b = results["sizes"][size][path]
            delta = b["program_ns"] - a["program_ns"]
            # The clock's grain (one step of the reported durations) is the floor.
            grain = max(a["resolution_ns"], b["resolution_ns"], 1)
            noise = max(a["iqr_ns"], b["iqr_ns"], grain)
            # Repetitions that do not overlap at all differ whatever the spread.
            apart = (
                min(b["batch_medians_ns"]) > max(a["batch_medians_ns"])
                or max(b["batch_medians_ns"]) < min(a["batch_medians_ns"])
            ) and abs(delta) > grain
            moved = abs(delta) > noise or apart
            out.setdefault(path, {})[size] = {
                "against": sizes[0],
                "delta_ns": delta,
                "ratio": b["program_ns"] / a["program_ns"] if a["program_ns"] > 0 else None,
                "noise_ns": noise,
                "repetitions_apart": apart,
                "flat": not moved,
                "verdict": "within noise" if not moved else "higher" if delta > 0 else "lower",
            }
    return out


def report(results: dict[str, Any]) -> list[str]:
    sizes = sorted(results["sizes"], key=int)
    flat = results["flatness"]
    width = max(len(p) for p in PATHS)
    head = "".join(f" {f'N={int(s):,}':>22}" for s in sizes)
    lines = [
        "## program cost per packet: ns over the empty program (x the no-service path) [raw ns]",
        f"{'path':<{width}}{head}  vs N={int(sizes[0]):,} (* beyond noise)",
    ]
    for path in PATHS:
        cells = ""
        for size in sizes:
            fig = results["sizes"][size][path]
            x = fig["x_no_service"]
            xs = f"x{x:4.2f}" if x is not None and not path.startswith("empty-") else "     "
            cells += f" {fig['program_ns']:7.0f} ({xs}) [{fig['ns']:5.0f}]"
        verdict = ""
        for f in flat.get(path, {}).values():
            mark = "" if f["flat"] else "*"
            verdict += f" {f['delta_ns']:+5.0f} ns{mark:1}"
        lines.append(f"{path:<{width}}{cells}  {verdict}")
    lines.append(
        "(program cost: median of the repetitions' batch medians, minus the empty program's; "
        "noise: the larger interquartile range of the repetitions at the two N, at least one "
        "step of the kernel's clock; beyond noise: a larger difference, or no repetition "
        "overlaps)"
    )
    check = results["method_check"]
    lines.append("## method check")
    for size in sizes:
        per = results["sizes"][size]
        if "repeat_ns" in per["no-service"]:
            once = per["no-service"]["program_ns"]
            hot = per["no-service"]["repeat_ns"] - per["empty-tc"]["repeat_ns"]
            lines.append(
                f"N={int(size):,}: no-service program cost {once:.0f} ns timed once per run, "
                f"{hot:.0f} ns with repeat={results['repeat']:,} (empty tc program "
                f"{per['empty-tc']['ns']:.0f} vs {per['empty-tc']['repeat_ns']:.0f} ns raw)"
            )
    lines.append(
        f"repeat trap: an established flow's frame with repeat={check['repeat']} moved "
        f"{check['counters']} (the first run translates the frame; the rest see it translated)"
    )
    return lines


# -- running ----------------------------------------------------------------------------


def remove_pins(path: Path) -> None:
    for name in MAP_TYPES:
        (path / name).unlink(missing_ok=True)
    (path / record.NAME).unlink(missing_ok=True)  # the maps' layout record
    if path.exists():
        path.rmdir()


@contextmanager
def datapath(size: int, events: bool = True) -> Iterator[BpfDatapath]:
    """`events` False: the event sites compiled out (bench/monitor_cost.py's baseline)."""
    suffix = "" if events else "-noevents"
    pin_dir = Path(f"/sys/fs/bpf/lbctl-progbench-{os.getpid()}-{size}{suffix}")
    try:
        chosen = replace(settings(size, pin_dir), events=events)
        dp = BpfDatapath(chosen, wait=False)  # load() waits
    except BaseException:
        remove_pins(pin_dir)
        raise
    try:
        yield dp
    finally:
        dp.close()
        remove_pins(pin_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000,100000", help="services programmed")
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--runs", type=int, default=4000, help="frames per batch")
    parser.add_argument(
        "--repeat", type=int, default=200_000, help="repeat of the cross-check (0: none)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where JSON and text go")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if sizes[0] < TESTED + SPREAD:
        parser.error(f"--sizes: at least {TESTED + SPREAD} services (tested, {SPREAD} decoys)")
    if args.runs > 60000 or args.runs < 2:
        parser.error("--runs: 2 to 60000 (a new flow per frame needs a source port each)")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    info = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        lab = stack.enter_context(Lab())
        fib = build_fib(lab)
        started = time.monotonic()
        bpf, empty = empty_programs()
        stack.callback(bpf.cleanup)
        # Compiles run in child processes: start them all, then wait.
        dps = [stack.enter_context(datapath(size)) for size in sizes]
        quiet = stack.enter_context(datapath(sizes[0], events=False))
        for dp in [*dps, quiet]:
            dp.load()
        log(f"compiled {len(dps)} datapaths in {time.monotonic() - started:.1f} s")
        targets = []
        for size, dp in zip(sizes, dps, strict=True):
            started = time.monotonic()
            targets.append(prepare(size, dp, fib, empty, args.runs))
            log(f"{size} services programmed in {time.monotonic() - started:.1f} s")
        baseline = prepare(sizes[0], quiet, fib, empty, args.runs)
        for target in (targets[0], baseline):
            monitor_cost.add_cases(target, fib, args.runs, sys.modules[__name__])
        sized = measure(targets, args.repetitions, args.runs, args.repeat, fib, log)
        events_off = monitor_cost.compare(
            targets[0],
            baseline,
            lambda target, case: batch(target, case, args.runs, fib),
            args.repetitions,
            log,
        )
        check = {"repeat": 1000, "counters": repeat_trap(targets[0], fib)}
    results: dict[str, Any] = {
        "machine": info,
        "repetitions": args.repetitions,
        "runs": args.runs,
        "repeat": args.repeat,
        "tested_services": TESTED,
        "decoy_endpoints": DECOY_ENDPOINTS,
        "paths": PATHS,
        "sizes": sized,
        "method_check": check,
        "events_off": events_off,
    }
    results["flatness"] = flatness(results)
    text = [
        f"machine: {info['cpus']} CPUs ({info['cpu']}), kernel {info['kernel']}",
        f"{args.repetitions} repetitions of {args.runs} runs per path and N, alternating",
        *report(results),
        *monitor_cost.report(events_off, sizes[0]),
    ]
    print("\n".join(text), flush=True)
    (args.out / "program.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "program.txt").write_text("\n".join(text) + "\n")
    # the event sites' figure on its own too (README quotes it)
    off = {"machine": info, "size": sizes[0], "runs": args.runs, **events_off}
    (args.out / "monitor_off.json").write_text(json.dumps(off, indent=1) + "\n")
    off_text = [text[0], *monitor_cost.report(events_off, sizes[0])]
    (args.out / "monitor_off.txt").write_text("\n".join(off_text) + "\n")
    print(f"results: {args.out / 'program.json'}, {args.out / 'program.txt'}, monitor_off.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
