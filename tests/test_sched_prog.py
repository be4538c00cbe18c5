"""The schedulers in the tc program, under BPF_PROG_TEST_RUN (no network).

Frames go through the loaded program; the backend a new flow got is the
destination of the frame that comes out.  The deterministic schedulers
(maglev, sh) are held to lbctl.plan.scheduling, the Python model, which is built
here from the backends' addresses alone, as another node would.
"""

from __future__ import annotations

import collections
import ipaddress
import random
from collections.abc import Iterator, Sequence

import pytest

from lbctl.datapath.ebpf import conntrack_gc, layout
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.model import Protocol, ServiceRef
from lbctl.plan import scheduling
from lbctl.plan.planner import Backend, Frontend, FrontendKey
from tests import packets
from tests.conftest import compiled_datapath
from tests.test_bpf_prog import FORWARDED, run

VIP = "10.96.0.10"
PORT, TARGET = 80, 8080
CLIENT = "10.0.0.1"


def ip(addr: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(addr)


def addresses(n: int) -> list[str]:
    return [f"10.244.{i // 200}.{i % 200 + 10}" for i in range(n)]


def frontend(
    backends: Sequence[str],
    scheduler: str,
    *,
    weights: Sequence[int] | None = None,
    affinity: int = 0,
    protocol: Protocol = Protocol.TCP,
) -> Frontend:
    ws = weights or [1] * len(backends)
    return Frontend(
        FrontendKey(ip(VIP), PORT, protocol),
        ServiceRef("ns", "web"),
        "http",
        "ClusterIP",
        tuple(
            Backend(ip(a), TARGET, protocol, weight=w) for a, w in zip(backends, ws, strict=True)
        ),
        scheduler=scheduler,
        affinity_timeout=affinity,
    )


def new_flow(
    dp: BpfDatapath, sport: int, client: str = CLIENT, proto: Protocol = Protocol.TCP
) -> str:
    """Send the first packet of a flow; return the backend it went to."""
    if proto is Protocol.TCP:
        frame = packets.ipv4_tcp(client, VIP, sport, PORT, "S")
    else:
        frame = packets.ipv4_udp(client, VIP, sport, PORT, b"q")
    result = run(dp, frame)
    assert result.retval in FORWARDED, f"verdict {result.retval}"
    return packets.parse(result.data).dst


def fin(dp: BpfDatapath, sport: int, client: str = CLIENT) -> None:
    result = run(dp, packets.ipv4_tcp(client, VIP, sport, PORT, "FA"))
    assert result.retval in FORWARDED


def clear_conntrack(dp: BpfDatapath) -> None:
    for key in list(dp.maps.ct4.keys()):
        dp.maps.ct4.delete(key)


def model_pick(
    backends: Sequence[str], scheduler: str, client: str, sport: int, proto: Protocol
) -> str:
    """The backend lbctl.plan.scheduling says a flow gets, from the addresses alone."""
    ordered = sorted(backends, key=lambda a: int(ip(a)))
    names = [(f"{a}:{TARGET}/{proto.name}", 1) for a in ordered]
    table = scheduling.build_table(scheduler, names, scheduling.DEFAULT_TABLE_SIZE)
    saddr = layout.ip4(client)
    if scheduler == scheduling.SH:
        h = scheduling.source_hash(saddr)
    else:
        h = scheduling.flow_hash(
            saddr, layout.ip4(VIP), layout.port(sport), layout.port(PORT), proto.number
        )
    return ordered[scheduling.table_pick(table, h)]


# -------------------------------------------------------------------------- rr, wrr


def test_rr_rotates_over_the_backends_exactly(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    backends = addresses(3)
    dp.table.upsert(frontend(backends, "rr"))
    got = [new_flow(dp, 20000 + i) for i in range(12)]
    assert sorted(got[:3]) == sorted(backends)
    assert got == got[:3] * 4


def test_wrr_shares_follow_the_weights(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    backends = addresses(3)
    dp.table.upsert(frontend(backends, "wrr", weights=[1, 2, 3]))
    got = collections.Counter(new_flow(dp, 10000 + i) for i in range(3000))
    shares = [got[a] / 3000 for a in backends]
    for share, want in zip(shares, (1 / 6, 2 / 6, 3 / 6), strict=True):
        assert abs(share - want) <= 0.03, shares
    # a change of weight alone rewrites the row
    dp.table.upsert(frontend(backends, "wrr", weights=[1, 1, 2]))
    got = collections.Counter(new_flow(dp, 20000 + i) for i in range(400))
    assert [got[a] for a in backends] == [100, 100, 200]


# ----------------------------------------------------------------------- maglev, sh


@pytest.mark.parametrize("scheduler", ["maglev", "sh"])
@pytest.mark.parametrize("proto", [Protocol.TCP, Protocol.UDP], ids=["tcp", "udp"])
def test_deterministic_choice_equals_the_model(
    clean_datapath: BpfDatapath, scheduler: str, proto: Protocol
) -> None:
    dp = clean_datapath
    rng = random.Random(f"{scheduler}-{proto.name}")
    backends = addresses(7)
    dp.table.upsert(frontend(backends, scheduler, protocol=proto))
    for _ in range(300):
        client = str(ipaddress.IPv4Address(rng.getrandbits(32) | 0x01000000))
        sport = rng.randrange(1, 65536)
        got = new_flow(dp, sport, client, proto)
        assert got == model_pick(backends, scheduler, client, sport, proto), (client, sport)


def test_sh_keeps_each_source_on_one_backend(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    backends = addresses(5)
    dp.table.upsert(frontend(backends, "sh"))
    clients = [f"10.1.0.{i}" for i in range(1, 41)]
    seen: dict[str, set[str]] = {c: set() for c in clients}
    for i in range(10):
        for c in clients:
            seen[c].add(new_flow(dp, 30000 + i, c))
    assert all(len(b) == 1 for b in seen.values()), seen
    assert len({b for s in seen.values() for b in s}) >= 4  # and sources spread


FLOWS = 10_000


def flow_tuples() -> list[tuple[str, int]]:
    rng = random.Random(7)
    return [
        (str(ipaddress.IPv4Address(0x0A000000 | rng.getrandbits(20))), rng.randrange(1024, 65536))
        for _ in range(FLOWS)
    ]


def decide(dp: BpfDatapath, flows: Sequence[tuple[str, int]]) -> list[str]:
    clear_conntrack(dp)
    out = [new_flow(dp, sport, client) for client, sport in flows]
    clear_conntrack(dp)
    return out


@pytest.fixture(scope="module")
def other_node() -> Iterator[BpfDatapath]:
    """A second, independent datapath: another node with its own maps and ids."""
    with compiled_datapath("node-b") as dp:
        yield dp


def test_maglev_moves_only_the_removed_backends_flows(
    clean_datapath: BpfDatapath, other_node: BpfDatapath
) -> None:
    dp = clean_datapath
    backends = addresses(10)
    flows = flow_tuples()
    dp.table.upsert(frontend(backends, "maglev"))
    before = decide(dp, flows)
    assert len(set(before)) == 10

    # Node B reaches the same backends by another history: different ids,
    # a different order of arrival, a backend that came and went.
    b = other_node
    b.table.upsert(frontend([*backends[5:], "10.250.0.1"], "maglev"))
    b.table.upsert(frontend(backends[5:] + backends[:5] + ["10.250.0.1"], "maglev"))
    b.table.upsert(frontend(list(reversed(backends)), "maglev"))
    try:
        assert decide(b, flows) == before, "two nodes disagree on a flow's backend"
        gone = backends[3]
        share = before.count(gone) / FLOWS
        dp.table.upsert(frontend([a for a in backends if a != gone], "maglev"))
        ops_before = dp.table.map_ops
        after = decide(dp, flows)
        moved = sum(1 for x, y in zip(before, after, strict=True) if x != y) / FLOWS
        assert gone not in after
        assert moved <= share + 0.02, (moved, share)
        b.table.upsert(frontend([a for a in backends if a != gone], "maglev"))
        assert decide(b, flows) == after
    finally:
        b.reconcile({})
    assert dp.table.map_ops == ops_before  # deciding flows writes no table entries


def test_a_backend_change_rewrites_only_the_entries_that_change(
    clean_datapath: BpfDatapath,
) -> None:
    dp = clean_datapath
    backends = addresses(10)
    dp.table.upsert(frontend(backends, "maglev"))
    ops = dp.table.map_ops
    dp.table.upsert(frontend(backends[:9], "maglev"))
    written = dp.table.map_ops - ops
    size = scheduling.DEFAULT_TABLE_SIZE
    # the removed backend's tenth of the row, a little more, and a few slot writes
    assert size // 10 <= written <= size // 10 + size // 50, written


# ---------------------------------------------------------------------------------- lc


def open_flows(dp: BpfDatapath) -> dict[str, int]:
    """Open flows per backend address, as lb_conns and lb_conns_expired say."""
    out = {}
    for target, be in dp.table.backends.items():
        key = layout.ffi.new("__u32 *", be.ident)
        c = dp.maps.lb_conns.lookup(key)
        e = dp.maps.lb_conns_expired.lookup(key)
        n = (c.opened - c.closed if c is not None else 0) - (int(e[0]) if e is not None else 0)
        out[str(target[0])] = n
    return out


def test_lc_picks_the_backend_with_fewest_open_flows(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    backends = addresses(3)
    dp.table.upsert(frontend(backends, "lc"))
    first = [new_flow(dp, 40000 + i) for i in range(3)]
    assert sorted(first) == sorted(backends)  # ties go to the empty ones
    more = [new_flow(dp, 40010 + i) for i in range(6)]
    assert collections.Counter(first + more) == {a: 3 for a in backends}
    # close two of one backend's flows: it takes the next two new ones
    target = first[0]
    closing = [40000, *[40010 + i for i, b in enumerate(more) if b == target][:1]]
    for sport in closing:
        fin(dp, sport)
    assert open_flows(dp)[target] == 1
    assert [new_flow(dp, 40100), new_flow(dp, 40101)] == [target, target]
    assert open_flows(dp) == {a: 3 for a in backends}
    # a FIN seen twice (a retransmission, the other side's) closes once
    fin(dp, 40100)
    fin(dp, 40100)
    assert open_flows(dp)[target] == 2


def test_lc_counts_flows_that_time_out(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    backends = addresses(2)
    dp.table.upsert(frontend(backends, "lc", protocol=Protocol.UDP))
    for i in range(4):
        new_flow(dp, 50000 + i, proto=Protocol.UDP)
    assert open_flows(dp) == {a: 2 for a in backends}
    # an entry lost without a close (as when the LRU evicts it): the sweep heals the count
    lost = next(k for k, e in dp.maps.ct4.items() if k.dir == 0)
    lost_backend = next(e for k, e in dp.maps.ct4.items() if k.dir == 0 and k.sport == lost.sport)
    dp.maps.ct4.delete(lost)
    conntrack_gc.sweep(dp.maps, dp.settings)
    healed = open_flows(dp)
    assert sorted(healed.values()) == [1, 2]
    assert healed[layout.ip4_str(lost_backend.nat_addr)] == 1
    # an hour later every UDP flow is dead: the sweep counts them expired
    swept = conntrack_gc.sweep(dp.maps, dp.settings, conntrack_gc.now_ns() + 3600 * 10**9)
    # the three flows left, forward and reverse entries, and the lost flow's
    # reverse entry, which the first sweep left as too young to be an orphan
    assert swept.conntrack == 7
    assert open_flows(dp) == {a: 0 for a in backends}


# ---------------------------------------------------------------------------- affinity


def age_affinity(dp: BpfDatapath, seconds: float) -> None:
    for key, a in list(dp.maps.lb4_affinity.items()):
        a.last_seen_ns -= int(seconds * 10**9)
        dp.maps.lb4_affinity.update(key, a)


def test_client_ip_affinity_holds_within_the_timeout(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    backends = addresses(3)
    dp.table.upsert(frontend(backends, "rr", affinity=5))
    first = new_flow(dp, 41000)
    assert {new_flow(dp, 41001 + i) for i in range(10)} == {first}
    # another client is scheduled on its own (rr's next turn)
    other = new_flow(dp, 41000, "10.0.0.2")
    assert other != first
    # silent for longer than the timeout: the next connection may move, and
    # with rr it does (the turn moved on while affinity held)
    age_affinity(dp, 6)
    moved = new_flow(dp, 41100)
    assert moved not in (first, other)
    assert {new_flow(dp, 41101 + i) for i in range(5)} == {moved}


def test_affinity_goes_with_its_backend(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    backends = addresses(3)
    dp.table.upsert(frontend(backends, "random", affinity=300))
    first = new_flow(dp, 42000)
    rest = [a for a in backends if a != first]
    dp.table.upsert(frontend(rest, "random", affinity=300))
    second = new_flow(dp, 42001)
    assert second in rest
    assert {new_flow(dp, 42002 + i) for i in range(5)} == {second}
    # the sweep drops entries whose backend left or whose time passed
    dp.table.upsert(frontend([a for a in rest if a != second], "random", affinity=300))
    swept = conntrack_gc.sweep(dp.maps, dp.settings, affinity=dp.table.affinities())
    assert swept.affinity == 1
    assert len(dp.maps.lb4_affinity) == 0


def test_a_restart_adopts_the_table_and_rewrites_nothing(clean_datapath: BpfDatapath) -> None:
    from lbctl.datapath.ebpf.frontends import FrontendWriter

    dp = clean_datapath
    backends = addresses(6)
    fe = frontend(backends, "maglev")
    dp.table.upsert(fe)
    flows = flow_tuples()[:500]
    before = decide(dp, flows)
    adopted = FrontendWriter(dp.maps)
    adopted.adopt()
    assert not adopted.matches(fe)  # what the row was built from is not in the maps...
    adopted.upsert(fe)
    assert adopted.map_ops == 0  # ...but rebuilt, it is the same row: nothing to write
    assert adopted.matches(fe)
    dp.table = adopted
    assert decide(dp, flows) == before
