"""What `lbctl status` says about the pinned maps' layout and the last upgrade.

Two sources, like the rest of the status: the agent's report of what its
start did with the pinned maps (`/statusz`, datapath.upgrade), and the
layout record pinned with the maps (lbctl/datapath/ebpf/upgrade/record.py), which keeps
the last upgrades and so answers when the agent is down.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any


def kernel_layout(pin_dir: Path) -> dict[str, Any]:
    """The layout record under `pin_dir`, and any upgrade staging directory left there."""
    from lbctl.datapath.ebpf.upgrade import pinsets, record

    out: dict[str, Any] = {"record": None, "error": None, "staging": []}
    try:
        found = record.read(pin_dir / record.NAME)
    except (record.RecordError, OSError) as err:
        out["error"] = str(err)
        return out
    out["staging"] = [p.name for p in pinsets.staging_dirs(pin_dir)]
    if found is not None:
        out["record"] = {
            "layout": found.layout,
            "name": record.layout_name(found.layout),
            "lbctl": found.lbctl,
            "written": _time(found.written),
            "lastUpgrade": found.history[-1] if found.history else None,
        }
    return out


def _time(wall: float) -> str:
    moment = datetime.datetime.fromtimestamp(wall, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def describe(report: dict[str, Any]) -> str:
    """One line for an upgrade report (Report.as_dict)."""
    moved = [m for m in report.get("maps", []) if m["action"] != "retired"]
    retired = [m["name"] for m in report.get("maps", []) if m["action"] == "retired"]
    parts = [f"{report['action']} at {_time(report['time'])}"]
    if moved:
        parts.append(
            "; ".join(
                f"{m['name']} {m['action']} ({m['why']}): {m['written']} entries"
                + (f", {m['notCarried']} not carried over" if m.get("notCarried") else "")
                for m in moved
            )
        )
    if retired:
        parts.append(f"retired {', '.join(retired)}")
    if report.get("hooks"):
        parts.append(f"{report['hooks']} in {report.get('seconds', 0):.2f} s")
    return ": ".join(parts[:2]) + "".join(f"; {p}" for p in parts[2:])


def rows(doc: dict[str, Any] | None, kernel: dict[str, Any]) -> list[tuple[str, str]]:
    """The LAYOUT and UPGRADE rows of the status table."""
    out = []
    held = kernel.get("layout") or {}
    found = held.get("record")
    if held.get("error"):
        out.append(("LAYOUT", f"record unreadable: {held['error']}"))
    elif found:
        name = found.get("name") or f"layout {found['layout']}"
        out.append(("LAYOUT", f"{name} (record written by lbctl {found['lbctl']})"))
    ours = ((doc or {}).get("datapath") or {}).get("upgrade")
    last = ours if ours and ours.get("action") == "migrated" else (found or {}).get("lastUpgrade")
    if last:
        out.append(("LAST UPGRADE", describe(last)))
    if held.get("staging"):
        out.append(("UPGRADING", f"staging directories {', '.join(held['staging'])}"))
    return out


def warnings(doc: dict[str, Any] | None, kernel: dict[str, Any]) -> list[str]:
    """Problems of the agent's start with the pinned maps (they do not stop it)."""
    ours = ((doc or {}).get("datapath") or {}).get("upgrade") or {}
    out = [f"pinned maps: {p}" for p in ours.get("problems", [])]
    staging = (kernel.get("layout") or {}).get("staging")
    if staging and doc is not None:
        out.append(
            f"an upgrade of the pinned maps did not finish ({', '.join(staging)}): the agent "
            "completes it at its next start"
        )
    return out
