"""The plan: from the model to the frontends and backends the datapath holds.

`plan_service` is a pure function of one Service and its EndpointSlices.
`Planner` keeps the last plan of every service, so a change re-plans only
the services it touched and hands the datapath a diff of just those
frontends: one endpoint change costs the same whatever the cluster's size.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

from lbctl.model import (
    EndpointSlice,
    IPAddress,
    IPNetwork,
    Protocol,
    Service,
    ServiceRef,
    ServiceTable,
)

log = logging.getLogger(__name__)


SCOPE_ALL = 0  # every client
SCOPE_EXTERNAL = 1  # clients from outside the cluster (externalTrafficPolicy Local)
SCOPE_NAMES = {SCOPE_ALL: "", SCOPE_EXTERNAL: "external"}

# Frontend kinds, as `lbctl maps dump` shows them.
CLUSTER_IP, NODE_PORT, LOAD_BALANCER, EXTERNAL_IP = (
    "ClusterIP",
    "NodePort",
    "LoadBalancer",
    "ExternalIP",
)


@dataclasses.dataclass(frozen=True, order=True)
class FrontendKey:
    address: IPAddress
    port: int
    protocol: Protocol
    scope: int = SCOPE_ALL

    def __str__(self) -> str:
        text = f"{self.address}:{self.port}/{self.protocol.name}"
        return f"{text} ({SCOPE_NAMES[self.scope]})" if self.scope else text


@dataclasses.dataclass(frozen=True, order=True)
class Backend:
    address: IPAddress
    port: int
    protocol: Protocol
    ready: bool = True
    serving: bool = True
    terminating: bool = False

    @property
    def target(self) -> tuple[IPAddress, int, Protocol]:
        return (self.address, self.port, self.protocol)

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Frontend:
    """One (address, port, protocol, scope) a Service answers on, and how.

    `local`: externalTrafficPolicy Local on an outside-facing frontend; outside
    clients then use the SCOPE_EXTERNAL twin, which holds this node's backends.
    `drop_empty`: no backend here though the Service has some elsewhere, so new
    flows are dropped (kube-proxy drops, where no endpoints at all rejects).
    """

    key: FrontendKey
    service: ServiceRef
    port_name: str
    kind: str  # CLUSTER_IP, NODE_PORT, LOAD_BALANCER, EXTERNAL_IP
    backends: tuple[Backend, ...]
    local: bool = False
    drop_empty: bool = False
    source_ranges: tuple[IPNetwork, ...] = ()


@dataclasses.dataclass(frozen=True)
class NodeContext:
    """What plans need to know about the node lbctl runs on."""

    name: str | None = None
    node_port_addresses: tuple[IPAddress, ...] = ()  # where NodePorts answer


@dataclasses.dataclass
class PlanDiff:
    upserts: list[Frontend] = dataclasses.field(default_factory=list)
    removals: list[FrontendKey] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.upserts or self.removals)


def _backends(
    svc: Service,
    port_name: str,
    protocol: Protocol,
    slices: Iterable[EndpointSlice],
    node: str | None = None,
) -> tuple[Backend, ...]:
    """Ready endpoints of a service port, merged across slices, deduplicated;
    with `node`, only those on that node."""
    found: dict[tuple[IPAddress, int], Backend] = {}
    for eps in slices:
        if eps.address_type != "IPv4":
            continue  # IPv6 frontends are not programmed yet
        for ep_port in eps.ports:
            if ep_port.name != port_name or ep_port.protocol != protocol:
                continue
            for ep in eps.endpoints:
                if not ep.ready or (node is not None and ep.node_name != node):
                    continue
                # Every address of an endpoint is fungible; proxies use the first.
                backend = Backend(
                    ep.addresses[0], ep_port.port, protocol, ep.ready, ep.serving, ep.terminating
                )
                found.setdefault((backend.address, backend.port), backend)
    return tuple(sorted(found.values(), key=_backend_order))


def _backend_order(b: Backend) -> tuple[int, int, int]:
    return (b.address.version, int(b.address), b.port)


def plan_service(
    svc: Service, slices: Iterable[EndpointSlice], node: NodeContext | None = None
) -> dict[FrontendKey, Frontend]:
    """The frontends one Service needs, each with its eligible backends."""
    node = node or NodeContext()
    slices = list(slices)
    plan: dict[FrontendKey, Frontend] = {}

    def add(fe: Frontend) -> None:
        if fe.key.address.version == 4:  # the datapath balances IPv4 so far
            plan[fe.key] = fe

    local_policy = svc.external_traffic_policy == "Local"
    for sp in svc.ports:
        if sp.protocol is Protocol.SCTP:
            continue  # the datapath balances TCP and UDP
        backends = _backends(svc, sp.name, sp.protocol, slices)
        local = _backends(svc, sp.name, sp.protocol, slices, node.name) if local_policy else ()
        for vip in svc.cluster_ips:
            add(
                Frontend(
                    FrontendKey(vip, sp.port, sp.protocol), svc.ref, sp.name, CLUSTER_IP, backends
                )
            )
        outside: list[tuple[str, IPAddress, int]] = []
        if sp.node_port is not None and svc.type in ("NodePort", "LoadBalancer"):
            # a NodePort opens only for the Service's own IP families, as kube-proxy's
            families = {ip.version for ip in svc.cluster_ips}
            outside += [
                (NODE_PORT, a, sp.node_port)
                for a in node.node_port_addresses
                if a.version in families
            ]
        outside += [(EXTERNAL_IP, a, sp.port) for a in svc.external_ips]
        if svc.type == "LoadBalancer":
            outside += [(LOAD_BALANCER, a, sp.port) for a in svc.load_balancer_ips]
        for kind, address, port in outside:
            ranges = svc.load_balancer_source_ranges if kind == LOAD_BALANCER else ()
            key = FrontendKey(address, port, sp.protocol)
            add(Frontend(key, svc.ref, sp.name, kind, backends, local_policy, False, ranges))
            if local_policy:
                twin = FrontendKey(address, port, sp.protocol, SCOPE_EXTERNAL)
                empty = not local and bool(backends)
                add(Frontend(twin, svc.ref, sp.name, kind, local, True, empty, ranges))
    return plan


def diff(old: Mapping[FrontendKey, Frontend], new: Mapping[FrontendKey, Frontend]) -> PlanDiff:
    out = PlanDiff()
    out.removals = [key for key in old if key not in new]
    out.upserts = [fe for key, fe in new.items() if old.get(key) != fe]
    return out


class Planner:
    """The last plan of every service, and which service owns each frontend."""

    def __init__(self) -> None:
        self.plans: dict[ServiceRef, dict[FrontendKey, Frontend]] = {}
        self.owner: dict[FrontendKey, ServiceRef] = {}
        self.conflicts: dict[ServiceRef, str] = {}
        self.node = NodeContext()

    def set_node(self, table: ServiceTable, node: NodeContext) -> PlanDiff:
        """The node's name or addresses changed: re-plan the services that use them."""
        if node == self.node:
            return PlanDiff()
        renamed = node.name != self.node.name
        self.node = node
        refs = [
            ref
            for ref, svc in table.services.items()
            if svc.type != "ClusterIP" or (renamed and svc.external_traffic_policy == "Local")
        ]
        return self.update(table, refs)

    def frontends(self) -> dict[FrontendKey, Frontend]:
        return {key: fe for plan in self.plans.values() for key, fe in plan.items()}

    def update(self, table: ServiceTable, refs: Iterable[ServiceRef]) -> PlanDiff:
        """Re-plan the given services against the table; return what changed."""
        out = PlanDiff()
        todo = sorted(set(refs))
        self._update(table, todo, out)
        # A removed frontend may be the one a conflicting service was waiting
        # for, including one planned in this very batch before it was freed.
        waiting = sorted(self.conflicts)
        if out.removals and waiting:
            self._update(table, waiting, out)
        return out

    def _update(self, table: ServiceTable, refs: Iterable[ServiceRef], out: PlanDiff) -> None:
        for ref in refs:
            svc = table.services.get(ref)
            new = plan_service(svc, table.slices_of(ref), self.node) if svc else {}
            new = self._claim(ref, new)
            part = diff(self.plans.get(ref, {}), new)
            for key in part.removals:
                self.owner.pop(key, None)
            out.removals += part.removals
            out.upserts += part.upserts
            if new:
                self.plans[ref] = new
            else:
                self.plans.pop(ref, None)

    def _claim(
        self, ref: ServiceRef, plan: dict[FrontendKey, Frontend]
    ) -> dict[FrontendKey, Frontend]:
        """Keep only frontends no other service holds; report the others."""
        kept: dict[FrontendKey, Frontend] = {}
        clashes = []
        for key, fe in plan.items():
            holder = self.owner.setdefault(key, ref)
            if holder == ref:
                kept[key] = fe
            else:
                clashes.append(f"{key} is already served by Service {holder}")
        if clashes:
            message = "; ".join(clashes) + ": give this Service another address or port"
            if self.conflicts.get(ref) != message:
                log.error("Service %s: %s", ref, message)
            self.conflicts[ref] = message
        else:
            self.conflicts.pop(ref, None)
        return kept
