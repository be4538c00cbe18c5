"""`lbctl trace` the command: the agent's plan merged into the decision of
lbctl.datapath.ebpf.trace.decide, the exit code, and the output (table, JSON, YAML)."""

from __future__ import annotations

import ipaddress
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from lbctl.agent.config import parse_bind_address
from lbctl.cli.agentclient import get_json
from lbctl.cli.locate import MISSING_FIX, resolve
from lbctl.cli.output import columns
from lbctl.cli.output import render as output_render
from lbctl.datapath.ebpf.maps import Maps
from lbctl.datapath.ebpf.trace.decide import USAGE, Knobs, trace
from lbctl.datapath.ebpf.trace.view import MapView, Packet
from lbctl.model import Protocol

# -- the agent's plan -----------------------------------------------------------------


def fetch_plan(address: str, p: Packet, timeout: float) -> dict[str, Any]:
    """The agent's /tracez for the packet's destination; OSError saying why not."""
    parsed = parse_bind_address(address)
    if parsed is None:
        raise OSError("no agent address given")
    query = urllib.parse.urlencode(
        {"address": str(p.dst), "port": p.dport, "protocol": p.protocol.name}
    )
    doc: dict[str, Any] = get_json(address, parsed, f"/tracez?{query}", timeout)
    return doc


def merge_plan(result: dict[str, Any], plan: dict[str, Any] | None, error: str | None) -> None:
    """Put the agent's reasons beside the backends the maps hold."""
    fe = result.get("frontend")
    entry = None
    if plan is not None and fe is not None:
        entry = next((e for e in plan["frontends"] if e["scope"] == fe["scope"]), None)
    result["plan"] = {
        "available": entry is not None,
        "error": error,
        "frontend": entry,
    }
    if plan is not None and fe is None and plan["sameAddressOtherPorts"]:
        result["notes"].append(
            "the agent serves this address on " + ", ".join(plan["sameAddressOtherPorts"])
        )
    if plan is not None and not plan.get("synced", True):
        result["notes"].append(
            "the agent has not finished its first sync: the maps may not hold every Service yet"
        )
    if plan is not None:
        for conflict in plan.get("conflicts", []):
            result["notes"].append(f"Service {conflict['service']}: {conflict['reason']}")
    if entry is None:
        if fe is not None and plan is not None:
            result["notes"].append(
                "the agent has no plan for this frontend: the maps hold what an earlier plan "
                "or run wrote"
            )
        return
    result["notBackends"] = [e for e in entry["endpoints"] if not e["eligible"]]
    if result["backends"] is None:  # decided before the backends mattered
        return
    why = {(e["address"], e["port"]): e for e in entry["endpoints"]}
    for be in result["backends"]:
        if "address" in be:
            found = why.get((be["address"], be["port"]))
            be["why"] = found["why"] if found else "not an endpoint the agent knows now"
    held = sorted(f"{b['address']}:{b['port']}" for b in result["backends"] if "address" in b)
    if held != sorted(entry["backends"]):
        result["notes"].append(
            "the agent's plan and the maps differ (a change being applied, or one that "
            f"failed; see lbctl status): plan {sorted(entry['backends'])}, maps {held}"
        )


# -- the command ----------------------------------------------------------------------


def parse_endpoint(
    text: str, what: str, port_required: bool
) -> tuple[ipaddress.IPv4Address, int | None]:
    """IP[:PORT] (IPv4; the datapath balances IPv4 only)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, ""
    try:
        address = ipaddress.IPv4Address(host)
    except ipaddress.AddressValueError:
        raise ValueError(f"{what} {text!r}: {host!r} is not an IPv4 address") from None
    if not port:
        if port_required:
            raise ValueError(f"{what} {text!r}: give the port too, as IP:PORT")
        return address, None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{what} {text!r}: {port!r} is not a port number (1-65535)")
    return address, int(port)


def run(
    pin_dir: Path | None, address: str, p: Packet, timeout: float, now_ns: int | None = None
) -> dict[str, Any]:
    """The trace of p over the pinned maps, with the agent's reasons when it answers."""
    from lbctl.datapath.ebpf import conntrack_gc

    plan: dict[str, Any] | None = None
    error = None
    try:
        plan = fetch_plan(address, p, timeout)
    except OSError as err:
        error = f"the agent is not reachable at {address}: {err}"
    settings = plan.get("settings") if plan else None
    where = resolve(pin_dir, address, timeout)
    pin_dir = where.path
    if not (pin_dir / "lb4_services").exists():
        from lbctl.datapath.ebpf.datapath import check_bpffs

        check_bpffs(pin_dir)  # e.g. under `ip netns exec`, which hides bpffs: says so
        raise FileNotFoundError(f"{where.missing()}: {MISSING_FIX}")
    knobs = (
        Knobs.from_agent(settings)
        if settings
        else Knobs.defaults("conntrack timeouts and table size: the agent did not say")
    )
    maps = Maps.open_pinned(pin_dir)
    try:
        result = trace(MapView(maps), p, conntrack_gc.now_ns() if now_ns is None else now_ns, knobs)
    finally:
        maps.close()
    merge_plan(result, plan, error)
    result["settingsFrom"] = knobs.source
    return result


def render_table(r: dict[str, Any]) -> str:
    pk = r["packet"]
    sport = f":{pk['sourcePort']}" if pk["sourcePort"] is not None else ""
    dst = f"{pk['destination']}:{pk['destinationPort']}"
    rows = [("PACKET", f"{pk['protocol']} {pk['source']}{sport} -> {dst}")]
    fe = r["frontend"]
    if fe:
        extra = [f"scope {fe['scope']}"] if fe["scope"] != "all" else []
        extra += fe["flags"]
        extra += [f"scheduler {fe['scheduler']}"]
        if fe["affinityTimeoutSeconds"]:
            extra.append(f"ClientIP affinity {fe['affinityTimeoutSeconds']}s")
        if fe["sourceRanges"]:
            extra.append("from " + ",".join(fe["sourceRanges"]))
        port = f" port {fe['portName']}" if fe["portName"] else ""
        rows.append(("SERVICE", f"{fe['service']}{port}, {fe['kind']} ({', '.join(extra)})"))
    plan = r.get("plan") or {}
    entry = plan.get("frontend")
    if entry and "type" in entry:
        rows.append(
            (
                "POLICY",
                f"type {entry['type']}, externalTrafficPolicy {entry['externalTrafficPolicy']}, "
                f"internalTrafficPolicy {entry['internalTrafficPolicy']}, sessionAffinity "
                f"{entry['sessionAffinity']}, scheduler {entry['scheduler']} from "
                f"{entry['schedulerFrom']}",
            )
        )
    width = max(len(k) for k, _ in rows)
    parts = ["\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)]
    steps = [["STEP", "RESULT"]] + [[s["step"], s["result"]] for s in r["steps"]]
    parts.append(columns(steps))
    if r["backends"]:
        with_why = plan.get("available")
        head = ["SLOT", "BACKEND", "STATE"] + (["WHY"] if with_why else [])
        table = [head]
        for be in r["backends"]:
            if be.get("missing"):
                table.append([str(be["slot"]), "(missing)", "-"] + (["-"] if with_why else []))
                continue
            row = [str(be["slot"]), f"{be['address']}:{be['port']}", be["state"]]
            table.append(row + ([be.get("why", "")] if with_why else []))
        parts.append(columns(table))
    if r.get("notBackends"):
        table = [["NOT A BACKEND", "NODE", "CONDITION", "WHY"]]
        for e in r["notBackends"]:
            table.append(
                [f"{e['address']}:{e['port']}", e["node"] or "-", e["condition"], e["why"]]
            )
        parts.append(columns(table))
    lines = []
    if plan.get("error"):
        lines.append(f"reasons unavailable: {plan['error']}; the maps alone are shown")
    lines += r["notes"]
    if lines:
        parts.append("NOTES\n" + "\n".join(f"  {line}" for line in lines))
    verdict = f"VERDICT  {r['verdict']}: {r['reason']}"
    masq = r.get("masquerade")
    if masq and r["verdict"] == "forward":
        verdict += ", " + "; ".join(_masquerade_text(m) for m in masq.get("byBackend") or [masq])
    parts.append(f"{verdict} (exit {r['exitCode']})")
    return "\n\n".join(parts) + "\n"


def _masquerade_text(masq: dict[str, Any]) -> str:
    """One masquerade decision, as the verdict line says it."""
    to = f"to {masq['backend']}: " if "backend" in masq else ""
    if masq["applies"]:
        return f"{to}masqueraded as {masq.get('address')} ({masq['why']})"
    return f"{to}client address kept ({masq['why']})"


def render(result: dict[str, Any], output: str) -> str:
    return output_render(result, output, render_table)


def main(
    pin_dir: Path | None,
    address: str,
    src: str,
    dst: str,
    proto: str,
    output: str,
    timeout: float,
) -> int:
    try:
        saddr, sport = parse_endpoint(src, "--src", port_required=False)
        daddr, dport = parse_endpoint(dst, "--dst", port_required=True)
        if parse_bind_address(address) is None:
            raise ValueError("--address is empty; give the agent's health address as HOST:PORT")
    except ValueError as err:
        print(f"lbctl trace: {err}", file=sys.stderr)
        return USAGE
    assert dport is not None
    p = Packet(saddr, sport, daddr, dport, Protocol[proto.upper()])
    result = run(pin_dir, address, p, timeout)
    sys.stdout.write(render(result, output))
    sys.stdout.flush()
    error = result["plan"]["error"]
    if error:
        print(
            f"lbctl trace: {error}; showing the maps without the plan's reasons (point "
            "--address at the agent's --healthz-bind-address for them)",
            file=sys.stderr,
        )
    return int(result["exitCode"])
