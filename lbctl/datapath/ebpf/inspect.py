"""`lbctl maps dump`: the pinned maps read back and decoded through lbctl.h."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from lbctl.datapath.ebpf import conntrack_gc, layout, nodeconf
from lbctl.datapath.ebpf.entries import SCHED_NAMES, describe_flags, flags_backend
from lbctl.datapath.ebpf.maps import Maps
from lbctl.datapath.ebpf.settings import SECOND_NS
from lbctl.model import Protocol
from lbctl.plan.planner import SCOPE_NAMES

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
    "LB_STAT_REPLY_RETIRED": "reply_retired",
    "LB_STAT_EGRESS_RNAT": "egress_reverse_nat",
}

_BACKEND_F_HOST = layout.const("LB_BACKEND_F_HOST")
_BACKEND_F_MASQ_PODS = layout.const("LB_BACKEND_F_MASQ_PODS")


def backend_state(flags: int) -> str:
    b = flags_backend(("", 0, Protocol.TCP), flags)
    if b.terminating:
        return "terminating" if b.serving else "terminating,not-serving"
    return "ready" if b.ready else ("serving" if b.serving else "not-ready")


def backend_placement(flags: int, pod_network_known: bool) -> str | None:
    """Where a backend is, as its flags say: "this-node" (delivered to the node's
    own stack, replies translated by the egress hook), "outside-pod-network"
    (pods' flows to it are masqueraded), "pod-network", or None when the pod
    network is unknown (no cluster CIDRs)."""
    if flags & _BACKEND_F_HOST:
        return "this-node"
    if flags & _BACKEND_F_MASQ_PODS:
        return "outside-pod-network"
    return "pod-network" if pod_network_known else None


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


SECTIONS = ("services", "node", "conntrack", "nat", "affinity", "maps", "counters")
# `lbctl maps dump MAP` takes a section or the name of a map it decodes
MAP_SECTIONS = {
    "lb4_services": "services",
    "lb_slots": "services",
    "lb4_backends": "services",
    "lb_frontend_meta": "services",
    "lb4_source_ranges": "services",
    "lb4_config": "node",
    "lb4_cluster_cidrs": "node",
    "ct4": "conntrack",
    "nat4": "nat",
    "lb4_affinity": "affinity",
    "lb_stats": "counters",
}


def read(
    pin_dir: Path, sections: Iterable[str] = SECTIONS, service: str | None = None
) -> dict[str, Any]:
    """What the datapath's maps hold, as plain data: the chosen sections, and
    for `service` ("namespace/name") only its frontends and their flows."""
    wanted = set(sections)
    maps = Maps.open_pinned(pin_dir)
    try:
        frontends = _frontends(maps, service)
        if service is not None and not frontends:
            raise LookupError(
                f"service {service} has no frontend in the maps under {pin_dir}: check its "
                "namespace and name (kubectl get service -n NAMESPACE NAME) and that it has "
                "a ClusterIP (headless services are not balanced)"
            )
        ids = {fe["frontend_id"] for fe in frontends}
        out: dict[str, Any] = {}
        if "services" in wanted:
            out["frontends"] = frontends
        if "node" in wanted:
            out["node"] = nodeconf.read(maps)
        if "conntrack" in wanted:
            names = {int(k[0]): _service_name(m) for k, m in maps.lb_frontend_meta.items()}
            out["flows"] = conntrack_gc.flows(
                maps, frontend_ids=ids if service is not None else None
            )
            for f in out["flows"]:
                f["service"] = names.get(f["frontend_id"], "?")
        if "nat" in wanted:
            targets = {(fe["address"], fe["port"]) for fe in frontends}
            out["nat"] = _nat(maps, targets if service is not None else None)
        if "affinity" in wanted:
            out["affinity"] = _affinity(maps, frontends)
        if "maps" in wanted:
            out["maps"] = _fill(maps)
        if "counters" in wanted:
            out["counters"] = read_counters(maps)
        return out
    finally:
        maps.close()


def _frontends(maps: Maps, service: str | None) -> list[dict[str, Any]]:
    backends = {int(k[0]): v for k, v in maps.lb4_backends.items()}
    metas = {int(k[0]): v for k, v in maps.lb_frontend_meta.items()}
    slots = {(k.frontend_id, k.slot): v.backend_id for k, v in maps.lb_slots.items()}
    conns = open_flows(maps)
    known = len(maps.lb4_cluster_cidrs) > 0
    ranges: dict[tuple[int, int, int], list[str]] = {}
    for k, _ in maps.lb4_source_ranges.items():
        network = f"{layout.ip4_str(k.saddr)}/{k.prefixlen - 64}"
        ranges.setdefault((k.vip, k.port, k.proto), []).append(network)
    frontends = []
    for key, svc in maps.lb4_services.items():
        meta = metas.get(svc.frontend_id)
        name = _service_name(meta) if meta else "?"
        if service is not None and name != service:
            continue
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
                    "placement": backend_placement(be.flags, known),
                }
            )
            if ident in conns:
                rows[-1]["open_flows"] = conns[ident]
        frontends.append(
            {
                "service": name,
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
    frontends.sort(key=lambda f: (f["service"], f["port_name"], f["kind"], f["address"], f["port"]))
    return frontends


def _service_name(meta: Any) -> str:
    return f"{layout.c_string(meta.namespace)}/{layout.c_string(meta.name)}"


def _nat(
    maps: Maps, frontends: Collection[tuple[str, int]] | None, limit: int = 1000
) -> list[dict[str, Any]]:
    """NAT bindings, newest first: the node's address and port a masqueraded
    flow leaves with, towards which backend, for which client and frontend
    (only those of `frontends`, (address, port) pairs, when given)."""
    now = conntrack_gc.now_ns()
    rows = []
    for key, e in maps.nat4.items():
        vip = (layout.ip4_str(e.vip), layout.port_num(e.vport))
        if frontends is not None and vip not in frontends:
            continue
        rows.append(
            {
                "masquerade": f"{layout.ip4_str(key.daddr)}:{layout.port_num(key.dport)}",
                "backend": f"{layout.ip4_str(key.saddr)}:{layout.port_num(key.sport)}",
                "protocol": Protocol(key.proto).name,
                "client": f"{layout.ip4_str(e.client_addr)}:{layout.port_num(e.client_port)}",
                "frontend": f"{vip[0]}:{vip[1]}",
                "age_s": round((now - e.created_ns) / SECOND_NS, 1),
            }
        )
    rows.sort(key=lambda r: float(r["age_s"]))
    return rows[:limit]


def _affinity(maps: Maps, frontends: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ClientIP affinity entries of the given frontends: client -> backend,
    with the seconds left before a new flow of the client is balanced anew."""
    now = conntrack_gc.now_ns()
    by_id = {fe["frontend_id"]: fe for fe in frontends}
    backends = {int(k[0]): v for k, v in maps.lb4_backends.items()}
    rows = []
    for key, a in maps.lb4_affinity.items():
        fe = by_id.get(key.frontend_id)
        if fe is None:
            continue
        be = backends.get(a.backend_id)
        idle = (now - a.last_seen_ns) / SECOND_NS
        rows.append(
            {
                "service": fe["service"],
                "frontend": f"{fe['address']}:{fe['port']}",
                "protocol": fe["protocol"],
                "client": layout.ip4_str(key.client),
                "backend": f"{layout.ip4_str(be.addr)}:{layout.port_num(be.port)}"
                if be is not None
                else f"(gone: id {a.backend_id})",
                "idle_s": round(idle, 1),
                "expires_in_s": max(0.0, round(fe["affinity_timeout_s"] - idle, 1)),
            }
        )
    rows.sort(key=lambda r: (r["service"], r["frontend"], r["client"]))
    return rows


def _fill(maps: Maps) -> dict[str, dict[str, int]]:
    fill = {
        name: {"entries": len(m), "capacity": m.max_entries}
        for name, m in maps.all().items()
        if name not in ("lb_stats", "lb_tables", "lb_events")  # lb_events: a ring buffer
    }
    # lb_tables is an array (walking its keys would take a million
    # lookups): its fill is the entries the frontends' rows use
    used = {svc.table: svc.table_len for _, svc in maps.lb4_services.items() if svc.table}
    fill["lb_tables"] = {"entries": sum(used.values()), "capacity": maps.lb_tables.max_entries}
    return fill
