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
    Protocol,
    Service,
    ServiceRef,
    ServiceTable,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, order=True)
class FrontendKey:
    address: IPAddress
    port: int
    protocol: Protocol

    def __str__(self) -> str:
        return f"{self.address}:{self.port}/{self.protocol.name}"


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
    key: FrontendKey
    service: ServiceRef
    port_name: str
    kind: str  # ClusterIP for now; NodePort, LoadBalancer, ExternalIP later
    backends: tuple[Backend, ...]


@dataclasses.dataclass
class PlanDiff:
    upserts: list[Frontend] = dataclasses.field(default_factory=list)
    removals: list[FrontendKey] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.upserts or self.removals)


def _backends(
    svc: Service, port_name: str, protocol: Protocol, slices: Iterable[EndpointSlice]
) -> tuple[Backend, ...]:
    """Ready endpoints of a service port, merged across slices, deduplicated."""
    found: dict[tuple[IPAddress, int], Backend] = {}
    for eps in slices:
        if eps.address_type != "IPv4":
            continue  # IPv6 frontends are not programmed yet
        for ep_port in eps.ports:
            if ep_port.name != port_name or ep_port.protocol != protocol:
                continue
            for ep in eps.endpoints:
                if not ep.ready:
                    continue
                # Every address of an endpoint is fungible; proxies use the first.
                backend = Backend(
                    ep.addresses[0], ep_port.port, protocol, ep.ready, ep.serving, ep.terminating
                )
                found.setdefault((backend.address, backend.port), backend)
    return tuple(sorted(found.values(), key=_backend_order))


def _backend_order(b: Backend) -> tuple[int, int, int]:
    return (b.address.version, int(b.address), b.port)


def plan_service(svc: Service, slices: Iterable[EndpointSlice]) -> dict[FrontendKey, Frontend]:
    """The frontends one Service needs, each with its eligible backends."""
    slices = list(slices)
    plan: dict[FrontendKey, Frontend] = {}
    for sp in svc.ports:
        if sp.protocol is Protocol.SCTP:
            continue  # the datapath balances TCP and UDP
        backends = _backends(svc, sp.name, sp.protocol, slices)
        for vip in svc.cluster_ips:
            if vip.version != 4:
                continue
            key = FrontendKey(vip, sp.port, sp.protocol)
            plan[key] = Frontend(key, svc.ref, sp.name, "ClusterIP", backends)
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
            new = plan_service(svc, table.slices_of(ref)) if svc else {}
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
