"""Planning an upgrade of pinned maps: what each map becomes, and with which sizes.

Pure decisions over the pinned sets (lbctl/datapath/ebpf/upgrade/pinsets.py) and this
build's map specs (lbctl/datapath/ebpf/upgrade/mapspec.py); lbctl/datapath/ebpf/upgrade/run.py
carries them out.  Per map name:

- keep: one pinned map, the same kind, capacity and layout: bcc opens it;
- create: nothing pinned under that name: bcc makes it;
- copy: the pinned map differs: a new one, every source copied into it;
- merge: an interrupted upgrade's map is right already: the others are
  merged into it.

A capacity below the entries a map holds is not applied (`fit`): the
setting keeps the value the map was pinned with, and a problem says so.
"""

from __future__ import annotations

import dataclasses
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

from lbctl.datapath.ebpf import layout
from lbctl.datapath.ebpf.settings import BpfSettings
from lbctl.datapath.ebpf.upgrade import mapspec, migrate, record
from lbctl.datapath.ebpf.upgrade.mapspec import MapSpec
from lbctl.datapath.ebpf.upgrade.pinsets import PinnedSet
from lbctl.datapath.ebpf.upgrade.rawmap import ARRAYS, RawMap
from lbctl.datapath.ebpf.upgrade.structs import Layout, LayoutError

Sources = Sequence[PinnedSet]


@dataclasses.dataclass
class MapPlan:
    name: str
    action: str  # keep, create, copy (into a new map), merge (into a staging map)
    why: str
    target: RawMap | None = None  # merge: the staging map that stays
    sources: list[tuple[PinnedSet, RawMap]] = dataclasses.field(default_factory=list)
    counts: migrate.Counts = dataclasses.field(default_factory=migrate.Counts)


@dataclasses.dataclass
class Report:
    """What an agent's start did with the pinned maps, for the log and `lbctl status`."""

    found: str = "nothing pinned"
    layout: str = ""  # this build's layout fingerprint
    action: str = "created"  # created, adopted, migrated
    maps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    hooks: str = ""
    time: float = dataclasses.field(default_factory=time.time)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        ours = record.layout_name(self.layout)
        head = f"pinned maps: {self.action}; found {self.found}; this build: {ours}"
        out = [head]
        for m in self.maps:
            out.append(
                f"map {m['name']}: {m['action']} ({m['why']}): {m['written']} entries written"
                + (f", {m['notCarried']} not carried over" if m["notCarried"] else "")
            )
        if self.hooks:
            out.append(f"{self.hooks}; done in {self.seconds:.2f} s")
        return out + self.notes

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def differences(spec: MapSpec, pinned: PinnedSet, raw: RawMap) -> list[str]:
    """How a pinned map differs from what this build needs; [] when it is the same."""
    out = []
    info = raw.info
    if info.kind != spec.kind:
        out.append(f"kind {info.kind} -> {spec.kind}")
    if info.max_entries != spec.max_entries:
        flags = ", ".join(mapspec.FLAGS.get(f, f) for f in spec.fields) or "this build"
        out.append(f"capacity {info.max_entries} -> {spec.max_entries} ({flags})")
    if info.flags != spec.flags:
        out.append(f"map flags {info.flags:#x} -> {spec.flags:#x}")
    decl = pinned.layout.maps.get(spec.name)
    if decl is None:
        out.append(f"{pinned.layout.name} does not declare it")
        return out
    for what, ctype, new in (("key", decl.key, spec.key), ("value", decl.value, spec.value)):
        try:
            old = pinned.layout.describe(ctype)
        except LayoutError as err:
            out.append(f"{what} layout {ctype} unreadable ({err})")
            continue
        if old.shape() != new.shape():
            out.append(f"{what} layout {ctype} changed")
    return out


def objects(sources: Sources, name: str) -> list[tuple[PinnedSet, RawMap]]:
    """The distinct pinned maps of this name, oldest set first."""
    seen: set[int] = set()
    out = []
    for pinned in sources:
        raw = pinned.maps.get(name)
        if raw is not None and raw.id not in seen:
            seen.add(raw.id)
            out.append((pinned, raw))
    return out


def fit(
    layout_: Layout, sources: Sources, requested: BpfSettings, problems: list[str]
) -> BpfSettings:
    """The settings, with a capacity too small for what a map holds kept as pinned."""
    settings = requested
    for _ in range(len(mapspec.FLAGS)):
        changed = False
        kept_fields: set[str] = set()
        for name, spec in mapspec.specs(layout_, settings).items():
            found = objects(sources, name)
            if not found or len(spec.fields) != 1 or spec.fields[0] in kept_fields:
                continue
            pinned, newest = found[-1]
            field = spec.fields[0]
            if newest.info.kind in ARRAYS or spec.max_entries >= newest.info.max_entries:
                continue
            held = max(raw.count() for _, raw in found)
            before = pinned.settings.get(field)
            if held <= spec.max_entries or not isinstance(before, int):
                continue
            flag = mapspec.FLAGS.get(field, field)
            problems.append(
                f"map {name} holds {held} entries but {flag} {getattr(requested, field)} "
                f"makes room for {spec.max_entries}: kept at {before} (the pinned size) so "
                f"no entry is dropped; fix: set {flag} to at least {held} (with room to "
                f"grow), or lower it again once fewer entries are held"
            )
            kept: dict[str, Any] = {field: before}
            settings = dataclasses.replace(settings, **kept)
            kept_fields.add(field)
            changed = True
        fitted = _fit_tables(sources, requested, settings, problems)
        changed |= fitted != settings
        settings = fitted
        if not changed:
            break
    return settings


def _fit_tables(
    sources: Sources, requested: BpfSettings, settings: BpfSettings, problems: list[str]
) -> BpfSettings:
    """Rows of lb_tables in use must stay: a smaller --max-tables is kept as pinned."""
    services = objects(sources, "lb4_services")
    if not services:
        return settings
    pinned, raw = services[-1]
    decl = pinned.layout.maps.get("lb4_services")
    try:
        leaf = pinned.layout.describe(decl.value).leaf("table") if decl else None
    except LayoutError:
        return settings  # reported when its maps are planned
    before = pinned.settings.get("max_tables")
    if leaf is None or not isinstance(before, int) or settings.max_tables >= before:
        return settings
    at, end = leaf.offset, leaf.offset + leaf.size
    rows = max((int.from_bytes(v[at:end], sys.byteorder) for _, v in raw.entries()), default=0)
    if rows <= settings.max_tables:
        return settings
    note = (
        f"map lb_tables has row {rows} in use but --max-tables {requested.max_tables} "
        f"leaves {settings.max_tables} rows: kept at {before} (the pinned number) so no "
        f"Service's table is lost; fix: set --max-tables to at least {rows}"
    )
    if note not in problems:
        problems.append(note)
    return dataclasses.replace(settings, max_tables=before)


def plan(specs: dict[str, MapSpec], sources: Sources) -> dict[str, MapPlan]:
    """What each map of this build becomes."""
    plans = {}
    for name, spec in specs.items():
        found = objects(sources, name)
        if not found:
            plans[name] = MapPlan(name, "create", "new in this build")
            continue
        newest_set, newest = found[-1]
        newest_diff = differences(spec, newest_set, newest)
        if len(found) == 1 and not newest_diff:
            plans[name] = MapPlan(name, "keep", "unchanged", sources=found)
        elif not newest_diff:
            merged = MapPlan(name, "merge", "left by an interrupted upgrade", newest)
            merged.sources = found[:-1]
            plans[name] = merged
        else:
            plans[name] = MapPlan(name, "copy", "; ".join(newest_diff), sources=found)
    return plans


def table_index(pinned: PinnedSet, settings: BpfSettings) -> migrate.Fix:
    """lb_tables entry (row, i) moves to its place in rows of the new --table-size."""
    old_size = int(pinned.settings.get("table_size", settings.table_size))
    new_size, rows = settings.table_size, settings.max_tables

    def fix(key: bytes) -> bytes | None:
        row, i = divmod(struct.unpack("=I", key)[0], old_size)
        if i >= new_size or row >= rows:
            return None  # cut: the first sync rebuilds the row for the new size
        return struct.pack("=I", row * new_size + i)

    return fix


def clamp_table_len(pinned: PinnedSet, settings: BpfSettings) -> migrate.Fix | None:
    """A row cut to a smaller --table-size: its service reads only what is left."""
    new_size = settings.table_size
    if int(pinned.settings.get("table_size", new_size)) <= new_size:
        return None

    def fix(value: bytes) -> bytes:
        out = bytearray(value)
        svc: Any = layout.ffi.from_buffer("struct lb_service *", out)
        svc.table_len = min(svc.table_len, new_size)
        return bytes(out)

    return fix
