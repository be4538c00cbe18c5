"""`lbctl maps dump` in IPVS mode: the virtual services and the nftables sets, as tables."""

from __future__ import annotations

from typing import Any

from lbctl.cli.maps import Table


def render_table(state: dict[str, Any]) -> str:
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
