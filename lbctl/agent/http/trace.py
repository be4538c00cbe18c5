"""The agent's plan of one frontend address, served at `/tracez` for `lbctl trace`.

The maps hold only the backends the plan made eligible; why the other
endpoints of the Service are not there (readiness, terminating, another
node under a Local traffic policy, topology hints) is known only to the
agent.  This document says it, per frontend entry (scope) of one
(address, port, protocol): every endpoint of the Service port, whether the
plan (lbctl.plan.planner.plan_service, via eligible()) gave it to that entry, and
which of its conditions explains that.  The decision is the plan's; this
module only puts words to it.

The query is `?address=IP&port=N&protocol=TCP|UDP`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from lbctl.agent.http.status import API_VERSION, retry
from lbctl.agent.loop import Agent
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.datapath.ebpf.settings import BpfSettings
from lbctl.model import Endpoint, EndpointSlice, Protocol, Service
from lbctl.plan.planner import (
    CLUSTER_IP,
    SCOPE_ALL,
    SCOPE_EXTERNAL,
    SCOPE_NAMES,
    Frontend,
    FrontendKey,
    NodeContext,
)

KIND = "FrontendPlan"


class QueryError(ValueError):
    """The query names no valid frontend address; the message says how to fix it."""


def parse_query(query: Mapping[str, Sequence[str]]) -> tuple[ipaddress.IPv4Address, int, Protocol]:
    def one(name: str) -> str:
        values = query.get(name) or []
        if len(values) != 1:
            raise QueryError(f"give exactly one {name}= (e.g. ?address=10.96.0.10&port=80)")
        return values[0]

    try:
        address = ipaddress.IPv4Address(one("address"))
    except ipaddress.AddressValueError as err:
        raise QueryError(f"address: {err}") from None
    text = one("port")
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise QueryError(f"port: {text!r} is not a port number (1-65535)")
    name = (query.get("protocol") or ["TCP"])[0].upper()
    if name not in ("TCP", "UDP"):
        raise QueryError(f"protocol: {name!r} is not TCP or UDP")
    return address, int(text), Protocol[name]


def _condition(ep: Endpoint) -> str:
    if ep.ready:
        return "ready"
    if ep.serving and ep.terminating:
        return "serving, terminating"
    return "terminating, not serving" if ep.terminating else "not ready"


def _uses_local(fe: Frontend, svc: Service) -> str | None:
    """The traffic policy that limits the entry to this node's endpoints, if one does."""
    if fe.key.scope == SCOPE_EXTERNAL:
        return "externalTrafficPolicy"
    if fe.kind == CLUSTER_IP and svc.internal_traffic_policy == "Local":
        return "internalTrafficPolicy"
    return None


def explain(
    fe: Frontend, svc: Service, slices: Sequence[EndpointSlice], node: NodeContext
) -> list[dict[str, Any]]:
    """Every endpoint of the frontend's Service port, whether the plan made it a
    backend of `fe` and why: the condition that decided it."""
    chosen = {b.target for b in fe.backends}
    policy = _uses_local(fe, svc)
    any_ready = False
    found: list[tuple[Endpoint, int, str]] = []
    for eps in sorted(slices, key=lambda s: s.name):
        if eps.address_type != "IPv4":
            continue
        for ep_port in eps.ports:
            if ep_port.name != fe.port_name or ep_port.protocol != fe.key.protocol:
                continue
            for ep in eps.endpoints:
                found.append((ep, ep_port.port, eps.name))
                any_ready = any_ready or (
                    ep.ready and (policy is None or ep.node_name == node.name)
                )
    out = []
    for ep, port, slice_name in found:
        address = ep.addresses[0]
        eligible = (address, port, fe.key.protocol) in chosen
        local = ep.node_name == node.name and node.name is not None
        hinted = list(ep.zone_hints)
        if policy and not local:
            why = (
                f"on node {ep.node_name or '(none given)'}, not this node ({node.name}): "
                f"{policy} Local keeps these clients on this node's endpoints"
            )
        elif not ep.ready and not (ep.serving and ep.terminating):
            why = f"{_condition(ep)}: gets no traffic"
        elif eligible:
            parts = [_condition(ep)]
            if not ep.ready:
                parts.append("used because no endpoint is ready")
            if policy:
                parts.append(f"on this node ({policy} Local)")
            if node.zone and node.zone in hinted:
                parts.append(f"hinted for this node's zone {node.zone}")
            why = ", ".join(parts)
        elif not ep.ready and any_ready:
            why = "serving, terminating: used only when no endpoint is ready, and some are"
        elif node.zone and hinted and node.zone not in hinted:
            why = f"topology hints for zone {','.join(hinted)}, not this node's zone {node.zone}"
        else:
            why = "not in the plan: another copy of it (another slice) decides"
        out.append(
            {
                "address": str(address),
                "port": port,
                "slice": slice_name,
                "node": ep.node_name,
                "zone": ep.zone,
                "zoneHints": hinted,
                "condition": _condition(ep),
                "weight": ep.weight,
                "eligible": eligible,
                "why": why,
            }
        )
    return out


def _frontend(agent: Agent, fe: Frontend) -> dict[str, Any]:
    svc = agent.table.services.get(fe.service)
    doc: dict[str, Any] = {
        "scope": SCOPE_NAMES[fe.key.scope] or "all",
        "service": str(fe.service),
        "portName": fe.port_name,
        "kind": fe.kind,
        "backends": [f"{b.address}:{b.port}" for b in fe.backends],
        "scheduler": fe.scheduler,
        "affinityTimeoutSeconds": fe.affinity_timeout,
    }
    if svc is None:  # removed since it was planned: the next tick removes the frontend
        doc["endpoints"] = []
        return doc
    slices = list(agent.table.slices_of(fe.service))
    doc |= {
        "schedulerFrom": "its lbctl.io/scheduler annotation"
        if svc.scheduler
        else "the agent's default (--scheduler)",
        "type": svc.type,
        "externalTrafficPolicy": svc.external_traffic_policy,
        "internalTrafficPolicy": svc.internal_traffic_policy,
        "sessionAffinity": svc.session_affinity,
        "loadBalancerSourceRanges": [str(r) for r in fe.source_ranges],
        "endpoints": explain(fe, svc, slices, agent.planner.node),
    }
    return doc


def _settings(agent: Agent) -> dict[str, Any] | None:
    dp = agent.datapath
    return settings_of(dp.settings) if isinstance(dp, BpfDatapath) else None


def settings_of(s: BpfSettings) -> dict[str, Any]:
    """What `lbctl trace` needs of the settings the programs were compiled with."""
    return {
        "conntrackTimeoutsSeconds": {
            "tcpEstablished": s.ct_tcp_timeout_s,
            "tcpSyn": s.ct_tcp_syn_timeout_s,
            "tcpClosing": s.ct_tcp_closing_timeout_s,
            "udp": s.ct_udp_timeout_s,
        },
        "tableSize": s.table_size,
        "lcScan": s.lc_scan,
        "bpffs": str(s.pin_dir),
    }


def document(agent: Agent, query: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The plan of every frontend entry of the queried (address, port, protocol)."""
    address, port, protocol = parse_query(query)
    plans = retry(lambda: {ref: dict(plan) for ref, plan in agent.planner.plans.items()})
    owner = retry(lambda: dict(agent.planner.owner))
    entries = []
    for scope in (SCOPE_ALL, SCOPE_EXTERNAL):
        key = FrontendKey(address, port, protocol, scope)
        ref = owner.get(key)
        fe = plans.get(ref, {}).get(key) if ref is not None else None
        if fe is not None:
            entries.append(retry(lambda fe=fe: _frontend(agent, fe)))  # type: ignore[misc]
    # the same address on other ports: what the user may have meant
    elsewhere = sorted(
        str(key)
        for plan in plans.values()
        for key in plan
        if key.address == address
        and key.scope == SCOPE_ALL
        and (key.port, key.protocol) != (port, protocol)
    )
    conflicts = dict(agent.planner.conflicts)
    node = agent.planner.node
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "node": {"name": node.name, "zone": node.zone},
        "synced": agent.synced.is_set(),
        "query": {"address": str(address), "port": port, "protocol": protocol.name},
        "frontends": entries,
        "sameAddressOtherPorts": elsewhere,
        "conflicts": [
            {"service": str(ref), "reason": why}
            for ref, why in sorted(conflicts.items())
            if f"{address}:{port}/{protocol.name}" in why
        ],
        "settings": _settings(agent),
    }
