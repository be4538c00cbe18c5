"""`lbctl status`: is the agent up and healthy, and what does the kernel hold.

Two sources, read apart so that either may be missing:

- the agent's status document (`/statusz` on its health port, see
  lbctl/agent/http/status.py): mode and why, source, last syncs and their result,
  counts, errors;
- the kernel, read here: for every interface of this network namespace the
  BPF programs on its clsact ingress and egress hooks (tc filters) and its XDP
  programs, through netlink; the socket hooks pinned under the bpffs
  directory (BPF link info); the pinned maps and the fill of the frontend
  and backend maps.  This is right even when the agent is down.

Exit codes: kubectl's 0 (healthy), 1 (the command failed) and 2 (usage), then
3 the agent does not answer, 4 it answers but is unhealthy, 5 the datapath is
absent; when several hold, the lowest.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any

from lbctl.agent.config import parse_bind_address
from lbctl.cli.agentclient import get_json
from lbctl.cli.locate import PinDir, resolve
from lbctl.cli.output import columns
from lbctl.cli.output import render as output_render
from lbctl.datapath.ebpf.maps import MAP_TYPES
from lbctl.datapath.ebpf.upgrade import status as upgrade_status
from lbctl.datapath.ipvs import nftables
from lbctl.words import counted

# `lbctl status -o json` is an API: within this version fields are only added
# (docs/status-api.md, docs/status-v1.schema.json).
API_VERSION, KIND = "lbctl.io/v1", "StatusReport"
OK, FAILED, USAGE, AGENT_DOWN, UNHEALTHY, NO_DATAPATH = 0, 1, 2, 3, 4, 5
STATES = {  # the verdict of each exit code `lbctl status` decides
    OK: "healthy",
    AGENT_DOWN: "agent down",
    UNHEALTHY: "agent unhealthy",
    NO_DATAPATH: "datapath absent",
}

_HOOKS = (("tc ingress", 0xFFFFFFF2), ("tc egress", 0xFFFFFFF3))  # clsact parents
_COUNTED_MAPS = ("lb4_services", "lb4_backends")  # small enough to count on every status


# -- the agent -----------------------------------------------------------------------


def fetch(address: str, timeout: float) -> dict[str, Any]:
    """The agent's status document; OSError or ValueError saying why not."""
    parsed = parse_bind_address(address)
    if parsed is None:
        raise ValueError("--address is empty; give the agent's health address as HOST:PORT")
    doc: dict[str, Any] = get_json(address, parsed, "/statusz", timeout)
    return doc


# -- the kernel ----------------------------------------------------------------------


def _tc_programs(ipr: Any, index: int) -> list[dict[str, Any]]:
    from pyroute2.netlink.exceptions import NetlinkError

    from lbctl.datapath.ebpf.tc import FILTER_PRIO, HOOKS
    from lbctl.datapath.ebpf.upgrade.swap import filter_prog_id

    programs = {hook.parent_id: hook.program for hook in HOOKS}  # lbctl's, by hook
    found = []
    for hook, parent in _HOOKS:
        try:
            filters = ipr.get_filters(index=index, parent=parent)
        except NetlinkError:  # no clsact qdisc: nothing on this hook
            continue
        for f in filters:
            options = f.get_attr("TCA_OPTIONS")
            if f.get_attr("TCA_KIND") != "bpf" or options is None:
                continue
            name, prio = str(options.get_attr("TCA_BPF_NAME") or ""), int(f["info"]) >> 16
            ours = name == programs.get(parent) and prio == FILTER_PRIO
            found.append(
                {
                    "hook": hook,
                    "program": name,
                    "id": filter_prog_id(options),
                    "priority": prio,
                    "owner": "lbctl" if ours else "other",
                }
            )
    return found


def interfaces() -> list[dict[str, Any]]:
    """Every non-loopback interface of this namespace with its tc and XDP programs."""
    from pyroute2 import IPRoute

    from lbctl.datapath.ebpf import tc, xdp

    out = []
    with IPRoute() as ipr:
        for link in sorted(tc.all_links(), key=lambda x: x.name):
            programs = _tc_programs(ipr, link.index)
            for prog in xdp.programs(ipr, link.index):
                programs.append(
                    {
                        "hook": f"xdp {prog.mode}",
                        "program": prog.name,
                        "id": prog.prog_id,
                        "priority": None,
                        "owner": "lbctl" if prog.ours else "other",
                    }
                )
            out.append({"name": link.name, "ethernet": link.ethernet, "programs": programs})
    return out


def socket_hooks(pin_dir: Path) -> list[dict[str, Any]]:
    from lbctl.datapath.ebpf import cgroup

    return [
        {"hook": a.hook, "program": a.program, "id": a.prog_id, "cgroupId": a.cgroup_id}
        for a in cgroup.attached(pin_dir)
    ]


def pinned_maps(where: PinDir) -> dict[str, Any]:
    from lbctl.datapath import DatapathError
    from lbctl.datapath.ebpf import libbpf
    from lbctl.datapath.ebpf.datapath import check_bpffs
    from lbctl.datapath.ebpf.maps import SIZE_FLAGS

    pin_dir = where.path
    try:
        check_bpffs(pin_dir)  # e.g. under `ip netns exec`, which hides bpffs
        unseen = None
    except DatapathError as err:
        unseen = str(err)
    present = [name for name in MAP_TYPES if (pin_dir / name).exists()]
    fill: dict[str, dict[str, int]] = {}
    for name in _COUNTED_MAPS:
        if name in present:
            key, value = MAP_TYPES[name]
            pinned = libbpf.BpfMap.open_pinned(str(pin_dir / name), key, value, SIZE_FLAGS[name])
            try:
                fill[name] = {"entries": len(pinned), "capacity": pinned.max_entries}
            finally:
                pinned.close()
    return {
        **where.document(),
        "present": present,
        "missing": [name for name in MAP_TYPES if name not in present],
        "fill": fill,
        "bpffsError": unseen,
    }


def _ipvs_state() -> dict[str, Any] | None:
    """The IPVS fallback's link, virtual services and table here; None: not present."""
    from lbctl.datapath.ipvs import datapath as ipvs

    try:
        if not ipvs.present():
            return None
        state = ipvs.read_state()
    except Exception as err:  # status must still show the rest
        return {"present": True, "error": str(err)}
    return {
        "present": state["link"]["addresses"] is not None,
        "link": state["link"]["name"],
        "virtualServices": len(state["virtual_services"]),
        "realServers": sum(len(v["backends"]) for v in state["virtual_services"]),
        "linkAddresses": len(state["link"]["addresses"] or []),
        "nftablesTable": state["nftables"]["sets"] is not None,
    }


# -- the verdict ---------------------------------------------------------------------


def collect(address: str, pin_dir: Path | None, timeout: float) -> dict[str, Any]:
    """Everything `lbctl status` shows, and its verdict (`verdict.exitCode`)."""
    agent: dict[str, Any] = {"address": address, "reachable": False, "error": None}
    try:
        agent["status"] = fetch(address, timeout)
        agent["reachable"] = True
    except (OSError, ValueError) as err:
        agent["error"] = str(err)
        agent["status"] = None
    where = resolve(
        pin_dir, address, timeout, agent_doc=agent["status"], agent_error=agent["error"]
    )
    kernel: dict[str, Any] = {"interfaces": interfaces(), "pinnedMaps": pinned_maps(where)}
    kernel["ipvs"] = _ipvs_state()
    kernel["layout"] = upgrade_status.kernel_layout(where.path)
    try:
        kernel["socketHooks"] = socket_hooks(where.path)
    except OSError as err:
        kernel["socketHooks"] = []
        kernel["socketHooksError"] = str(err)
    report = {"apiVersion": API_VERSION, "kind": KIND, "agent": agent, "kernel": kernel}
    report["verdict"] = verdict(agent, kernel)
    return report


def verdict(agent: dict[str, Any], kernel: dict[str, Any]) -> dict[str, Any]:
    """The exit code and the reasons for it; warnings do not change the code."""
    problems: list[tuple[int, str]] = []
    warnings: list[str] = []
    doc = agent["status"]
    if not agent["reachable"]:
        problems.append(
            (AGENT_DOWN, f"agent: not reachable at {agent['address']}: {agent['error']}")
        )
    elif not doc.get("healthy"):
        why = "its first sync is not done" if not doc.get("synced") else "its loop stalled"
        problems.append((UNHEALTHY, f"agent: unhealthy, {why} (last tick {doc.get('lastTick')})"))
    maps = kernel["pinnedMaps"]
    if ipvs_mode(doc, kernel):
        # the IPVS fallback: no programs or maps to look for, its link and table instead
        ipvs = kernel.get("ipvs") or {}
        if not ipvs.get("present"):
            problems.append((NO_DATAPATH, "datapath: IPVS mode, but no lbctl-ipvs0 link here"))
        nft = (doc or {}).get("datapath", {}).get("nftables") or {}
        if nft.get("unavailable"):
            warnings.append(nft["unavailable"])
        code = min((c for c, _ in problems), default=OK)
        return {
            "exitCode": code,
            "state": STATES[code],
            "problems": [text for _, text in problems],
            "warnings": warnings,
        }
    if maps.get("bpffsError"):
        problems.append((NO_DATAPATH, f"datapath: {maps['bpffsError']}"))
    elif maps["missing"]:
        missing = len(maps["missing"])
        what = (
            "no lbctl maps are"
            if not maps["present"]
            else f"{counted(missing, 'map')} {'is' if missing == 1 else 'are'} not"
        )
        problems.append(
            (
                NO_DATAPATH,
                f"datapath: {what} pinned under {maps['directory']} "
                f"({'; '.join([*maps['looked'], 'used ' + maps['foundBy']])})",
            )
        )
    carrying = {i["name"] for i in kernel["interfaces"] if _ours(i, "tc ingress")}
    if not carrying:
        problems.append(
            (NO_DATAPATH, "datapath: lbctl's tc program is attached to no interface here")
        )
    if doc:
        present = {i["name"]: i for i in kernel["interfaces"]}
        for name in doc.get("datapath", {}).get("attached", []):
            if name in present and name not in carrying:
                warnings.append(
                    f"interface {name}: the agent attached its program but the kernel shows none"
                )
            elif name in present and not _ours(present[name], "tc egress"):
                warnings.append(
                    f"interface {name}: the agent attached its egress program but the kernel "
                    "shows none (replies of the node's own stack to Service clients there "
                    "keep the endpoint's address)"
                )
        for name in doc.get("datapath", {}).get("xdpAttached", []):
            if name in present and not _ours(present[name], "xdp"):
                warnings.append(
                    f"interface {name}: the agent attached its XDP program but the kernel "
                    "shows none"
                )
        warnings += upgrade_status.warnings(doc, kernel)
        failing = doc.get("errors", {}).get("current", [])
        if failing:
            warnings.append(
                f"{counted(len(failing), 'error')} in the agent's last attempt, retried "
                "(see ERRORS)"
            )
    code = min((c for c, _ in problems), default=OK)
    return {
        "exitCode": code,
        "state": STATES[code],
        "problems": [text for _, text in problems],
        "warnings": warnings,
    }


def ipvs_mode(doc: dict[str, Any] | None, kernel: dict[str, Any]) -> bool:
    """The agent runs the IPVS fallback, or, when it is down, the kernel holds it."""
    return (doc or {}).get("mode") == "ipvs" or (not doc and bool(kernel.get("ipvs")))


def _ours(interface: dict[str, Any], hook: str) -> bool:
    return any(p["owner"] == "lbctl" and p["hook"].startswith(hook) for p in interface["programs"])


# -- output --------------------------------------------------------------------------


def _ago(when: str | None, now: str | None) -> str:
    if not when or not now:
        return ""
    parse = datetime.datetime.fromisoformat
    seconds = (
        parse(now.replace("Z", "+00:00")) - parse(when.replace("Z", "+00:00"))
    ).total_seconds()
    return f" ({seconds:.0f}s ago)" if seconds >= 1 else " (just now)"


def _sync_line(record: dict[str, Any] | None, now: str | None) -> str:
    if record is None:
        return "none yet"
    took = record["seconds"]
    duration = f"{took * 1000:.2f} ms" if took < 1 else f"{took:.2f} s"
    line = f"{record['time']}{_ago(record['time'], now)}: {record['what']}, {record['result']}"
    return (
        line
        + f", {duration}"
        + (f" ({counted(len(record['errors']), 'error')})" if record["errors"] else "")
    )


def _counts(counts: dict[str, int]) -> str:
    def n(key: str, what: str) -> str:
        return counted(counts[key], what)

    text = f"{n('services', 'service')}, {n('frontends', 'frontend')}, "
    return text + f"{n('backends', 'backend')} ({n('backendSlots', 'backend slot')})"


def render_table(report: dict[str, Any]) -> str:
    agent, kernel, result = report["agent"], report["kernel"], report["verdict"]
    doc = agent["status"]
    rows: list[tuple[str, str]] = []
    if doc is None:
        rows.append(("AGENT", f"down: not reachable at {agent['address']} ({agent['error']})"))
    else:
        now = doc.get("currentTime")
        health = "healthy" if doc["healthy"] else "UNHEALTHY"
        rows += [
            (
                "AGENT",
                f"up at {agent['address']} (pid {doc['pid']}, lbctl {doc['version']}), {health}",
            ),
            ("NODE", str(doc.get("node") or "-")),
            ("MODE", f"{doc['mode']}, {doc.get('modeReason') or 'no reason given'}"),
            (
                "SOURCE",
                f"{doc['source']['kind']} {doc['source']['location']}"
                f" ({'complete' if doc['source']['complete'] else 'INCOMPLETE'})",
            ),
            ("LAST SYNC", _sync_line(doc.get("lastSync"), now)),
            ("LAST CHANGE", _sync_line(doc.get("lastChange"), now)),
            ("COUNTS", _counts(doc["counts"])),
        ]
    held = kernel.get("ipvs")
    if ipvs_mode(doc, kernel):  # no maps are pinned there: IPVS, its link and its table
        rows += _ipvs_rows(held, doc)
    else:
        maps = kernel["pinnedMaps"]
        fill = ", ".join(f"{n} {f['entries']}/{f['capacity']}" for n, f in maps["fill"].items())
        pinned = f"{maps['directory']}: {len(maps['present'])} of {len(MAP_TYPES)} maps"
        rows.append(("PINNED MAPS", pinned + (f"; {fill}" if fill else "")))
        rows += upgrade_status.rows(doc, kernel)
        if held is not None:  # left by an earlier run in IPVS mode
            rows.append(
                (
                    "IPVS",
                    held.get("error")
                    or f"{_ipvs_counts(held)}, "
                    f"{counted(held['linkAddresses'], 'address', 'addresses')} on lbctl-ipvs0, "
                    f"nftables table {'present' if held['nftablesTable'] else 'ABSENT'}",
                )
            )
    width = max(len(k) for k, _ in rows)
    parts = ["\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)]

    if not ipvs_mode(doc, kernel):  # IPVS attaches no programs: the table would say nothing
        parts.append(_program_table(kernel["interfaces"]))
    hooks = [["SOCKET HOOK", "PROGRAM", "ID", "CGROUP ID"]]
    hooks += [
        [h["hook"], h["program"], str(h["id"]), str(h["cgroupId"])] for h in kernel["socketHooks"]
    ]
    parts.append(columns(hooks) if len(hooks) > 1 else "SOCKET HOOKS  none pinned")

    if doc is not None:
        errors = doc["errors"]
        lines = [f"  current   {m}" for m in errors["current"]]
        lines += [f"  rejected  {r['where']}: {r['reason']}" for r in errors["rejected"]]
        lines += [f"  recent    {e['time']}  {e['message']}" for e in errors["recent"]]
        lines += [f"  problem   {p}" for p in doc.get("problems", [])]
        parts.append("ERRORS\n" + ("\n".join(lines) if lines else "  none"))
    verdict_lines = [f"STATUS  {result['state']} (exit {result['exitCode']})"]
    verdict_lines += [f"  {p}" for p in result["problems"]]
    verdict_lines += [f"  warning: {w}" for w in result["warnings"]]
    parts.append("\n".join(verdict_lines))
    return "\n\n".join(parts) + "\n"


def _program_table(interfaces: list[dict[str, Any]]) -> str:
    """Each interface's tc and XDP programs, one row each."""
    progs = [["INTERFACE", "HOOK", "PROGRAM", "ID", "OWNER"]]
    for iface in interfaces:
        for p in iface["programs"]:
            progs.append(
                [iface["name"], p["hook"], p["program"] or "?", str(p["id"] or "?"), p["owner"]]
            )
        if not iface["programs"]:
            progs.append([iface["name"], "-", "(no program)", "-", "-"])
    return columns(progs) if len(progs) > 1 else "INTERFACES  none but lo"


def _ipvs_counts(held: dict[str, Any]) -> str:
    return (
        f"{counted(held['virtualServices'], 'virtual service')}, "
        f"{counted(held['realServers'], 'real server')}"
    )


def _ipvs_rows(held: dict[str, Any] | None, doc: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The IPVS fallback's side of the kernel: virtual services, the link, the table."""
    if held is None:
        return [("IPVS", "nothing here: no lbctl-ipvs0 link and no nftables table")]
    if held.get("error"):
        return [("IPVS", f"unreadable: {held['error']}")]
    link = held["link"]
    rows = [
        ("IPVS", _ipvs_counts(held)),
        (
            "IPVS LINK",
            f"{link}, {counted(held['linkAddresses'], 'address', 'addresses')}"
            if held["present"]
            else f"{link} ABSENT",
        ),
    ]
    nft = (doc or {}).get("datapath", {}).get("nftables")
    if nft is None:  # the agent is down: what the kernel holds
        table = "present" if held["nftablesTable"] else "absent"
        rows.append(("NFTABLES", f"table ip {nftables.TABLE} {table}"))
    elif nft.get("unavailable"):
        rows.append(("NFTABLES", f"UNAVAILABLE: {nft['unavailable']}"))
    elif nft.get("error"):
        rows.append(("NFTABLES", f"NOT WRITTEN: {nft['error']}"))
    elif nft.get("degraded"):
        rows.append(("NFTABLES", f"{nft['table']} written without NAT: {nft['degraded']}"))
    else:
        rows.append(("NFTABLES", f"{nft['table']} written"))
    return rows


def render(report: dict[str, Any], output: str) -> str:
    return output_render(report, output, render_table)


def main(address: str, pin_dir: Path | None, output: str, timeout: float) -> int:
    """Print the status, problems on stderr; return the exit code the verdict decides."""
    try:
        if parse_bind_address(address) is None:
            raise ValueError("it is empty")
    except ValueError as err:
        print(
            f"lbctl status: --address {address!r}: {err}; give the agent's "
            "--healthz-bind-address as HOST:PORT",
            file=sys.stderr,
        )
        return USAGE
    report = collect(address, pin_dir, timeout)
    sys.stdout.write(render(report, output))
    result = report["verdict"]
    for problem in result["problems"]:
        print(f"lbctl status: {problem}{_fix(problem, address)}", file=sys.stderr)
    sys.stdout.flush()
    return int(result["exitCode"])


def _fix(problem: str, address: str) -> str:
    if problem.startswith("agent: not reachable"):
        return (
            "; start the agent (`lbctl run`) in this network namespace, or point --address at "
            f"its --healthz-bind-address if it is not {address}"
        )
    if problem.startswith("agent: unhealthy"):
        return "; see the agent's log"
    if problem.startswith("datapath:") and "bpf file system" not in problem:
        return "; the agent creates the datapath when it starts: start it, or check --bpffs"
    return ""
