"""What each pinned map must be for given settings: kind, sizes, capacity, layout.

The map declarations of bpf/maps.h are the one list: their size
expressions (`LBCTL_MAX_SERVICES`, `LBCTL_TABLES * LBCTL_TABLE_SIZE`) are
evaluated with the -D values BpfSettings.cflags() hands bcc, so Python
knows every map's max_entries before bcc runs, and which setting (and
which `lbctl run` flag) sizes it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from lbctl.datapath.ebpf.settings import BpfSettings
from lbctl.datapath.ebpf.upgrade.structs import Layout, StructDesc, evaluate

_DEFINE = re.compile(r"^-D(\w+)=(.*)$")
_NAME = re.compile(r"\b[A-Z_][A-Z0-9_]*\b")

# `lbctl run` flags of the capacity settings (config.py), for messages
FLAGS = {
    "max_services": "--max-services",
    "max_backends": "--max-backends",
    "max_slots": "--max-slots",
    "ct_size": "--conntrack-size",
    "nat_size": "--nat-size",
    "max_source_ranges": "--max-source-ranges",
    "affinity_size": "--affinity-size",
    "table_size": "--table-size",
    "max_tables": "--max-tables",
}


def defines(settings: BpfSettings | Mapping[str, Any]) -> dict[str, int]:
    """The integer -D values bcc gets for these settings."""
    if not isinstance(settings, BpfSettings):
        settings = settings_from(settings)
    out = {}
    for flag in settings.cflags():
        match = _DEFINE.match(flag)
        if match:
            text = match.group(2).rstrip("ULul")
            if text.isdigit():
                out[match.group(1)] = int(text)
    return out


def settings_from(values: Mapping[str, Any], base: BpfSettings | None = None) -> BpfSettings:
    """BpfSettings from a record's settings (fields this version lacks are ignored)."""
    base = base or BpfSettings()
    known = {f.name for f in dataclasses.fields(BpfSettings)} - {"pin_dir"}
    wanted: dict[str, Any] = {k: v for k, v in values.items() if k in known}
    return dataclasses.replace(base, **wanted)


def settings_dict(settings: BpfSettings) -> dict[str, Any]:
    """The settings as a record stores them."""
    out = dataclasses.asdict(settings)
    del out["pin_dir"]
    return out


def define_fields() -> dict[str, str]:
    """-D name -> the BpfSettings field that sets it (the integer ones)."""
    base = BpfSettings()
    before = defines(base)
    out = {}
    for field in dataclasses.fields(BpfSettings):
        value = getattr(base, field.name)
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        bumped: dict[str, Any] = {field.name: value + 1}
        after = defines(dataclasses.replace(base, **bumped))
        for name in after:
            if after[name] != before.get(name):
                out[name] = field.name
    return out


_FIELDS = define_fields()


def size_fields(expr: str) -> list[str]:
    """The settings fields a size expression depends on."""
    return [_FIELDS[name] for name in _NAME.findall(expr) if name in _FIELDS]


@dataclasses.dataclass(frozen=True)
class MapSpec:
    name: str
    kind: str
    key: StructDesc
    value: StructDesc
    max_entries: int
    flags: int
    size_expr: str

    @property
    def key_size(self) -> int:
        return 0 if self.kind == "ringbuf" else self.key.size  # a ring buffer has none

    @property
    def value_size(self) -> int:
        return 0 if self.kind == "ringbuf" else self.value.size

    @property
    def fields(self) -> list[str]:
        return size_fields(self.size_expr)


def specs(layout: Layout, settings: BpfSettings | Mapping[str, Any]) -> dict[str, MapSpec]:
    """Every pinned map of a layout, sized for the settings."""
    names: dict[str, int] = defines(settings)
    out = {}
    for decl in layout.maps.values():
        consts = layout.consts(_NAME.findall(decl.size))
        entries = evaluate(decl.size, {**consts, **names})
        out[decl.name] = MapSpec(
            decl.name,
            decl.kind,
            layout.describe(decl.key),
            layout.describe(decl.value),
            entries,
            decl.flags,
            decl.size,
        )
    return out


def infer_settings(
    layout: Layout, max_entries: Mapping[str, int], table_size: int | None = None
) -> dict[str, int]:
    """Capacity settings of maps pinned without a record, from their sizes.

    A map sized by one setting tells it directly; lb_tables holds
    max_tables x table_size entries, split by `split_tables` (`table_size`:
    the size asked for now, the likeliest)."""
    out: dict[str, int] = {}
    for decl in layout.maps.values():
        if decl.name not in max_entries:
            continue
        names = _NAME.findall(decl.size)
        fields = size_fields(decl.size)
        if len(names) == 1 and len(fields) == 1 and decl.size.strip() == names[0]:
            out.setdefault(fields[0], max_entries[decl.name])
    if "lb_tables" in max_entries:
        tables = split_tables(max_entries["lb_tables"], table_size)
        out["max_tables"], out["table_size"] = tables
    return out


def split_tables(entries: int, wanted_size: int | None = None) -> tuple[int, int]:
    """(max_tables, table_size) of an lb_tables with this many entries.

    table_size is a prime (config.py checks it) and max_tables at most 65535:
    the size asked for now when it divides, else the default's when it does,
    else the largest prime factor that leaves at most 65535 rows."""
    for size in (wanted_size, BpfSettings().table_size):
        if size and entries % size == 0 and entries // size <= 0xFFFF:
            return entries // size, size
    best, n, p = 1, entries, 2
    factors = []
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    for prime in sorted(set(factors), reverse=True):
        if entries // prime <= 0xFFFF:
            best = prime
            break
    return entries // best, best
