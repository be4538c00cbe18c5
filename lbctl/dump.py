"""`lbctl maps dump`: the pinned maps read back and decoded through lbctl.h."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lbctl.datapath import ctgc, layout, nodeconf
from lbctl.datapath.entries import SCHED_NAMES, describe_flags, flags_backend
from lbctl.datapath.maps import Maps
from lbctl.model import Protocol
from lbctl.plan import SCOPE_NAMES

STAT_NAMES = {
    "LB_STAT_PASS": "passed",
    "LB_STAT_DNAT_NEW": "new_flows",
    "LB_STAT_DNAT_EST": "established",
    "LB_STAT_RNAT": "reverse_nat",
    "LB_STAT_DROP_NO_BACKEND": "drop_no_backend",
    "LB_STAT_PASS_FRAGMENT": "passed_fragments",
    "LB_STAT_REDIRECT": "redirected",
    "LB_STAT_CT_FULL": "conntrack_full",
    "LB_STAT_REJECT": "rejected_no_backend",
    "LB_STAT_DROP_SOURCE_RANGE": "drop_source_range",
    "LB_STAT_DROP_NO_LOCAL": "drop_no_local_endpoint",
    "LB_STAT_SNAT_NEW": "snat_new",
    "LB_STAT_NAT_EXHAUSTED": "nat_exhausted",
    "LB_STAT_SNAT_REVERSE": "snat_reverse",
    "LB_STAT_SOCK_TRANSLATE": "socket_translated",
    "LB_STAT_SOCK_REJECT": "socket_rejected",
    "LB_STAT_XDP_REDIRECT": "xdp_redirected",
    "LB_STAT_XDP_PASS": "xdp_passed",
    "LB_STAT_XDP_TO_TC": "xdp_to_tc",
    "LB_STAT_AFFINITY": "affinity_followed",
    "LB_STAT_ICMP_ERROR": "icmp_errors_translated",
}


def backend_state(flags: int) -> str:
    b = flags_backend(("", 0, Protocol.TCP), flags)
    if b.terminating:
        return "terminating" if b.serving else "terminating,not-serving"
    return "ready" if b.ready else ("serving" if b.serving else "not-ready")


def read_counters(maps: Maps) -> dict[str, int]:
    """The per-CPU verdict counters of lb_stats, summed: LB_STAT_MAX lookups."""
    out = {}
    for const_name, label in STAT_NAMES.items():
        per_cpu = maps.lb_stats.lookup(layout.ffi.new("__u32 *", layout.const(const_name)))
        out[label] = sum(per_cpu) if per_cpu is not None else 0
    return out


def open_flows(maps: Maps) -> dict[int, int]:
    """Flows of least-connection frontends open per backend id: what lc compares."""
    expired = {int(k[0]): int(v[0]) for k, v in maps.lb_conns_expired.items()}
    return {
        int(k[0]): max(0, int(v.opened) - int(v.closed) - expired.get(int(k[0]), 0))
        for k, v in maps.lb_conns.items()
    }


def read(pin_dir: Path) -> dict[str, Any]:
    """Everything the datapath's maps hold, as plain data."""
    maps = Maps.open_pinned(pin_dir)
    try:
        backends = {int(k[0]): v for k, v in maps.lb4_backends.items()}
        metas = {int(k[0]): v for k, v in maps.lb_frontend_meta.items()}
        slots = {(k.frontend_id, k.slot): v.backend_id for k, v in maps.lb_slots.items()}
        conns = open_flows(maps)
        ranges: dict[tuple[int, int, int], list[str]] = {}
        for k, _ in maps.lb4_source_ranges.items():
            network = f"{layout.ip4_str(k.saddr)}/{k.prefixlen - 64}"
            ranges.setdefault((k.vip, k.port, k.proto), []).append(network)
        frontends = []
        for key, svc in maps.lb4_services.items():
            meta = metas.get(svc.frontend_id)
            rows = []
            for n in range(1, svc.count + 1):
                ident = slots.get((svc.frontend_id, n))
                be = backends.get(ident) if ident is not None else None
                if be is None:
                    rows.append({"slot": n, "backend_id": ident, "missing": True})
                    continue
                rows.append(
                    {
                        "slot": n,
                        "backend_id": ident,
                        "address": layout.ip4_str(be.addr),
                        "port": layout.port_num(be.port),
                        "state": backend_state(be.flags),
                    }
                )
                if ident in conns:
                    rows[-1]["open_flows"] = conns[ident]
            frontends.append(
                {
                    "service": f"{layout.c_string(meta.namespace)}/{layout.c_string(meta.name)}"
                    if meta
                    else "?",
                    "port_name": layout.c_string(meta.port_name) if meta else "",
                    "address": layout.ip4_str(key.addr),
                    "port": layout.port_num(key.port),
                    "protocol": Protocol(key.proto).name,
                    "scope": SCOPE_NAMES.get(key.scope, str(key.scope)),
                    "kind": layout.c_string(meta.kind) if meta else "",
                    "flags": describe_flags(svc.flags),
                    "source_ranges": ranges.get((key.addr, key.port, key.proto), []),
                    "frontend_id": svc.frontend_id,
                    "scheduler": SCHED_NAMES.get(svc.sched, str(svc.sched)),
                    "affinity_timeout_s": svc.affinity_s,
                    "table": {"row": svc.table, "entries": svc.table_len} if svc.table else None,
                    "backends": rows,
                }
            )
        frontends.sort(
            key=lambda f: (f["service"], f["port_name"], f["kind"], f["address"], f["port"])
        )
        stats = read_counters(maps)
        fill = {
            name: {"entries": len(m), "capacity": m.max_entries}
            for name, m in maps.all().items()
            if name not in ("lb_stats", "lb_tables")
        }
        # lb_tables is an array (walking its keys would take a million
        # lookups): its fill is the entries the frontends' rows use
        used = {svc.table: svc.table_len for _, svc in maps.lb4_services.items() if svc.table}
        fill["lb_tables"] = {"entries": sum(used.values()), "capacity": maps.lb_tables.max_entries}
        return {
            "frontends": frontends,
            "node": nodeconf.read(maps),
            "flows": ctgc.flows(maps),
            "maps": fill,
            "counters": stats,
        }
    finally:
        maps.close()


@dataclasses.dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]] = dataclasses.field(default_factory=list)

    def render(self) -> str:
        widths = [len(h) for h in self.headers]
        for row in self.rows:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
        lines = [self.headers, *self.rows]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in lines
        )


def render_table(data: dict[str, Any]) -> str:
    services = _Table(
        [
            "SERVICE",
            "PORT",
            "KIND",
            "FRONTEND",
            "PROTO",
            "SCHED",
            "FLAGS",
            "SLOT",
            "BACKEND",
            "STATE",
            "OPEN",
        ]
    )
    for fe in data["frontends"]:
        first = [fe["service"], fe["port_name"] or "-", fe["kind"] or "-"]
        first += [f"{fe['address']}:{fe['port']}", fe["protocol"], fe["scheduler"]]
        flags = [f"scope={fe['scope']}"] if fe["scope"] else []
        flags += fe["flags"] + [f"from={','.join(fe['source_ranges'])}"] * bool(fe["source_ranges"])
        if fe["affinity_timeout_s"]:
            flags.append(f"affinity={fe['affinity_timeout_s']}s")
        first.append(" ".join(flags) or "-")
        if not fe["backends"]:
            services.rows.append([*first, "-", "(no backends)", "", ""])
        for i, be in enumerate(fe["backends"]):
            lead = first if i == 0 else [""] * len(first)
            target = "(missing)" if be.get("missing") else f"{be['address']}:{be['port']}"
            opened = str(be["open_flows"]) if "open_flows" in be else "-"
            services.rows.append([*lead, str(be["slot"]), target, be.get("state", ""), opened])
    maps = _Table(["MAP", "ENTRIES", "CAPACITY"])
    for name, fill in data["maps"].items():
        maps.rows.append([name, str(fill["entries"]), str(fill["capacity"])])
    flows = _Table(["CLIENT", "FRONTEND", "BACKEND", "PROTO", "MASQUERADE", "STATE", "AGE", "IDLE"])
    for f in data["flows"][:50]:
        where = [f["client"], f["frontend"], f["backend"], f["protocol"]]
        flows.rows.append(
            [*where, f["masquerade"] or "-", f["state"], f"{f['age_s']}s", f"{f['idle_s']}s"]
        )
    counters = _Table(["COUNTER", "PACKETS"])
    for name, value in data["counters"].items():
        counters.rows.append([name, str(value)])
    node = data["node"]
    summary = (
        f"node: masquerade address {node.get('snat_address') or 'none'}, NAT ports "
        f"{'-'.join(map(str, node.get('nat_ports', []))) or '-'}, cluster CIDRs "
        f"{','.join(node['cluster_cidrs']) or 'none'}"
    )
    parts = [services.render(), summary, maps.render(), flows.render(), counters.render()]
    return "\n\n".join(parts) + "\n"
