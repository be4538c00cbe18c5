"""Upgrading pinned maps in place, at the map level: conversions, capacities, crashes.

The datapath is compiled for real and its maps filled by the real tc program
under BPF_PROG_TEST_RUN (conntrack, NAT, counters); a second datapath with
other settings then adopts them.  Nothing is attached: tests/test_upgrade.py
does the same with real agents, hooks and traffic.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbctl.datapath import NodeConfig
from lbctl.datapath.ebpf import libbpf
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.datapath.ebpf.maps import MAP_TYPES
from lbctl.datapath.ebpf.settings import BpfSettings
from lbctl.datapath.ebpf.upgrade import convert, migrate, pinsets, rawmap, record
from lbctl.datapath.ebpf.upgrade.mapspec import MapSpec, specs
from lbctl.datapath.ebpf.upgrade.run import PAUSE_ENV
from lbctl.datapath.ebpf.upgrade.structs import Layout
from lbctl.model import Protocol, ServiceRef
from lbctl.plan.planner import Backend, Frontend, FrontendKey
from tests import packets
from tests.conftest import BPFFS, PIN_PREFIX, remove_pins
from tests.test_bpf_prog import checked, run

NODE, OUTSIDE, POD = "192.0.2.1", "198.51.100.7", "10.244.3.9"
BACKENDS = ["10.244.0.20", "10.244.0.21", "10.244.1.20"]
IP = ipaddress.IPv4Address

SMALL = dict(
    max_services=512,
    max_backends=512,
    max_slots=2048,
    ct_size=4096,
    nat_size=2048,
    max_source_ranges=256,
    affinity_size=1024,
    sock_rev_size=1024,
    table_size=251,
    max_tables=8,
)
BIGGER = dict(
    max_services=1024,
    max_backends=600,
    max_slots=4096,
    ct_size=8192,
    nat_size=3000,
    max_source_ranges=300,
    affinity_size=2000,
    sock_rev_size=1500,
    table_size=257,
    max_tables=10,
)


Template = tuple[Path, dict[str, list[int]]]


def settings(pin_dir: Path, **sizes: int) -> BpfSettings:
    return BpfSettings(pin_dir=pin_dir, **{**SMALL, **sizes})  # type: ignore[arg-type]


def frontends() -> dict[FrontendKey, Frontend]:
    out = [
        Frontend(
            FrontendKey(IP(NODE), 30053, Protocol.UDP),
            ServiceRef("ns", "dns"),
            "dns",
            "NodePort",
            tuple(Backend(IP(b), 5353, Protocol.UDP) for b in BACKENDS),
        ),
        Frontend(
            FrontendKey(IP("10.96.0.10"), 80, Protocol.TCP),
            ServiceRef("ns", "web"),
            "http",
            "ClusterIP",
            tuple(Backend(IP(b), 8080, Protocol.TCP) for b in BACKENDS),
            scheduler="maglev",
        ),
        Frontend(
            FrontendKey(IP("10.96.0.12"), 80, Protocol.TCP),
            ServiceRef("ns", "web2"),
            "http",
            "ClusterIP",
            tuple(Backend(IP(b), 8080, Protocol.TCP) for b in BACKENDS[:2]),
            scheduler="maglev",
        ),
        Frontend(
            FrontendKey(IP("10.96.0.11"), 80, Protocol.TCP),
            ServiceRef("ns", "sticky"),
            "http",
            "ClusterIP",
            tuple(Backend(IP(b), 8080, Protocol.TCP) for b in BACKENDS),
            affinity_timeout=600,
        ),
    ]
    return {fe.key: fe for fe in out}


def populate(dp: BpfDatapath) -> None:
    """Services, and flows the real program tracks: masqueraded UDP, maglev and affinity TCP."""
    dp.configure(
        NodeConfig(
            snat_address=IP(NODE),
            nat_ports=(61000, 61100),
            cluster_cidrs=(ipaddress.IPv4Network("10.244.0.0/16"),),
        )
    )
    assert dp.reconcile(frontends()) == []
    for i in range(20):
        out = checked(run(dp, packets.ipv4_udp(OUTSIDE, NODE, 40000 + i, 30053, b"q")))
        assert out.src == NODE, "masqueraded: a NAT entry"
        checked(run(dp, packets.ipv4_tcp(POD, "10.96.0.10", 41000 + i, 80, "S")))
        checked(run(dp, packets.ipv4_tcp(POD, "10.96.0.11", 42000 + i, 80, "S")))


@pytest.fixture(scope="module")
def template() -> Iterator[tuple[Path, dict[str, list[int]]]]:
    """One datapath compiled with SMALL sizes and filled by `populate`, for the module;
    each test works on a copy (`clone`): compiling costs seconds, copying does not."""
    path = BPFFS / f"{PIN_PREFIX}upgrade-template"
    try:
        dp = BpfDatapath(settings(path))
        try:
            populate(dp)
            maglev = rows(dp)
        finally:
            dp.close()
        yield path, maglev
    finally:
        remove_pins(path)


def clone(template: Path, pin_dir: Path) -> None:
    """The template's maps as new maps pinned in `pin_dir`, with their layout record."""
    pin_dir.mkdir()
    ids = {}
    for name in MAP_TYPES:
        src = rawmap.RawMap.open(str(template / name))
        i = src.info
        fd = rawmap.create(i.kind, name, i.key_size, i.value_size, i.max_entries, i.flags)
        dst = rawmap.RawMap(fd, name)
        try:
            zero = i.kind in rawmap.ARRAYS
            for chunk in src.chunks():
                assert dst.write([(k, v) for k, v in chunk if not (zero and not any(v))]) == []
            libbpf.obj_pin(fd, str(pin_dir / name))
            ids[name] = dst.id
        finally:
            src.close()
            dst.close()
    rec = record.read(template / record.NAME)
    assert rec is not None
    rec.map_ids = ids
    record.write(pin_dir / record.NAME, rec)


def contents(pin_dir: Path) -> dict[str, dict[bytes, bytes]]:
    """Every pinned map's entries as bytes (an array's zero entries left out)."""
    out = {}
    for name in MAP_TYPES:
        raw = rawmap.RawMap.open(str(pin_dir / name))
        try:
            zero = raw.info.kind in rawmap.ARRAYS
            out[name] = {k: v for k, v in raw.entries() if not (zero and not any(v))}
        finally:
            raw.close()
    return out


def rows(dp: BpfDatapath) -> dict[str, list[int]]:
    """The Maglev rows, by frontend, as backend addresses (ids may differ)."""
    by_id = {be.ident: target for target, be in dp.table.backends.items()}
    return {
        str(key): [by_id[b][0].packed[-1] for b in fe.row]
        for key, fe in dp.table.frontends.items()
        if fe.table
    }


def sizes(pin_dir: Path) -> dict[str, int]:
    out = {}
    for name in MAP_TYPES:
        raw = rawmap.RawMap.open(str(pin_dir / name))
        out[name] = raw.info.max_entries
        raw.close()
    return out


# -- conversions, no kernel needed ---------------------------------------------------

OLD_H = """
struct thing { __u16 port; __be16 nport; __u32 gone; char name[8]; __u8 pad; __u64 n[2]; };
"""
NEW_H = """
struct thing { __u64 added; __u32 n[3]; char name[4]; __be32 nport; __u32 port; };
"""


def _layout(name: str, header: str) -> Layout:
    return Layout(
        name, header, 'BPF_TABLE_PINNED("hash", __u32, struct thing, t, 8, LBCTL_PIN(t));'
    )


def test_fields_convert_by_name_by_the_documented_rules() -> None:
    old, new = _layout("old", OLD_H).describe("struct thing"), _layout("new", NEW_H)
    conv = convert.plan(old, new.describe("struct thing"))
    assert conv.ok and not conv.identical
    src = old_value(port=0x1234, nport=0x5678, gone=9, name=b"abcdefg", n=[7, 8])
    out: Any = new.ffi.from_buffer("struct thing *", bytearray(conv(src) or b""))
    assert out.added == 0, "a new field starts at 0"
    assert out.port == 0x1234, "u16 -> u32 keeps the value"
    assert int.from_bytes(bytes(new.ffi.buffer(new.ffi.addressof(out, "nport"), 4)), "big") == (
        0x5678
    ), "be16 -> be32 keeps the value in network byte order"
    assert new.ffi.string(out.name) == b"abc", "a string is cut and stays NUL-terminated"
    assert list(out.n) == [7, 8, 0], "an array keeps its elements, converted"
    assert any("gone: dropped" in note for note in conv.notes)
    assert not any("field pad" in note for note in conv.notes), "padding is not worth a note"
    back = convert.plan(new.describe("struct thing"), old)
    assert back.ok
    wide: Any = new.ffi.new("struct thing *")
    wide.port = 70000  # does not fit the old u16
    assert back(bytes(new.ffi.buffer(wide))) is None, "an entry that does not fit is not carried"


def old_value(**fields: Any) -> bytes:
    old = _layout("old", OLD_H)
    obj: Any = old.ffi.new("struct thing *")
    for name, value in fields.items():
        if name == "nport":
            value = int.from_bytes(value.to_bytes(2, "big"), sys.byteorder)
        if name == "n":
            obj.n = value
            continue
        setattr(obj, name, value)
    return bytes(old.ffi.buffer(obj))


def test_a_type_change_without_a_rule_is_a_problem_and_a_rule_converts_it() -> None:
    old = _layout("a", "struct thing { __u32 x; };").describe("struct thing")
    new = _layout("b", "struct thing { char x[4]; };").describe("struct thing")
    conv = convert.plan(old, new)
    assert not conv.ok
    assert "struct thing field x changed from u32 to char[4]" in conv.problems[0]
    assert "RULES" in conv.problems[0]
    convert.RULES[("struct thing", "x")] = lambda raw: b"%d\0\0" % int.from_bytes(raw, "little")
    try:
        ruled = convert.plan(old, new)
        assert ruled.ok and ruled((42).to_bytes(4, "little")) == b"42\0\0"
    finally:
        del convert.RULES[("struct thing", "x")]


def test_every_map_of_this_version_converts_from_layout_1() -> None:
    """A layout change that no rule converts fails here, not on a node."""
    current = Layout.current()
    old = record.layout_1()
    for name, spec in specs(current, BpfSettings()).items():
        if name not in old.maps:
            continue  # a new map starts empty
        decl = old.maps[name]
        for before, after in ((decl.key, spec.key), (decl.value, spec.value)):
            conv = convert.plan(old.describe(before), after)
            assert conv.ok, f"map {name}: {conv.problems}"


def test_the_record_round_trips_and_layout_1_is_frozen(pin_dir: Path) -> None:
    pin_dir.mkdir()
    current = Layout.current()
    rec = record.Record("f", "v", current.header, current.declarations_text, {"ct_size": 3}, {})
    record.write(pin_dir / record.NAME, rec)
    back = record.read(pin_dir / record.NAME)
    assert back is not None and back.settings == {"ct_size": 3} and back.state == record.LIVE
    record.set_state(pin_dir / record.NAME, record.COMMITTING)
    assert (read := record.read(pin_dir / record.NAME)) and read.state == record.COMMITTING
    # the layout of the maps 6e1a90b pinned: an edit of
    # lbctl/datapath/ebpf/upgrade/layout1.py changes it
    assert record.layout_1().fingerprint == "02a79f95f4e1"
    assert record.layout_1().describe("struct ct4_entry").size == 48


# -- merging, with real maps ---------------------------------------------------------

COUNTER_H = "struct c { __u64 packets; __u64 last_seen_ns; };"


def _c(packets: int, seen: int) -> bytes:
    return packets.to_bytes(8, sys.byteorder) + seen.to_bytes(8, sys.byteorder)


def k(i: int) -> bytes:
    return i.to_bytes(4, sys.byteorder)


@pytest.mark.parametrize("name", ["lb_conns", "ct4"])
def test_delta_merges_what_both_sides_wrote_after_the_copy(name: str) -> None:
    """Counters add the old side's increments; other entries: the later last_seen wins."""
    lay = _layout("c", COUNTER_H.replace("struct c", "struct thing")).describe("struct thing")
    ident = convert.plan(lay, lay)
    src = rawmap.RawMap(rawmap.create("hash", "src", 4, 16, 64), "source")
    dst = rawmap.RawMap(rawmap.create("hash", "dst", 4, 16, 64), "target")
    try:
        src.write([(k(1), _c(10, 100)), (k(2), _c(5, 100)), (k(3), _c(1, 100))])
        spec = MapSpec(name, "hash", Layout.current().describe("__u32"), lay, 64, 0, "64")
        move = migrate.MapMove(spec, dst)
        source = migrate.Source(src, convert.plan(spec.key, spec.key), ident)
        assert move.copy(source, fresh=True, prefer_source=False).written == 3
        src.update(k(1), _c(13, 300))  # the old program, after the copy
        dst.update(k(1), _c(12, 200))  # the new program, after the swap
        dst.update(k(2), _c(6, 400))  # only the new program
        src.update(k(4), _c(2, 300))  # a new entry on the old side
        counts = move.delta(source)
        got = {int.from_bytes(key, sys.byteorder): v for key, v in dst.entries()}
        if name == "lb_conns":  # additive, every field: 12 + (13 - 10), 200 + (300 - 100)
            assert got[1] == _c(15, 400)
        else:  # newest: the old side saw it last
            assert got[1] == _c(13, 300)
        assert got[2] == _c(6, 400), "the new side's own change stays"
        assert got[3] == _c(1, 100) and got[4] == _c(2, 300)
        assert counts.written == 2
        assert move.delta(source).written == 0, "a second delta finds nothing new"
    finally:
        src.close()
        dst.close()


# -- the datapath: capacities --------------------------------------------------------


def test_a_capacity_change_migrates_every_entry(pin_dir: Path, template: Template) -> None:
    """Before: `map lb_slots is pinned ... a pinned map cannot be resized` and no datapath."""
    clone(template[0], pin_dir)
    maglev = template[1]
    before = contents(pin_dir)
    assert len(before["ct4"]) >= 60 and len(before["nat4"]) == 20 and before["lb4_affinity"]
    second = BpfDatapath(settings(pin_dir, **BIGGER))
    try:
        report = second.upgrade_report
        assert report is not None and report.action == "migrated", report
        moved = {m["name"]: m for m in report.maps}
        assert moved["ct4"]["why"] == "capacity 4096 -> 8192 (--conntrack-size)"
        assert moved["ct4"]["written"] == len(before["ct4"]) and not moved["ct4"]["notCarried"]
        assert "lb_stats" not in moved, "an unchanged map is kept, not copied"
        assert rows(second) == maglev, "the Maglev rows moved to the new --table-size"
        assert second.settings.ct_size == 8192
    finally:
        second.close()
    after = contents(pin_dir)
    for name in MAP_TYPES:
        if name != "lb_tables":  # its rows sit at other indexes now
            assert after[name] == before[name], f"map {name} changed in the upgrade"
    assert sizes(pin_dir)["ct4"] == 8192 and sizes(pin_dir)["lb_tables"] == 10 * 257
    assert not pinsets.staging_dirs(pin_dir)
    rec = record.read(pin_dir / record.NAME)
    assert rec is not None and rec.settings["nat_size"] == 3000 and rec.state == record.LIVE
    assert rec.history[-1]["action"] == "migrated"


def test_a_capacity_below_what_a_map_holds_is_kept_and_reported(
    pin_dir: Path, template: Template
) -> None:
    clone(template[0], pin_dir)
    before = contents(pin_dir)
    second = BpfDatapath(settings(pin_dir, ct_size=8, max_services=2, max_tables=1))
    try:
        report = second.upgrade_report
        assert report is not None
        problems = "\n".join(report.problems)
        assert f"map ct4 holds {len(before['ct4'])} entries but --conntrack-size 8" in problems
        assert "kept at 4096 (the pinned size)" in problems and "set --conntrack-size" in problems
        assert "map lb4_services holds 4 entries but --max-services 2" in problems
        assert "map lb_tables has row 2 in use but --max-tables 1" in problems
        assert len(report.problems) == 3, "one report per setting kept"
        kept = second.settings
        assert (kept.ct_size, kept.max_services, kept.max_tables) == (4096, 512, 8)
        assert second.reconcile(frontends()) == [], "the agent serves on"
    finally:
        second.close()
    assert contents(pin_dir)["ct4"] == before["ct4"]
    assert sizes(pin_dir)["ct4"] == 4096


# -- the datapath: a crash in the middle -----------------------------------------------

_CHILD = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.datapath.ebpf.settings import BpfSettings
BpfDatapath(BpfSettings(pin_dir=Path(sys.argv[1]), **eval(sys.argv[2])))
"""


def migrate_until(pin_dir: Path, step: str, log: Path, **sizes: int) -> None:
    """Start an upgrade in another process, stopped at `step`, and kill -9 it there."""
    env = {**os.environ, PAUSE_ENV: step}
    with log.open("w") as sink:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(pin_dir), repr({**SMALL, **sizes})],
            env=env,
            stdout=sink,
            stderr=sink,
        )
    try:
        deadline = time.monotonic() + 120
        while f"paused at step {step}" not in log.read_text():
            assert child.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)


@pytest.mark.parametrize("step", ["copying", "copied", "committing"])
def test_a_kill_9_during_an_upgrade_is_repaired_by_the_next_start(
    pin_dir: Path, tmp_path: Path, step: str, template: Template
) -> None:
    """(With real hooks and traffic, at copied and swapped: tests/test_upgrade.py.)"""
    clone(template[0], pin_dir)
    before = contents(pin_dir)
    migrate_until(pin_dir, step, tmp_path / "child.log", ct_size=5000, nat_size=2500)
    left = pinsets.staging_dirs(pin_dir)
    assert len(left) == 1, "the crash left the staging directory"
    if step == "copied":
        # Hooks may run either build now: both sides go on writing.
        live_ct = rawmap.RawMap.open(str(pin_dir / "ct4"))
        staged_ct = rawmap.RawMap.open(str(left[0] / "ct4"))
        key, value = next(iter(before["ct4"].items()))
        stamp = int.from_bytes(value[8:16], sys.byteorder)
        newer = value[:8] + (stamp + 5).to_bytes(8, sys.byteorder) + value[16:]
        older = value[:8] + (stamp + 1).to_bytes(8, sys.byteorder) + value[16:]
        assert live_ct.update(key, newer) == 0 and staged_ct.update(key, older) == 0
        extra = bytes(16)
        assert live_ct.update(extra, value) == 0
        live_ct.close()
        staged_ct.close()
        before["ct4"][key], before["ct4"][extra] = newer, value
    second = BpfDatapath(settings(pin_dir, ct_size=5000, nat_size=2500))
    try:
        report = second.upgrade_report
        assert report is not None
        notes = "\n".join(report.notes)
        if step == "copying":
            assert "discarded upgrade_" in notes and "never served" in notes
        elif step == "committing":
            assert "finished committing an upgrade a crash interrupted" in notes
        else:
            assert "interrupted after its copy" in notes and report.action == "migrated"
    finally:
        second.close()
    assert not pinsets.staging_dirs(pin_dir), "nothing half-done is left"
    assert contents(pin_dir) == before, "every entry as it was (the newer one of a conflict)"
    assert sizes(pin_dir)["ct4"] == 5000 and sizes(pin_dir)["nat4"] == 2500
    rec = record.read(pin_dir / record.NAME)
    assert rec is not None and rec.state == record.LIVE and rec.settings["ct_size"] == 5000


def test_an_agent_that_stops_before_loading_leaves_no_staging_directory(
    pin_dir: Path, template: Template
) -> None:
    clone(template[0], pin_dir)
    dp = BpfDatapath(settings(pin_dir, ct_size=5000), wait=False)  # compiling meanwhile
    assert len(pinsets.staging_dirs(pin_dir)) == 1
    dp.close()
    assert not pinsets.staging_dirs(pin_dir)
    assert sizes(pin_dir)["ct4"] == 4096, "the pinned maps are untouched"


def test_maps_of_a_layout_this_version_cannot_read_are_replaced_and_the_agent_runs(
    pin_dir: Path, template: Template
) -> None:
    """E.g. a record of a future lbctl whose header this cffi cannot parse."""
    clone(template[0], pin_dir)
    rec = record.read(pin_dir / record.NAME)
    assert rec is not None
    rec.header = "struct ct4_entry { this is not C };"
    rec.layout = "f00d"
    record.write(pin_dir / record.NAME, rec)
    dp = BpfDatapath(settings(pin_dir))
    try:
        report = dp.upgrade_report
        assert report is not None and report.action == "migrated"
        problems = "\n".join(report.problems)
        assert "lbctl_meta (lbctl 0.1.0)" in problems and "cannot be read" in problems
        assert "replaced by empty ones (established flows through them are lost)" in problems
        assert dp.reconcile(frontends()) == [], "the agent serves on"
    finally:
        dp.close()
    assert contents(pin_dir)["ct4"] == {}
    rec = record.read(pin_dir / record.NAME)
    assert rec is not None and rec.layout == Layout.current().fingerprint
