"""The service maps of a pinned datapath, read back as plain, id-free data,
and checked for entries an interrupted write could leave.

Two agents that synced the same manifests hold the same frontends with the
same backends, but not under the same frontend and backend ids (ids are
handed out in order and never reused while a restart adopts them).  So
`snapshot` names everything by what it is: a frontend by (address, port,
protocol, scope), a backend by (address, port, protocol), and compares
headers, slots, members, table rows, metadata, per-frontend counters,
source ranges and the node's settings.  `problems` lists what a reader of
the maps would trip over: a slot or member naming a missing backend, slots
beyond a header's count or missing below it, entries of ids no header
names, unused backends.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from lbctl.datapath.ebpf import layout, nodeconf
from lbctl.datapath.ebpf.maps import Maps
from lbctl.datapath.ebpf.settings import BpfSettings

Target = tuple[str, int, int]


def _target(be: Any) -> Target:
    return (layout.ip4_str(be.addr), layout.port_num(be.port), int(be.proto))


def read(
    pin_dir: Path, table_size: int = BpfSettings().table_size
) -> tuple[dict[str, Any], list[str]]:
    """(snapshot, problems) of the maps pinned under pin_dir (an agent run
    with the default --table-size)."""
    maps = Maps.open_pinned(pin_dir)
    try:
        return _read(maps, table_size)
    finally:
        maps.close()


def _read(m: Maps, table_size: int) -> tuple[dict[str, Any], list[str]]:
    problems: list[str] = []
    backends = {int(k[0]): v for k, v in m.lb4_backends.items()}
    flags = {_target(v): int(v.flags) for v in backends.values()}
    metas = {int(k[0]): v for k, v in m.lb_frontend_meta.items()}
    slots: dict[int, dict[int, int]] = {}
    for k, v in m.lb_slots.items():
        slots.setdefault(int(k.frontend_id), {})[int(k.slot)] = int(v.backend_id)
    members: dict[int, set[int]] = {}
    for k, _ in m.lb_members.items():
        members.setdefault(int(k.frontend_id), set()).add(int(k.backend_id))
    stats_ids = {int(k[0]) for k, _ in m.lb_fe_stats.items()}
    rr_ids = {int(k[0]) for k, _ in m.lb_rr.items()}
    ranges: dict[tuple[str, int, int], list[str]] = {}
    for k, _ in m.lb4_source_ranges.items():
        vip = (layout.ip4_str(k.vip), layout.port_num(k.port), int(k.proto))
        ranges.setdefault(vip, []).append(f"{layout.ip4_str(k.saddr)}/{k.prefixlen - 64}")

    frontends: dict[str, Any] = {}
    ids: set[int] = set()
    used: set[int] = set()
    for k, svc in m.lb4_services.items():
        name = f"{layout.ip4_str(k.addr)}:{layout.port_num(k.port)}/{k.proto}/{k.scope}"
        ident = int(svc.frontend_id)
        if ident in ids:
            problems.append(f"{name}: frontend id {ident} used twice")
        ids.add(ident)
        own = slots.get(ident, {})
        live = [own.get(n) for n in range(1, svc.count + 1)]
        if None in live:
            problems.append(f"{name}: slot {live.index(None) + 1} of {svc.count} missing")
        extra = sorted(n for n in own if n > svc.count or n < 1)
        if extra:
            problems.append(f"{name}: slots {extra} beyond its count {svc.count}")
        named = [b for b in live if b is not None]
        missing = sorted({b for b in named if b not in backends})
        if missing:
            problems.append(f"{name}: slots name missing backends {missing}")
        if members.get(ident, set()) != set(named):
            problems.append(
                f"{name}: members {sorted(members.get(ident, set()))} != slots {sorted(named)}"
            )
        used |= set(named)
        row: list[Target | None] = []
        if svc.table:
            key = layout.ffi.new("__u32 *")
            for i in range(min(svc.table_len, table_size)):
                key[0] = (svc.table - 1) * table_size + i
                value = m.lb_tables.lookup(key)
                b = int(value[0]) if value is not None else 0
                row.append(_target(backends[b]) if b in backends else None)
            if None in row:
                problems.append(f"{name}: its table row names a missing backend")
        meta = metas.get(ident)
        if meta is None:
            problems.append(f"{name}: no lb_frontend_meta entry")
        frontends[name] = {
            "flags": int(svc.flags),
            "sched": int(svc.sched),
            "affinity_s": int(svc.affinity_s),
            "backends": sorted(
                (_target(backends[b]), int(backends[b].flags)) for b in named if b in backends
            ),
            "row": Counter(row),
            "meta": [
                layout.c_string(getattr(meta, f))
                for f in ("namespace", "name", "port_name", "kind")
            ]
            if meta is not None
            else None,
            "counters": ident in stats_ids,
            "source_ranges": sorted(ranges.get(_vip(k), [])),
        }
    for what, found in (
        ("lb_slots", set(slots)),
        ("lb_members", set(members)),
        ("lb_frontend_meta", set(metas)),
        ("lb_fe_stats", stats_ids),
        ("lb_rr", rr_ids),
    ):
        orphans = sorted(found - ids)
        if orphans:
            problems.append(f"{what}: entries of frontend ids no header names: {orphans[:10]}")
    unused = sorted(set(backends) - used)
    if unused:
        problems.append(f"lb4_backends: {len(unused)} backends no slot names: {unused[:10]}")
    snapshot = {
        "frontends": frontends,
        "backends": sorted(flags.items()),
        # the netns cookie is the namespace's own: two nodes never share it
        "node": {k: v for k, v in nodeconf.read(m).items() if k != "netns_cookie"},
    }
    return snapshot, problems


def _vip(k: Any) -> tuple[str, int, int]:
    return (layout.ip4_str(k.addr), layout.port_num(k.port), int(k.proto))


def differences(a: dict[str, Any], b: dict[str, Any], limit: int = 10) -> list[str]:
    """What differs between two snapshots, frontend by frontend."""
    out = []
    fa, fb = a["frontends"], b["frontends"]
    for name in sorted(set(fa) | set(fb)):
        if name not in fa or name not in fb:
            out.append(f"{name}: only in {'the first' if name in fa else 'the second'}")
        elif fa[name] != fb[name]:
            fields = [f for f in fa[name] if fa[name][f] != fb[name][f]]
            out.append(
                f"{name}: {', '.join(f'{f} {fa[name][f]} != {fb[name][f]}' for f in fields)}"
            )
    for key in ("backends", "node"):
        if a[key] != b[key]:
            out.append(f"{key}: {a[key]} != {b[key]}")
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])
