"""The normalized model: what lbctl knows about Services and their endpoints.

Sources (a manifest directory, the Kubernetes API) turn objects into these
frozen dataclasses; nothing downstream sees a Kubernetes object.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# How a frontend picks the backend of a new flow: the cluster default
# (`scheduler` in the configuration, --scheduler), or a Service's own annotation.
# The sources read the annotation, the plan and the datapaths carry the choice out
# (lbctl/plan/scheduling.py is the reference of each).
SCHEDULERS = ("random", "rr", "wrr", "maglev", "sh", "lc")
SCHEDULER_ANNOTATION = "lbctl.io/scheduler"


class Protocol(enum.Enum):
    TCP = 6
    UDP = 17
    SCTP = 132

    @property
    def number(self) -> int:
        return self.value


@dataclasses.dataclass(frozen=True, order=True)
class ServiceRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclasses.dataclass(frozen=True)
class ServicePort:
    name: str  # "" for a single unnamed port
    protocol: Protocol
    port: int
    node_port: int | None = None


@dataclasses.dataclass(frozen=True)
class Service:
    ref: ServiceRef
    type: str  # ClusterIP, NodePort, LoadBalancer
    cluster_ips: tuple[IPAddress, ...]
    ports: tuple[ServicePort, ...]
    external_ips: tuple[IPAddress, ...] = ()
    load_balancer_ips: tuple[IPAddress, ...] = ()
    session_affinity: str = "None"
    affinity_timeout_s: int = 10800
    external_traffic_policy: str = "Cluster"
    internal_traffic_policy: str = "Cluster"
    annotations: tuple[tuple[str, str], ...] = ()
    load_balancer_source_ranges: tuple[IPNetwork, ...] = ()
    health_check_node_port: int | None = None
    scheduler: str | None = None  # from the lbctl.io/scheduler annotation; None: the default


@dataclasses.dataclass(frozen=True)
class EndpointPort:
    name: str
    protocol: Protocol
    port: int


@dataclasses.dataclass(frozen=True)
class Endpoint:
    addresses: tuple[IPAddress, ...]
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    zone_hints: tuple[str, ...] = ()  # hints.forZones
    weight: int = 1  # 1-100, from the slice's lbctl.io/weights or lbctl.io/weight annotation


@dataclasses.dataclass(frozen=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str
    address_type: str  # IPv4, IPv6, FQDN
    ports: tuple[EndpointPort, ...]
    endpoints: tuple[Endpoint, ...]
    annotations: tuple[tuple[str, str], ...] = ()

    @property
    def service(self) -> ServiceRef:
        return ServiceRef(self.namespace, self.service_name)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclasses.dataclass(frozen=True)
class Node:
    """The node lbctl runs on, as the API describes it."""

    name: str
    zone: str | None = None
    addresses: tuple[IPAddress, ...] = ()  # InternalIP and ExternalIP, in the API's order
    pod_cidrs: tuple[IPNetwork, ...] = ()  # spec.podCIDRs: this node's pod ranges


class ServiceTable:
    """Services and EndpointSlices as the sources last reported them.

    Every change returns the services it touched, so callers re-plan only
    those: the cost of a change does not grow with the cluster.
    """

    def __init__(self) -> None:
        self.services: dict[ServiceRef, Service] = {}
        self.slices: dict[tuple[str, str], EndpointSlice] = {}
        self._slices_by_service: dict[ServiceRef, dict[tuple[str, str], EndpointSlice]] = {}
        self.node: Node | None = None

    def set_service(self, svc: Service) -> ServiceRef:
        self.services[svc.ref] = svc
        return svc.ref

    def remove_service(self, ref: ServiceRef) -> ServiceRef:
        self.services.pop(ref, None)
        return ref

    def set_slice(self, eps: EndpointSlice) -> set[ServiceRef]:
        touched = self.remove_slice(eps.key)
        self.slices[eps.key] = eps
        self._slices_by_service.setdefault(eps.service, {})[eps.key] = eps
        touched.add(eps.service)
        return touched

    def remove_slice(self, key: tuple[str, str]) -> set[ServiceRef]:
        old = self.slices.pop(key, None)
        if old is None:
            return set()
        group = self._slices_by_service.get(old.service, {})
        group.pop(key, None)
        if not group:
            self._slices_by_service.pop(old.service, None)
        return {old.service}

    def slices_of(self, ref: ServiceRef) -> Iterable[EndpointSlice]:
        return self._slices_by_service.get(ref, {}).values()
