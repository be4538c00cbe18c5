"""The plan: from the model to the frontends and backends the datapath holds.

`plan_service` is a pure function of one Service and its EndpointSlices.
`Planner` keeps the last plan of every service, so a change re-plans only
the services it touched and hands the datapath a diff of just those
frontends: one endpoint change costs the same whatever the cluster's size.

Which endpoints a frontend may use follows kube-proxy's CategorizeEndpoints
(pkg/proxy/topology.go), see `eligible`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

from lbctl.model import (
    Endpoint,
    EndpointSlice,
    IPAddress,
    IPNetwork,
    Protocol,
    Service,
    ServicePort,
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
    weight: int = 1  # 1-100, from the slice's lbctl.io/weights or lbctl.io/weight

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
    `drop_empty`: no backend here though the Service has some elsewhere (the
    SCOPE_EXTERNAL twin, or a ClusterIP of internalTrafficPolicy Local), so new
    flows are dropped (kube-proxy drops, where no endpoints at all rejects).
    `scheduler`: one of SCHEDULERS; `affinity_timeout`: seconds a client keeps
    its backend (sessionAffinity ClientIP), 0 for no affinity.
    """

    key: FrontendKey
    service: ServiceRef
    port_name: str
    kind: str  # CLUSTER_IP, NODE_PORT, LOAD_BALANCER, EXTERNAL_IP
    backends: tuple[Backend, ...]
    local: bool = False
    drop_empty: bool = False
    source_ranges: tuple[IPNetwork, ...] = ()
    scheduler: str = "random"
    affinity_timeout: int = 0


@dataclasses.dataclass(frozen=True)
class NodeContext:
    """What plans need to know about the node lbctl runs on."""

    name: str | None = None
    node_port_addresses: tuple[IPAddress, ...] = ()  # where NodePorts answer
    zone: str | None = None  # its topology.kubernetes.io/zone label, for topology hints


@dataclasses.dataclass
class PlanDiff:
    upserts: list[Frontend] = dataclasses.field(default_factory=list)
    removals: list[FrontendKey] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.upserts or self.removals)


@dataclasses.dataclass(frozen=True)
class Eligible:
    """The endpoints of one Service port that may receive new flows, on this node.

    kube-proxy's CategorizeEndpoints: `cluster` for ClusterIPs (unless
    internalTrafficPolicy is Local) and for everyone but outside clients on
    the other frontends (all of them, unless externalTrafficPolicy is Local);
    `local` for the rest. `usable`: some endpoint anywhere is ready, or
    serving and terminating; a frontend with no backend here then drops
    instead of rejecting.
    """

    cluster: tuple[Backend, ...]
    local: tuple[Backend, ...]
    usable: bool


def eligible(
    port_name: str, protocol: Protocol, slices: Iterable[EndpointSlice], node: NodeContext
) -> Eligible:
    """Endpoints of a service port, merged across slices, deduplicated, sorted,
    and sorted into kube-proxy's categories:

    - cluster: the ready endpoints, only those hinted for this node's zone when
      topology can be used (`_use_topology`); if there are none, every endpoint
      that is serving and terminating (whatever its zone);
    - local (on this node): the ready ones; if none is, the serving and
      terminating ones.
    """
    found: dict[tuple[IPAddress, int], tuple[Backend, Endpoint]] = {}
    for eps in sorted(slices, key=_slice_name):
        if eps.address_type != "IPv4":
            continue  # IPv6 frontends are not programmed yet
        for ep_port in eps.ports:
            if ep_port.name != port_name or ep_port.protocol != protocol:
                continue
            for ep in eps.endpoints:
                # Every address of an endpoint is fungible; proxies use the first.
                spot = (ep.addresses[0], ep_port.port)
                seen = found.get(spot)
                if seen is not None and _usability(seen[1]) >= _usability(ep):
                    continue  # the same endpoint in two slices: the more usable copy
                backend = Backend(
                    ep.addresses[0],
                    ep_port.port,
                    protocol,
                    ep.ready,
                    ep.serving,
                    ep.terminating,
                    ep.weight,
                )
                found[spot] = (backend, ep)
    ordered = sorted(found.values(), key=_pair_order)
    ready = [pair for pair in ordered if pair[1].ready]
    fallback = [pair for pair in ordered if _serving_terminating(pair[1])]
    cluster = ready
    if node.zone is not None and _use_topology(ready, node.zone):
        cluster = [pair for pair in ready if node.zone in pair[1].zone_hints]
    here = node.name
    local = [pair for pair in ready if here is not None and pair[1].node_name == here]
    if not local:
        local = [pair for pair in fallback if here is not None and pair[1].node_name == here]
    return Eligible(
        cluster=tuple(b for b, _ in cluster or fallback),
        local=tuple(b for b, _ in local),
        usable=bool(ready or fallback),
    )


def _use_topology(ready: list[tuple[Backend, Endpoint]], zone: str) -> bool:
    """kube-proxy's canUseTopology: the node has a zone (checked by the caller),
    every ready endpoint has a zone hint, and one is hinted for this zone."""
    hinted_here = False
    for _, ep in ready:
        if not ep.zone_hints:
            return False
        hinted_here = hinted_here or zone in ep.zone_hints
    return hinted_here


def _serving_terminating(ep: Endpoint) -> bool:
    return ep.serving and ep.terminating


def _usability(ep: Endpoint) -> int:
    return 2 if ep.ready else 1 if _serving_terminating(ep) else 0


def _slice_name(eps: EndpointSlice) -> str:
    return eps.name


def _pair_order(pair: tuple[Backend, Endpoint]) -> tuple[int, int, int]:
    return _backend_order(pair[0])


def _backend_order(b: Backend) -> tuple[int, int, int]:
    return (b.address.version, int(b.address), b.port)


def plan_service(
    svc: Service,
    slices: Iterable[EndpointSlice],
    node: NodeContext | None = None,
    scheduler: str = "random",
) -> dict[FrontendKey, Frontend]:
    """The frontends one Service needs, each with its eligible backends.

    `scheduler` is the cluster default, for Services without a valid
    lbctl.io/scheduler annotation of their own.
    """
    node = node or NodeContext()
    slices = list(slices)
    plan: dict[FrontendKey, Frontend] = {}

    local_policy = svc.external_traffic_policy == "Local"
    internal_local = svc.internal_traffic_policy == "Local"
    chosen = svc.scheduler or scheduler
    affinity = svc.affinity_timeout_s if svc.session_affinity == "ClientIP" else 0

    def add(
        key: FrontendKey,
        sp: ServicePort,
        kind: str,
        backends: tuple[Backend, ...],
        local: bool = False,
        drop_empty: bool = False,
        source_ranges: tuple[IPNetwork, ...] = (),
    ) -> None:
        if key.address.version != 4:
            return  # the datapath balances IPv4 so far
        plan[key] = Frontend(
            key,
            svc.ref,
            sp.name,
            kind,
            backends,
            local,
            drop_empty,
            source_ranges,
            scheduler=chosen,
            affinity_timeout=affinity,
        )

    for sp in svc.ports:
        if sp.protocol is Protocol.SCTP:
            continue  # the datapath balances TCP and UDP
        ok = eligible(sp.name, sp.protocol, slices, node)
        # ClusterIPs are internal: internalTrafficPolicy Local gives them this
        # node's endpoints only, and drops when those are elsewhere
        internal = ok.local if internal_local else ok.cluster
        internal_drop = internal_local and not ok.local and ok.usable
        for vip in svc.cluster_ips:
            add(
                FrontendKey(vip, sp.port, sp.protocol),
                sp,
                CLUSTER_IP,
                internal,
                False,
                internal_drop,
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
            # pods and the node's processes use the cluster endpoints, even under
            # externalTrafficPolicy Local (kube-proxy's short-circuit) ...
            key = FrontendKey(address, port, sp.protocol)
            add(key, sp, kind, ok.cluster, local_policy, False, ranges)
            if local_policy:  # ... outside clients this node's, through the twin
                twin = FrontendKey(address, port, sp.protocol, SCOPE_EXTERNAL)
                empty = not ok.local and ok.usable
                add(twin, sp, kind, ok.local, True, empty, ranges)
    return plan


def diff(old: Mapping[FrontendKey, Frontend], new: Mapping[FrontendKey, Frontend]) -> PlanDiff:
    out = PlanDiff()
    out.removals = [key for key in old if key not in new]
    out.upserts = [fe for key, fe in new.items() if old.get(key) != fe]
    return out


class Planner:
    """The last plan of every service, and which service owns each frontend."""

    def __init__(self, scheduler: str = "random") -> None:
        self.plans: dict[ServiceRef, dict[FrontendKey, Frontend]] = {}
        self.owner: dict[FrontendKey, ServiceRef] = {}
        self.conflicts: dict[ServiceRef, str] = {}
        self.node = NodeContext()
        self.scheduler = scheduler  # the cluster default, one of SCHEDULERS

    def set_node(self, table: ServiceTable, node: NodeContext) -> PlanDiff:
        """The node's name, addresses or zone changed: re-plan the services that use them."""
        if node == self.node:
            return PlanDiff()
        moved = node.node_port_addresses != self.node.node_port_addresses
        renamed = node.name != self.node.name
        rezoned = node.zone != self.node.zone  # rare: every service may have hints
        self.node = node
        refs = [
            ref
            for ref, svc in table.services.items()
            if rezoned
            or (moved and svc.type != "ClusterIP")
            or (renamed and "Local" in (svc.external_traffic_policy, svc.internal_traffic_policy))
        ]
        return self.update(table, refs)

    def set_scheduler(self, table: ServiceTable, scheduler: str) -> PlanDiff:
        """The cluster's default scheduler changed: re-plan the services that use it."""
        if scheduler == self.scheduler:
            return PlanDiff()
        self.scheduler = scheduler
        return self.update(table, [ref for ref, svc in table.services.items() if not svc.scheduler])

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
            new = plan_service(svc, table.slices_of(ref), self.node, self.scheduler) if svc else {}
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
