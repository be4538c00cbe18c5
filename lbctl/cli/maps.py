"""`lbctl maps dump`: the datapath's maps read back (lbctl/datapath/ebpf/inspect.py, or the
IPVS datapath's state), as JSON, YAML or one table per section."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from lbctl.cli import output
from lbctl.cli.output import columns


@dataclasses.dataclass
class Table:
    headers: list[str]
    rows: list[list[str]] = dataclasses.field(default_factory=list)

    def render(self) -> str:
        return columns([self.headers, *self.rows])


def _services(frontends: list[dict[str, Any]]) -> str:
    headers = "SERVICE PORT KIND FRONTEND PROTO SCHED FLAGS SLOT BACKEND STATE WHERE OPEN"
    table = Table(headers.split())
    for fe in frontends:
        first = [fe["service"], fe["port_name"] or "-", fe["kind"] or "-"]
        first += [f"{fe['address']}:{fe['port']}", fe["protocol"], fe["scheduler"]]
        flags = [f"scope={fe['scope']}"] if fe["scope"] else []
        flags += fe["flags"] + [f"from={','.join(fe['source_ranges'])}"] * bool(fe["source_ranges"])
        if fe["affinity_timeout_s"]:
            flags.append(f"affinity={fe['affinity_timeout_s']}s")
        first.append(" ".join(flags) or "-")
        if not fe["backends"]:
            table.rows.append([*first, "-", "(no backends)", "", "", ""])
        for i, be in enumerate(fe["backends"]):
            lead = first if i == 0 else [""] * len(first)
            target = "(missing)" if be.get("missing") else f"{be['address']}:{be['port']}"
            opened = str(be["open_flows"]) if "open_flows" in be else "-"
            where = _WHERE.get(be.get("placement"), "-")
            table.rows.append([*lead, str(be["slot"]), target, be.get("state", ""), where, opened])
    return table.render()


# a backend's placement, in a word: see dump.backend_placement
_WHERE = {"this-node": "node", "outside-pod-network": "outside", "pod-network": "pods"}


def _node(node: dict[str, Any]) -> str:
    return (
        f"node: masquerade address {node.get('snat_address') or 'none'}, NAT ports "
        f"{'-'.join(map(str, node.get('nat_ports', []))) or '-'}, cluster CIDRs "
        f"{','.join(node['cluster_cidrs']) or 'none'}"
        + (f" (from {node['cluster_cidrs_from']})" if node.get("cluster_cidrs_from") else "")
    )


def _flows(flows: list[dict[str, Any]]) -> str:
    table = Table(
        ["SERVICE", "CLIENT", "FRONTEND", "BACKEND", "PROTO", "MASQUERADE", "STATE", "AGE", "IDLE"]
    )
    for f in flows[:50]:
        where = [f["service"], f["client"], f["frontend"], f["backend"], f["protocol"]]
        table.rows.append(
            [*where, f["masquerade"] or "-", f["state"], f"{f['age_s']}s", f"{f['idle_s']}s"]
        )
    more = f"\n({len(flows) - 50} more flows: -o json lists them)" if len(flows) > 50 else ""
    return table.render() + more


def _nat(nat: list[dict[str, Any]]) -> str:
    table = Table(["MASQUERADE", "BACKEND", "PROTO", "CLIENT", "FRONTEND", "AGE"])
    for n in nat[:50]:
        row = [n["masquerade"], n["backend"], n["protocol"], n["client"], n["frontend"]]
        table.rows.append([*row, f"{n['age_s']}s"])
    more = f"\n({len(nat) - 50} more bindings: -o json lists them)" if len(nat) > 50 else ""
    return table.render() + more


def _affinity(rows: list[dict[str, Any]]) -> str:
    table = Table(["SERVICE", "FRONTEND", "PROTO", "CLIENT", "BACKEND", "IDLE", "EXPIRES IN"])
    for a in rows:
        where = [a["service"], a["frontend"], a["protocol"], a["client"], a["backend"]]
        table.rows.append([*where, f"{a['idle_s']}s", f"{a['expires_in_s']}s"])
    return table.render()


def _fill(maps: dict[str, dict[str, int]]) -> str:
    table = Table(["MAP", "ENTRIES", "CAPACITY", "FILL"])
    for name, fill in maps.items():
        share = f"{100 * fill['entries'] / fill['capacity']:.1f}%" if fill["capacity"] else "-"
        table.rows.append([name, str(fill["entries"]), str(fill["capacity"]), share])
    return table.render()


def _counters(counters: dict[str, int]) -> str:
    table = Table(["COUNTER", "PACKETS"])
    for name, value in counters.items():
        table.rows.append([name, str(value)])
    return table.render()


# each key of `dump.read`'s result, in its order, and what renders it
_SECTIONS: tuple[tuple[str, Callable[[Any], str]], ...] = (
    ("frontends", _services),
    ("node", _node),
    ("flows", _flows),
    ("nat", _nat),
    ("affinity", _affinity),
    ("maps", _fill),
    ("counters", _counters),
)


def render_table(data: dict[str, Any]) -> str:
    """The sections of `data` in the order `dump.read` lists them."""
    return "\n\n".join(show(data[key]) for key, show in _SECTIONS if key in data) + "\n"


def render_ipvs_table(state: dict[str, Any]) -> str:
    services = Table(
        ["FRONTEND", "PROTO", "KIND", "SCHED", "FLAGS", "BACKEND", "WEIGHT", "ACTIVE", "INACTIVE"]
    )
    for vs in state["virtual_services"]:
        flags = list(vs["flags"])
        if vs["persistence_timeout_s"]:
            flags = [f for f in flags if f != "persistent"]
            flags.append(f"affinity={vs['persistence_timeout_s']}s")
        first = [f"{vs['address']}:{vs['port']}", vs["protocol"], vs["kind"], vs["scheduler"]]
        first.append(" ".join(flags) or "-")
        if not vs["backends"]:
            services.rows.append([*first, "(no backends)", "", "", ""])
        for i, be in enumerate(vs["backends"]):
            lead = first if i == 0 else [""] * len(first)
            counts = [str(be["weight"]), str(be["active_conns"]), str(be["inactive_conns"])]
            services.rows.append([*lead, f"{be['address']}:{be['port']}", *counts])
    link = state["link"]
    addresses = link["addresses"]
    summary = (
        f"mode: ipvs; link {link['name']}: "
        + (", ".join(addresses) or "no addresses" if addresses is not None else "absent")
        + ("" if state["ipvs_loaded"] else "; ip_vs is not loaded")
    )
    sets = Table(["SET", "ELEMENTS"])
    table = state["nftables"]
    for name, elements in (table["sets"] or {}).items():
        sets.rows.append([name, ", ".join(elements) or "-"])
    nft = f"nftables table {table['table']}" + (":" if table["sets"] is not None else ": absent")
    parts = [services.render(), summary, nft + "\n" + sets.render()]
    return "\n\n".join(parts) + "\n"


def main(args: argparse.Namespace) -> int:
    """`lbctl maps dump`: the eBPF datapath's pinned maps, or the IPVS datapath's state."""
    from lbctl.cli.locate import MISSING_FIX, resolve
    from lbctl.datapath.ebpf import inspect

    sections: tuple[str, ...] = inspect.SECTIONS
    if args.map is not None:
        section = inspect.MAP_SECTIONS.get(args.map, args.map)
        if section not in inspect.SECTIONS:
            known = ", ".join([*inspect.SECTIONS, *inspect.MAP_SECTIONS])
            raise ValueError(f"no map or section {args.map!r} to dump; choose one of {known}")
        sections = (section,)
    if args.service is not None and args.service.count("/") != 1:
        raise ValueError(f"--service {args.service!r} must be NAMESPACE/NAME, e.g. default/web")
    where = resolve(args.bpffs, args.address, args.timeout)
    if not (where.path / "lb4_services").exists():
        from lbctl.datapath.ebpf.datapath import check_bpffs
        from lbctl.datapath.ipvs import datapath as ipvs

        if ipvs.present():  # the IPVS fallback runs here
            state = ipvs.read_state()
            sys.stdout.write(output.render(state, args.output, render_ipvs_table))
            return 0
        check_bpffs(where.path)  # e.g. under `ip netns exec`, which hides bpffs: says so
        raise FileNotFoundError(
            f"{where.missing()}, and no IPVS datapath ({ipvs.LINK}) here: {MISSING_FIX}"
        )
    data = inspect.read(where.path, sections, args.service)
    sys.stdout.write(output.render(data, args.output, render_table))
    return 0
