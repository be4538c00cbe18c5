"""Reliability: many thousands of random, hostile and mutated frames through every
BPF program that takes frames, under BPF_PROG_TEST_RUN.

The programs that take frames are the tc ingress program, the tc egress program
(run as for a packet the node's own stack sends; one that was received and is
forwarded leaves it at once, which a sample of the frames checks too) and the
XDP program.  The socket hooks (connect4, sendmsg4, recvmsg4, getpeername4) are
cgroup sock_addr programs: they see socket calls, not frames, and the kernel has
no BPF_PROG_TEST_RUN for them (ENOTSUPP, checked below).

The programs run with Services of every kind programmed (ClusterIP TCP and
UDP, NodePorts that masquerade through a small NAT port range, a
LoadBalancer IP with source ranges, Services without endpoints, an
externalTrafficPolicy Local one with no local endpoint, ClientIP affinity,
the random, maglev and rr schedulers) and balanced flows open, in a namespace
of their own whose routes and neighbours the FIB lookups see.  Frames come from
tests/fuzz_frames.py, seeded.  For every frame, through each program:

- the verdict is one the program may give (tc: OK, SHOT, REDIRECT; XDP: PASS,
  DROP, REDIRECT), and nothing else happens (the test run succeeds; frames
  shorter than an Ethernet header are refused by the kernel itself);
- a frame that is not ours (not to a frontend, not from a backend, not an
  ICMP error quoting either) comes out unchanged, passed;
- XDP passes frames unchanged or not at all (it leaves them to tc);
- every drop is counted under a reason in lb_stats;
- a translated frame whose checksums were right keeps them right.
Finally the kernel is not tainted (no warning, no oops) by the run.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import ipaddress
import itertools
import json
import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbctl.datapath import NodeConfig
from lbctl.datapath.ebpf import layout, libbpf
from lbctl.datapath.ebpf.compiler import EGRESS_PROGRAM
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.model import Protocol, ServiceRef
from lbctl.plan.planner import SCOPE_EXTERNAL, Backend, Frontend, FrontendKey
from tests import netlab, packets
from tests.fuzz_frames import ETH, Flow, Generator
from tests.netlab import Lab, Netns
from tests.reliability import report, scaled

pytestmark = [pytest.mark.reliability, pytest.mark.netns]

FRAMES = scaled(3_000, 50_000)  # each through tc ingress, tc egress and XDP
PROGRAMS = ("tc", "egress", "xdp")
INGRESS_IFINDEX_OFFSET = 36  # offsetof(struct __sk_buff, ingress_ifindex), uapi
SEED = int(os.environ.get("LBCTL_FUZZ_SEED", "20251"))  # another seed explores further
NODE = "192.0.2.1"
VIP, EMPTY, STICKY = "10.96.0.10", "10.96.0.11", "10.96.0.12"
LB, LOCAL_LB = "203.0.113.1", "203.0.113.2"
BACKENDS = ("10.244.0.20", "10.244.0.21", "10.244.0.22")
INSIDE = ("10.244.1.5", "10.244.1.6")  # pods: not masqueraded on ClusterIPs
OUTSIDE = ("198.51.100.7", "198.51.100.200", "192.0.2.77")  # .200: outside the source range
TCP, UDP = Protocol.TCP, Protocol.UDP
NAT_PORTS = (61000, 61031)  # small, so that masquerading runs out too

TC_OK, TC_SHOT, TC_REDIRECT = 0, 2, 7
XDP_DROP, XDP_PASS, XDP_REDIRECT = 1, 2, 4
TC_VERDICTS = {TC_OK: "OK", TC_SHOT: "SHOT", TC_REDIRECT: "REDIRECT"}
XDP_VERDICTS = {XDP_DROP: "DROP", XDP_PASS: "PASS", XDP_REDIRECT: "REDIRECT"}
DROP_REASONS = {
    layout.const(f"LB_STAT_{name}"): name.lower()
    for name in (
        "DROP_NO_BACKEND",
        "CT_FULL",
        "REJECT",
        "DROP_SOURCE_RANGE",
        "DROP_NO_LOCAL",
        "NAT_EXHAUSTED",
    )
}
STAT_MAX = layout.const("LB_STAT_MAX")


def frontends() -> list[Frontend]:
    def fe(
        address: str,
        port: int,
        proto: Protocol,
        backends: tuple[str, ...],
        target: int,
        kind: str = "ClusterIP",
        **extra: Any,
    ) -> Frontend:
        return Frontend(
            FrontendKey(ipaddress.ip_address(address), port, proto, extra.pop("scope", 0)),
            ServiceRef("fuzz", f"{kind.lower()}-{port}"),
            proto.name.lower(),
            kind,
            tuple(Backend(ipaddress.ip_address(b), target, proto) for b in backends),
            **extra,
        )

    ranges = (ipaddress.ip_network("198.51.100.0/25"),)
    return [
        fe(VIP, 80, TCP, BACKENDS, 8080),
        fe(VIP, 53, UDP, BACKENDS, 5353, scheduler="maglev"),
        fe(NODE, 30080, TCP, BACKENDS, 8080, "NodePort", scheduler="rr"),
        fe(NODE, 30053, UDP, BACKENDS[:2], 5353, "NodePort"),
        fe(LB, 443, TCP, BACKENDS[1:], 8443, "LoadBalancer", source_ranges=ranges),
        fe(EMPTY, 80, TCP, (), 8080),
        fe(EMPTY, 53, UDP, (), 5353),
        fe(LOCAL_LB, 80, TCP, BACKENDS[:1], 8080, "LoadBalancer", local=True),
        fe(LOCAL_LB, 80, TCP, (), 8080, "LoadBalancer", local=True, drop_empty=True,
           scope=SCOPE_EXTERNAL),
        fe(STICKY, 80, TCP, BACKENDS, 8080, affinity_timeout=60),
    ]  # fmt: skip


@dataclasses.dataclass
class Fib:
    ns: Netns
    in_index: int


@pytest.fixture(scope="module")
def fib() -> Iterator[Fib]:
    """A namespace with routes to the clients and the pods, for the FIB lookups."""
    with Lab() as lab:
        ns = lab.netns("fuzz")
        ns.sysctl("net.ipv4.ip_forward", 1)
        netlab.veth(ns, "in0", ns, "in1")
        netlab.veth(ns, "out0", ns, "out1")
        ns.ip("addr", "add", f"{NODE}/24", "dev", "in0")
        ns.ip("route", "add", "198.51.100.0/24", "dev", "in0")
        ns.ip("route", "add", "10.244.0.0/16", "dev", "out0")
        for address in (*BACKENDS, *INSIDE):
            ns.ip("neigh", "add", address, "lladdr", "02:00:00:00:0b:01", "dev", "out0",
                  "nud", "permanent")  # fmt: skip
        ns.ip("neigh", "add", OUTSIDE[0], "lladdr", "02:00:00:00:0c:01", "dev", "in0",
              "nud", "permanent")  # fmt: skip
        index = json.loads(ns.ip("-j", "link", "show", "dev", "in0").stdout)[0]["ifindex"]
        yield Fib(ns, int(index))


class Runner:
    """Runs frames through tc and XDP and keeps the lb_stats counters current."""

    def __init__(self, dp: BpfDatapath, fib: Fib) -> None:
        self.dp = dp
        self.fib = fib
        xdp = dp.prog_fds.get("lbctl_xdp")
        assert xdp is not None, f"lbctl_xdp did not load: {dp.failed_programs}"
        egress = dp.prog_fds.get(EGRESS_PROGRAM)
        assert egress is not None, f"{EGRESS_PROGRAM} did not load: {dp.failed_programs}"
        self.fds = {"tc": dp.prog_fd, "egress": egress, "xdp": xdp}
        self.stats = self.read_stats()

    def read_stats(self) -> list[int]:
        out = []
        for idx in range(STAT_MAX):
            per_cpu = self.dp.maps.lb_stats.lookup(layout.ffi.new("__u32 *", idx))
            out.append(sum(int(v) for v in per_cpu) if per_cpu is not None else 0)
        return out

    def run(
        self, program: str, frame: bytes, received: bool = False
    ) -> tuple[libbpf.TestRun, dict[int, int]]:
        """The verdict and frame out, and the counters that moved.  Egress: a frame
        the node's stack sent, or (`received`) one received on in0, forwarded."""
        ctx = None
        if program == "xdp":  # xdp_md: data, data_end, data_meta, ingress_ifindex, ...
            ctx = struct.pack("=6I", 0, len(frame), 0, self.fib.in_index, 0, 0)
        elif program == "egress":  # __sk_buff up to ingress_ifindex
            raw = bytearray(INGRESS_IFINDEX_OFFSET + 4)
            struct.pack_into("=I", raw, INGRESS_IFINDEX_OFFSET, self.fib.in_index * received)
            ctx = bytes(raw)
        with self.fib.ns.entered():
            result = libbpf.prog_test_run(self.fds[program], frame, ctx=ctx)
        now = self.read_stats()
        moved = {i: a - b for i, (a, b) in enumerate(zip(now, self.stats, strict=True)) if a != b}
        self.stats = now
        return result, moved


def open_flows(runner: Runner, rng: random.Random) -> list[Flow]:
    """Balanced flows from every client to every frontend with backends, through tc,
    each answered by its backend so that both directions are known."""
    flows = []
    for fe in frontends():
        if not fe.backends:
            continue
        proto = fe.key.protocol.number
        for client in (*INSIDE, *OUTSIDE):
            cport = rng.randint(20000, 60000)
            vip, vport = str(fe.key.address), fe.key.port
            if proto == packets.IPPROTO_TCP:
                frame = packets.ipv4_tcp(client, vip, cport, vport, "S")
            else:
                frame = packets.ipv4_udp(client, vip, cport, vport, b"q")
            result, _ = runner.run("tc", frame)
            out = packets.parse(result.data)
            if result.retval == TC_SHOT or out.dst == client:
                continue  # denied by the source ranges, or no local endpoint
            assert out.src and out.sport and out.dst and out.dport
            flow = Flow(proto, client, cport, vip, vport, out.dst, out.dport, out.src, out.sport)
            if proto == packets.IPPROTO_TCP:
                reply = packets.ipv4_tcp(flow.backend, flow.src, flow.bport, flow.sport, "SA")
            else:
                reply = packets.ipv4_udp(flow.backend, flow.src, flow.bport, flow.sport, b"r")
            assert runner.run("tc", reply)[0].retval in (TC_OK, TC_REDIRECT)
            flows.append(flow)
    return flows


class Oracle:
    """Which frames are ours: to a frontend, from a backend (a reply), or an ICMP
    error quoting either; everything else must come out as it went in."""

    def __init__(self) -> None:
        fes = frontends()
        self.frontends = {(str(f.key.address), f.key.port, f.key.protocol.number) for f in fes}
        self.backends = {
            (str(b.address), b.port, b.protocol.number) for f in fes for b in f.backends
        }

    def _touches(self, addr: str, port: int, proto: int) -> bool:
        return (addr, port, proto) in self.frontends or (addr, port, proto) in self.backends

    def ours(self, frame: bytes) -> bool:
        if len(frame) < ETH + 20 or frame[12:14] != b"\x08\x00":
            return False
        ver_ihl, proto = frame[ETH], frame[ETH + 9]
        ihl = (ver_ihl & 0x0F) * 4
        if ver_ihl >> 4 != 4 or ihl < 20:
            return False
        if struct.unpack("!H", frame[ETH + 6 : ETH + 8])[0] & 0x3FFF:
            return False  # a fragment: passed, never translated
        src, dst = _addr(frame, ETH + 12), _addr(frame, ETH + 16)
        l4 = ETH + ihl
        if proto in (packets.IPPROTO_TCP, packets.IPPROTO_UDP):
            need = 20 if proto == packets.IPPROTO_TCP else 8
            if len(frame) < l4 + need:
                return False
            sport, dport = struct.unpack("!HH", frame[l4 : l4 + 4])
            return self._touches(dst, dport, proto) or self._touches(src, sport, proto)
        if proto != packets.IPPROTO_ICMP or ihl != 20 or len(frame) < l4 + 8 + 24:
            return False
        quote = l4 + 8
        qproto, qihl = frame[quote + 9], (frame[quote] & 0x0F) * 4
        if frame[l4] not in (3, 11, 12) or qproto not in (6, 17) or frame[quote] >> 4 != 4:
            return False
        if qihl != 20:
            return False
        qsrc, qdst = _addr(frame, quote + 12), _addr(frame, quote + 16)
        qsport, qdport = struct.unpack("!HH", frame[quote + 20 : quote + 24])
        return self._touches(qsrc, qsport, qproto) or self._touches(qdst, qdport, qproto)


def _addr(frame: bytes, at: int) -> str:
    return str(ipaddress.IPv4Address(frame[at : at + 4]))


def too_short(program: str, frame: bytes) -> bool:
    """Frames the kernel refuses to test-run: shorter than an Ethernet header, and for
    tc (an skb) an IPv4 or IPv6 one shorter than its IP header."""
    if len(frame) < ETH:
        return True
    ethertype = frame[12:14]
    if program != "xdp" and ethertype == b"\x08\x00":
        return len(frame) < ETH + 20
    if program != "xdp" and ethertype == b"\x86\xdd":
        return len(frame) < ETH + 40
    return False


def checksums_right(frame: bytes) -> bool:
    try:
        p = packets.parse(frame)
    except (ValueError, struct.error):  # the parser of tests/packets.py gives up
        return False
    return p.ethertype == packets.ETH_P_IP and p.ip_csum_ok and p.l4_csum_ok is True


@dataclasses.dataclass
class Tally:
    verdicts: dict[str, collections.Counter[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    families: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    drops: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    ours: int = 0
    not_ours: int = 0
    modified: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    checksummed: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)

    def fail(self, what: str, program: str, family: str, frame: bytes, **detail: Any) -> None:
        if len(self.failures) < 20:
            self.failures.append(f"{program}: {what} ({family}) {detail} frame={frame.hex()}")


def check(
    tally: Tally,
    oracle: Oracle,
    program: str,
    family: str,
    frame: bytes,
    result: libbpf.TestRun,
    moved: dict[int, int],
) -> None:
    verdicts = XDP_VERDICTS if program == "xdp" else TC_VERDICTS
    verdict = verdicts.get(result.retval, f"unexpected {result.retval}")
    tally.verdicts[program][verdict] += 1
    if result.retval not in verdicts:
        tally.fail("a verdict the program never gives", program, family, frame, rv=result.retval)
    changed = result.data != frame
    if changed:
        tally.modified[program] += 1
    ours = oracle.ours(frame)
    if not ours and (changed or result.retval not in (TC_OK, XDP_PASS)):
        tally.fail("a frame not ours was touched", program, family, frame, verdict=verdict,
                   out=result.data.hex())  # fmt: skip
    if program == "xdp" and result.retval == XDP_PASS and changed:
        tally.fail("XDP passed a frame it had changed", program, family, frame)
    dropped = result.retval == (XDP_DROP if program == "xdp" else TC_SHOT)
    if dropped:
        reasons = [DROP_REASONS[i] for i in moved if i in DROP_REASONS]
        if not reasons:
            tally.fail("a drop counted under no reason", program, family, frame, moved=moved)
        tally.drops[f"{program} {'/'.join(sorted(reasons)) or 'NONE'}"] += 1
    elif changed and checksums_right(frame):
        tally.checksummed += 1
        if not checksums_right(result.data):
            tally.fail("a translated frame with a wrong checksum", program, family, frame,
                       out=result.data.hex())  # fmt: skip


def test_random_hostile_and_mutated_frames(
    clean_datapath: BpfDatapath, fib: Fib, capsys: pytest.CaptureFixture[str]
) -> None:
    dp = clean_datapath
    tainted = Path("/proc/sys/kernel/tainted").read_text()
    dp.configure(
        NodeConfig(
            snat_address=ipaddress.IPv4Address(NODE),
            nat_ports=NAT_PORTS,
            cluster_cidrs=(ipaddress.IPv4Network("10.244.0.0/16"),),
        )
    )
    assert dp.reconcile({fe.key: fe for fe in frontends()}) == []
    rng = random.Random(SEED)
    runner = Runner(dp, fib)
    flows = open_flows(runner, rng)
    assert len(flows) >= 20
    gen = Generator(
        rng,
        sorted({(str(f.key.address), f.key.port, f.key.protocol.number) for f in frontends()}),
        sorted(Oracle().backends),
        [*INSIDE, *OUTSIDE],
        flows,
        NODE,
    )
    oracle, tally = Oracle(), Tally()
    refused: collections.Counter[str] = collections.Counter()
    forwarded = 0
    frames = itertools.chain(gen.every_flag_combination(), (gen.next() for _ in range(FRAMES)))
    for family, frame in frames:
        tally.families[family] += 1
        if oracle.ours(frame):
            tally.ours += 1
        else:
            tally.not_ours += 1
        if not too_short("egress", frame) and rng.random() < 0.1:
            # received and forwarded: the ingress hook saw it, egress leaves it alone
            result, _ = runner.run("egress", frame, received=True)
            forwarded += 1
            if (result.retval, result.data) != (TC_OK, frame):
                tally.fail("egress touched a forwarded frame", "egress", family, frame)
        for program in PROGRAMS:
            try:
                result, moved = runner.run(program, frame)
            except OSError as err:
                if err.errno == errno.EINVAL and too_short(program, frame):
                    refused[program] += 1
                    continue
                raise AssertionError(f"{program} on {family} {frame.hex()}: {err}") from err
            check(tally, oracle, program, family, frame, result, moved)
    assert Path("/proc/sys/kernel/tainted").read_text() == tainted, "the kernel got tainted"
    sockets = socket_programs(dp)

    rows = [
        f"seed {SEED}: {sum(tally.families.values())} frames ({FRAMES} random), each through "
        "tc ingress, tc egress (sent by the node's stack) and XDP; refused by the kernel's "
        f"test run itself: tc {refused['tc']} and egress {refused['egress']} (under an "
        f"Ethernet header, or IPv4/IPv6 under its IP header), XDP {refused['xdp']} (under an "
        "Ethernet header)",
        "families: " + ", ".join(f"{n} {f}" for f, n in tally.families.most_common()),
        f"ours (to a frontend, from a backend, ICMP about either): {tally.ours}; "
        f"not ours: {tally.not_ours}, all passed unchanged",
        *(
            f"{program} verdicts: "
            + ", ".join(f"{v} {n}" for v, n in sorted(tally.verdicts[program].items()))
            + f"; frames changed: {tally.modified[program]}"
            for program in PROGRAMS
        ),
        f"egress on {forwarded} of them as received and forwarded: all left untouched",
        "drops by reason (lb_stats): "
        + (", ".join(f"{n} {r}" for r, n in sorted(tally.drops.items())) or "none"),
        f"translated frames whose checksums were right before: {tally.checksummed}, "
        "all right after",
        f"socket programs ({', '.join(sockets)}): no frames; BPF_PROG_TEST_RUN answers "
        "ENOTSUPP (cgroup sock_addr)",
        "kernel taint unchanged; failures: " + str(len(tally.failures)),
    ]
    report(capsys, "packets", "packet fuzzing (BPF_PROG_TEST_RUN)", rows)
    assert not tally.failures, "\n".join(tally.failures)


def socket_programs(dp: BpfDatapath) -> list[str]:
    """The cgroup sock_addr programs take no frames: the kernel refuses to test-run them."""
    names = sorted(n for n in dp.prog_fds if n.startswith("lbctl_sock_"))
    assert names, f"no socket program loaded: {dp.failed_programs}"
    for name in names:
        with pytest.raises(OSError) as raised:
            libbpf.prog_test_run(dp.prog_fds[name], packets.ipv4_tcp(INSIDE[0], VIP, 1, 80, "S"))
        assert raised.value.errno == 524, raised.value  # ENOTSUPP
    return names
