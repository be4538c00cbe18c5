"""The map writer: slot discipline, rollback on a full map, O(1) changes, adoption.

These run against real BPF maps (the session's compiled datapath, attached
nowhere) and, for the slot race, the real tc program under BPF_PROG_TEST_RUN.
"""

from __future__ import annotations

import ipaddress
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lbctl.datapath.ebpf import layout
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.datapath.ebpf.frontends import FrontendWriter
from lbctl.datapath.ebpf.libbpf import prog_test_run
from lbctl.datapath.ebpf.settings import BpfSettings
from lbctl.model import Protocol, ServiceRef
from lbctl.plan.planner import Backend, Frontend, FrontendKey
from tests import packets

IP = ipaddress.ip_address
TC_ACT_SHOT = 2


def frontend(i: int, backends: list[str], port: int = 80) -> Frontend:
    key = FrontendKey(IP(f"10.96.{i // 250}.{i % 250 + 1}"), port, Protocol.TCP)
    return Frontend(
        key,
        ServiceRef("ns", f"svc{i}"),
        "http",
        "ClusterIP",
        tuple(Backend(IP(b), 8080, Protocol.TCP) for b in backends),
    )


def decoded(dp: BpfDatapath) -> dict[str, Any]:
    """What the maps hold, checked for the slot invariants on the way."""
    m = dp.maps
    backends = {int(k[0]): v for k, v in m.lb4_backends.items()}
    slots = {(k.frontend_id, k.slot): v.backend_id for k, v in m.lb_slots.items()}
    metas = {int(k[0]) for k, _ in m.lb_frontend_meta.items()}
    members = {(k.frontend_id, k.backend_id) for k, _ in m.lb_members.items()}
    seen_slots = set()
    used_backends = set()
    out = {}
    for key, svc in m.lb4_services.items():
        assert svc.frontend_id in metas, "frontend without its metadata"
        names = []
        for n in range(1, svc.count + 1):
            assert (svc.frontend_id, n) in slots, f"slot {n} of {svc.count} missing"
            bid = slots[(svc.frontend_id, n)]
            assert bid in backends, "slot names a backend that does not exist"
            used_backends.add(bid)
            seen_slots.add((svc.frontend_id, n))
            names.append(layout.ip4_str(backends[bid].addr))
        out[f"{layout.ip4_str(key.addr)}:{layout.port_num(key.port)}"] = sorted(names)
    assert set(slots) == seen_slots, "slots beyond a count or of a removed frontend"
    assert members == set(slots_members(slots)), "memberships differ from the slots"
    assert set(backends) == used_backends, "backend entries nobody references"
    assert len(metas) == len(out), "metadata of removed frontends left behind"
    return out


def slots_members(slots: dict[tuple[int, int], int]) -> list[tuple[int, int]]:
    return [(frontend, backend) for (frontend, _), backend in slots.items()]


def expected(frontends: dict[FrontendKey, Frontend]) -> dict[str, Any]:
    return {
        f"{k.address}:{k.port}": sorted(str(b.address) for b in fe.backends)
        for k, fe in frontends.items()
    }


def test_random_changes_keep_maps_exact(clean_datapath: BpfDatapath) -> None:
    rng = random.Random(7)
    pool = [f"10.1.0.{i}" for i in range(1, 13)]
    want: dict[FrontendKey, Frontend] = {}
    for _ in range(300):
        i = rng.randrange(8)
        if rng.random() < 0.15:
            key = frontend(i, []).key
            clean_datapath.table.remove(key)
            want.pop(key, None)
        else:
            fe = frontend(i, rng.sample(pool, rng.randrange(0, 6)))
            clean_datapath.table.upsert(fe)
            want[fe.key] = fe
        assert decoded(clean_datapath) == expected(want)


def test_one_endpoint_change_costs_the_same_at_any_size(clean_datapath: BpfDatapath) -> None:
    table = clean_datapath.table
    costs = []
    for size in (10, 1000):
        for i in range(size):
            table.upsert(frontend(i, ["10.2.0.1", "10.2.0.2"]))
        target = frontend(size // 2, ["10.2.0.1", "10.2.0.2"])
        before = table.map_ops
        table.upsert(frontend(size // 2, ["10.2.0.1", "10.2.0.2", "10.2.0.3"]))
        added = table.map_ops - before
        before = table.map_ops
        table.upsert(target)
        removed = table.map_ops - before
        costs.append((added, removed))
        table.reconcile({})
    assert costs[0] == costs[1]
    # add: backend entry, membership, slot, count;
    # remove: hole fill (or none), count, slot, membership, backend entry
    assert costs[0][0] == 4 and costs[0][1] <= 5


def test_full_map_costs_only_that_frontend(pin_dir: Path) -> None:
    dp = BpfDatapath(BpfSettings(pin_dir=pin_dir, max_services=4, max_slots=6))
    try:
        table = dp.table
        errors = table.apply([frontend(i, ["10.3.0.1"]) for i in range(4)], [])
        assert errors == []
        # lb4_services is full: the fifth frontend fails whole, the others stay.
        errors = table.apply([frontend(4, ["10.3.0.2"])], [])
        assert len(errors) == 1
        assert "Service ns/svc4 port http" in errors[0]
        # its metadata entry is written first, so that map reports it
        assert "map lb_frontend_meta is full (4 entries)" in errors[0]
        assert "raise it with `lbctl run --max-services N`" in errors[0]
        assert decoded(dp) == {f"10.96.0.{i + 1}:80": ["10.3.0.1"] for i in range(4)}
        # lb_slots fills up halfway through adding backends: nothing of them stays.
        errors = table.apply([frontend(0, ["10.3.0.1", "10.3.0.5", "10.3.0.6", "10.3.0.7"])], [])
        # (memberships are written just before their slot and fill up alongside)
        assert len(errors) == 1 and "map lb_members is full" in errors[0]
        assert "`lbctl run --max-slots N`" in errors[0]
        assert decoded(dp)["10.96.0.1:80"] == ["10.3.0.1"]
        # Freeing room lets the same change through.
        table.remove(frontend(3, []).key)
        assert table.apply([frontend(0, ["10.3.0.1", "10.3.0.5", "10.3.0.6"])], []) == []
        assert decoded(dp)["10.96.0.1:80"] == ["10.3.0.1", "10.3.0.5", "10.3.0.6"]
    finally:
        dp.close()


def test_first_sync_writes_in_batches_and_matches_one_by_one(clean_datapath: BpfDatapath) -> None:
    """reconcile() creates new frontends with one batched write per map."""
    want = {
        fe.key: fe
        for fe in [
            frontend(i, [f"10.4.{i % 3}.{j}" for j in range(1, 1 + i % 4)]) for i in range(40)
        ]
    }
    table = clean_datapath.table
    calls: list[int] = []
    real = type(clean_datapath.maps.lb_slots).update_batch

    def counting(self: Any, keys: Any, values: Any, count: int) -> None:
        calls.append(count)
        real(self, keys, values, count)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(clean_datapath.maps.lb_slots), "update_batch", counting)
        assert table.reconcile(want) == []
    assert decoded(clean_datapath) == expected(want)
    assert len(calls) == 5  # backends, metadata, members, slots, headers
    # The mirror is what one-by-one writes would have made: nothing left to do.
    before = table.map_ops
    assert table.reconcile(want) == [] and table.map_ops == before
    # ...and later single changes work on top of it.
    table.upsert(frontend(1, ["10.4.1.1", "10.4.9.9"]))
    want[frontend(1, []).key] = frontend(1, ["10.4.1.1", "10.4.9.9"])
    assert decoded(clean_datapath) == expected(want)


def test_full_map_in_a_batched_sync_rolls_back_and_names_the_frontend(pin_dir: Path) -> None:
    dp = BpfDatapath(BpfSettings(pin_dir=pin_dir, max_services=4, max_slots=64))
    try:
        want = {fe.key: fe for fe in [frontend(i, ["10.3.0.1", "10.3.0.2"]) for i in range(6)]}
        errors = dp.table.reconcile(want)
        # The batch cannot fit six frontends: it is undone, then the one-by-one
        # path programs the four that fit and names the two that do not.
        assert len(errors) == 2
        assert all("map lb_frontend_meta is full (4 entries)" in e for e in errors)
        assert {e.split(" port ")[0] for e in errors} == {"Service ns/svc4", "Service ns/svc5"}
        programmed = {k: fe for k, fe in want.items() if fe.service.name not in ("svc4", "svc5")}
        assert decoded(dp) == expected(programmed)
    finally:
        dp.close()


def test_restart_adopts_maps_and_touches_only_what_changed(clean_datapath: BpfDatapath) -> None:
    want = {fe.key: fe for fe in (frontend(i, ["10.4.0.1", "10.4.0.2"]) for i in range(20))}
    assert clean_datapath.table.reconcile(want) == []
    adopted = FrontendWriter(clean_datapath.maps)
    adopted.adopt()
    assert adopted.reconcile(want) == [] and adopted.map_ops == 0
    stale = frontend(5, []).key
    del want[stale]
    assert adopted.reconcile(want) == []
    assert decoded(clean_datapath) == expected(want)
    # header, 2 slots, 2 memberships, metadata; the backends stay (others use them)
    assert adopted.map_ops == 6
    clean_datapath.table = adopted


def test_no_packet_sees_an_empty_or_removed_slot(clean_datapath: BpfDatapath) -> None:
    """A writer churns two backends while the program picks for new flows."""
    table = clean_datapath.table
    always, churn = "10.5.0.1", ["10.5.0.2", "10.5.0.3"]
    table.upsert(frontend(0, [always, *churn]))
    removed_at: dict[str, float] = {}
    added_at: dict[str, float] = {}
    stop = threading.Event()
    cycles = 0

    def writer() -> None:
        nonlocal cycles
        rng = random.Random(3)
        present = set(churn)
        while not stop.is_set():
            cycles += 1
            victim = rng.choice(churn)
            if victim in present:
                present.discard(victim)
                table.upsert(frontend(0, [always, *sorted(present)]))
                removed_at[victim] = time.monotonic()
            else:
                added_at[victim] = time.monotonic()
                present.add(victim)
                table.upsert(frontend(0, [always, *sorted(present)]))

    thread = threading.Thread(target=writer)
    thread.start()
    bad = []
    n = 0
    deadline = time.monotonic() + 20
    try:
        # At least 3000 packets and 300 writer changes, whatever the scheduling.
        while (n < 3000 or cycles < 300) and time.monotonic() < deadline:
            n += 1
            started = time.monotonic()
            frame = packets.ipv4_tcp("10.244.0.10", "10.96.0.1", 10000 + n, 80, flags="S")
            run = prog_test_run(clean_datapath.prog_fd, frame)
            if run.retval == TC_ACT_SHOT:
                bad.append(f"packet {n} dropped")
                continue
            chosen = packets.parse(run.data).dst
            # Removed (and not re-added) before this packet started: stale.
            if chosen not in (always, *churn):
                bad.append(f"packet {n} went to {chosen}, never a backend")
            gone = removed_at.get(chosen)
            if gone is not None and gone > added_at.get(chosen, 0.0) and gone < started:
                bad.append(f"packet {n} went to {chosen}, removed before it started")
    finally:
        stop.set()
        thread.join()
    assert not bad, bad[:5]
    assert cycles >= 300 and n >= 3000, f"race not exercised: {cycles} changes, {n} packets"


def test_replacing_every_backend_never_passes_through_zero(clean_datapath: BpfDatapath) -> None:
    table = clean_datapath.table
    table.upsert(frontend(0, ["10.6.0.1"]))
    counts: list[int] = []
    write = table._write

    def recording(bpf_map: Any, key: Any, value: Any) -> None:
        if bpf_map is clean_datapath.maps.lb4_services:
            counts.append(value.count)
        write(bpf_map, key, value)

    table._write = recording  # type: ignore[method-assign]
    try:
        table.upsert(frontend(0, ["10.6.0.2", "10.6.0.3"]))
    finally:
        del table._write
    assert counts and 0 not in counts, counts
    assert decoded(clean_datapath) == {"10.96.0.1:80": ["10.6.0.2", "10.6.0.3"]}


def test_adoption_repairs_what_an_interrupted_update_left(clean_datapath: BpfDatapath) -> None:
    table = clean_datapath.table
    table.upsert(frontend(0, ["10.7.0.1", "10.7.0.2", "10.7.0.3"]))
    m = clean_datapath.maps
    ident = table.frontends[frontend(0, []).key].ident
    # The agent died after copying slot 3 into slot 1 while removing 10.7.0.1:
    # slots are [C, B, C], A's entry is still there, nothing names it.
    slot3 = m.lb_slots.lookup(layout.new("struct lb_slot_key", frontend_id=ident, slot=3))
    m.lb_slots.update(layout.new("struct lb_slot_key", frontend_id=ident, slot=1), slot3)
    # ...and an orphan slot of a frontend that was never finished.
    orphan = layout.new("struct lb_slot_key", frontend_id=999, slot=1)
    m.lb_slots.update(orphan, slot3)

    adopted = FrontendWriter(m)
    adopted.adopt()
    clean_datapath.table = adopted
    assert decoded(clean_datapath) == {"10.96.0.1:80": ["10.7.0.2", "10.7.0.3"]}
    assert adopted.reconcile({fe.key: fe for fe in [frontend(0, ["10.7.0.2", "10.7.0.3"])]}) == []
    assert adopted.map_ops > 0 and m.lb_slots.lookup(orphan) is None


def test_too_many_backends_for_one_frontend_is_refused_whole(clean_datapath: BpfDatapath) -> None:
    huge = frontend(0, [str(IP("10.8.0.0") + i) for i in range(1, 0x10001)])
    errors = clean_datapath.table.apply([huge], [])
    assert errors == ["Service ns/svc0 port http: 65536 backends; a frontend holds at most 65535"]
    assert decoded(clean_datapath) == {}
