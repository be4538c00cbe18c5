"""Kubernetes Service and EndpointSlice objects (plain dicts) into the model.

Both sources use these parsers: the manifest directory hands them YAML
documents, the informer hands them decoded API JSON.  Validation follows the
API's own rules where lbctl depends on them; every failure names the field
and the fix.  lbctl's own annotations (scheduler, weights) never make an
object unusable: a bad value is logged, once per version of the object, and
the default is used.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from lbctl.model import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    IPAddress,
    IPNetwork,
    Node,
    Protocol,
    Service,
    ServicePort,
    ServiceRef,
)
from lbctl.plan import SCHEDULER_ANNOTATION, SCHEDULERS

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SOURCE_RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"
ZONE_LABEL = "topology.kubernetes.io/zone"
WEIGHTS_ANNOTATION = "lbctl.io/weights"  # on a slice: "10.244.1.5=3,10.244.1.6=1"
WEIGHT_ANNOTATION = "lbctl.io/weight"  # on a slice: "3", for each of its endpoints
MAX_WEIGHT = 100
SESSION_AFFINITIES = ("None", "ClientIP")


class InvalidObject(ValueError):
    """An object lbctl cannot use; the message says which field and why."""


class Ignored(Exception):
    """An object lbctl deliberately leaves alone (headless, ExternalName...)."""


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidObject(f"{field}: expected a mapping, got {type(value).__name__}")
    return value


def _list(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidObject(f"{field}: expected a list, got {type(value).__name__}")
    return value


def _ip(value: Any, field: str) -> IPAddress:
    if isinstance(value, str):
        try:  # the common case, four times faster than ipaddress' own parser, as strict
            return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, value))
        except OSError:
            pass
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise InvalidObject(f"{field}: {value!r} is not a valid IP address") from None


def _port(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidObject(f"{field}: {value!r} is not a port number")
    if not 1 <= value <= 65535:
        raise InvalidObject(f"{field}: {value} is out of range (1-65535)")
    return value


def _protocol(value: Any, field: str) -> Protocol:
    name = "TCP" if value is None else value
    try:
        return Protocol[str(name)]
    except KeyError:
        raise InvalidObject(
            f"{field}: unknown protocol {name!r} (expected TCP, UDP or SCTP)"
        ) from None


T = TypeVar("T")


def parse_checked(parser: Callable[[Mapping[str, Any]], T], obj: Mapping[str, Any]) -> T:
    """Run a parser; any failure of it is the object's fault, never the agent's.

    Raises Ignored as it comes, and every other parser error as InvalidObject.
    """
    try:
        return parser(obj)
    except (Ignored, InvalidObject):
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise InvalidObject(f"malformed object ({type(err).__name__}: {err})") from err


def meta_ref(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name) of any object, for error messages too."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return ("default", "")
    return (str(meta.get("namespace") or "default"), str(meta.get("name") or ""))


def _name(obj: Mapping[str, Any]) -> tuple[str, str]:
    namespace, name = meta_ref(obj)
    if not name:
        raise InvalidObject("metadata.name: missing")
    return namespace, name


def parse_service(obj: Mapping[str, Any]) -> Service:
    namespace, name = _name(obj)
    meta = _mapping(obj.get("metadata"), "metadata")
    spec = _mapping(obj.get("spec"), "spec")
    svc_type = str(spec.get("type") or "ClusterIP")
    if svc_type == "ExternalName":
        raise Ignored("type ExternalName has no proxy rules")
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer"):
        raise InvalidObject(f"spec.type: unknown Service type {svc_type!r}")
    labels = _mapping(meta.get("labels"), "metadata.labels")
    if "service.kubernetes.io/service-proxy-name" in labels:
        raise Ignored("labelled service.kubernetes.io/service-proxy-name: another proxy owns it")

    raw_ips = _list(spec.get("clusterIPs"), "spec.clusterIPs") or (
        [spec["clusterIP"]] if spec.get("clusterIP") else []
    )
    if any(str(ip) == "None" for ip in raw_ips):
        raise Ignored("headless (clusterIP: None)")
    if not raw_ips:
        raise InvalidObject("spec.clusterIP: missing (set the address the Service answers on)")
    cluster_ips = tuple(_ip(ip, f"spec.clusterIPs[{i}]") for i, ip in enumerate(raw_ips))

    ports = []
    seen: set[tuple[int, Protocol]] = set()
    raw_ports = _list(spec.get("ports"), "spec.ports")
    if not raw_ports:
        raise InvalidObject("spec.ports: a Service needs at least one port")
    for i, raw in enumerate(raw_ports):
        field = f"spec.ports[{i}]"
        raw = _mapping(raw, field)
        protocol = _protocol(raw.get("protocol"), f"{field}.protocol")
        number = _port(raw.get("port"), f"{field}.port")
        if (number, protocol) in seen:
            raise InvalidObject(f"{field}: duplicate port {number}/{protocol.name}")
        seen.add((number, protocol))
        node_port = raw.get("nodePort")
        ports.append(
            ServicePort(
                name=str(raw.get("name") or ""),
                protocol=protocol,
                port=number,
                node_port=None if node_port is None else _port(node_port, f"{field}.nodePort"),
            )
        )
    if len(ports) > 1 and any(not p.name for p in ports):
        raise InvalidObject("spec.ports: every port of a multi-port Service needs a name")

    status = _mapping(obj.get("status"), "status")
    lb = _mapping(status.get("loadBalancer"), "status.loadBalancer")
    lb_ips = tuple(
        _ip(_mapping(ing, "ingress")["ip"], f"status.loadBalancer.ingress[{i}].ip")
        for i, ing in enumerate(_list(lb.get("ingress"), "status.loadBalancer.ingress"))
        if _mapping(ing, "ingress").get("ip")
    )
    session_affinity = str(spec.get("sessionAffinity") or "None")
    if session_affinity not in SESSION_AFFINITIES:
        raise InvalidObject(f"spec.sessionAffinity: {session_affinity!r} is not None or ClientIP")
    affinity = _mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
    client_ip = _mapping(affinity.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
    annotations = _mapping(meta.get("annotations"), "metadata.annotations")
    health = spec.get("healthCheckNodePort")
    return Service(
        ref=ServiceRef(namespace, name),
        type=svc_type,
        cluster_ips=cluster_ips,
        ports=tuple(ports),
        external_ips=tuple(
            _ip(ip, f"spec.externalIPs[{i}]")
            for i, ip in enumerate(_list(spec.get("externalIPs"), "spec.externalIPs"))
        ),
        load_balancer_ips=lb_ips,
        session_affinity=session_affinity,
        affinity_timeout_s=_timeout(client_ip.get("timeoutSeconds")),
        external_traffic_policy=str(spec.get("externalTrafficPolicy") or "Cluster"),
        internal_traffic_policy=str(spec.get("internalTrafficPolicy") or "Cluster"),
        annotations=tuple(sorted((str(k), str(v)) for k, v in annotations.items())),
        load_balancer_source_ranges=_source_ranges(spec, annotations),
        health_check_node_port=None if not health else _port(health, "spec.healthCheckNodePort"),
        scheduler=_scheduler(f"Service {namespace}/{name}", annotations),
    )


def _scheduler(name: str, annotations: Mapping[str, Any]) -> str | None:
    """The Service's own scheduler; None (the cluster default) when unset or unknown."""
    value = annotations.get(SCHEDULER_ANNOTATION)
    if value is None:
        return None
    if str(value) in SCHEDULERS:
        return str(value)
    log.error(
        "%s: metadata.annotations[%s]: unknown scheduler %r (valid: %s); using the cluster default",
        name,
        SCHEDULER_ANNOTATION,
        str(value),
        ", ".join(SCHEDULERS),
    )
    return None


def _source_ranges(
    spec: Mapping[str, Any], annotations: Mapping[str, Any]
) -> tuple[IPNetwork, ...]:
    """spec.loadBalancerSourceRanges, or the older annotation when the field is empty.

    Surrounding blanks are tolerated, as kube-proxy tolerates them; a range with
    host bits set is refused, as the API refuses it.
    """
    field = "spec.loadBalancerSourceRanges"
    raw = [str(r) for r in _list(spec.get(field.split(".")[1]), field)]
    if not raw and annotations.get(SOURCE_RANGES_ANNOTATION):
        field = f"metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"
        raw = str(annotations[SOURCE_RANGES_ANNOTATION]).split(",")
    out = []
    for i, text in enumerate(raw):
        try:
            out.append(ipaddress.ip_network(text.strip()))
        except ValueError:
            raise InvalidObject(
                f"{field}[{i}]: {text.strip()!r} is not a CIDR such as 203.0.113.0/24"
            ) from None
    return tuple(out)


def _timeout(value: Any) -> int:
    field = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
    if value is None:
        return 10800  # the API's default, 3 hours
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 86400:
        raise InvalidObject(f"{field}: {value!r} is not a number of seconds in 1-86400")
    return value


def _condition(conditions: Mapping[str, Any], name: str, default: bool) -> bool:
    value = conditions.get(name)
    return default if value is None else bool(value)


def parse_endpoint_slice(obj: Mapping[str, Any]) -> EndpointSlice:
    namespace, name = _name(obj)
    meta = _mapping(obj.get("metadata"), "metadata")
    labels = _mapping(meta.get("labels"), "metadata.labels")
    service_name = labels.get(SERVICE_NAME_LABEL)
    if not service_name:
        raise InvalidObject(
            f"metadata.labels: missing {SERVICE_NAME_LABEL} (the Service this slice belongs to)"
        )
    address_type = obj.get("addressType")
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise InvalidObject(f"addressType: {address_type!r} is not IPv4, IPv6 or FQDN")

    ports = []
    for i, raw in enumerate(_list(obj.get("ports"), "ports")):
        field = f"ports[{i}]"
        raw = _mapping(raw, field)
        ports.append(
            EndpointPort(
                name=str(raw.get("name") or ""),
                protocol=_protocol(raw.get("protocol"), f"{field}.protocol"),
                port=_port(raw.get("port"), f"{field}.port"),
            )
        )

    endpoints = []
    want_version = {"IPv4": 4, "IPv6": 6}.get(str(address_type))
    for i, raw in enumerate(_list(obj.get("endpoints"), "endpoints")):
        field = f"endpoints[{i}]"
        raw = _mapping(raw, field)
        addresses = _list(raw.get("addresses"), f"{field}.addresses")
        if not addresses:
            raise InvalidObject(f"{field}.addresses: an endpoint needs an address")
        if want_version is None:
            continue  # FQDN endpoints carry names, which a proxy cannot use
        parsed = tuple(_ip(a, f"{field}.addresses[{j}]") for j, a in enumerate(addresses))
        for j, ip in enumerate(parsed):
            if ip.version != want_version:
                raise InvalidObject(
                    f"{field}.addresses[{j}]: {ip} is not an {address_type} address"
                )
        conditions = _mapping(raw.get("conditions"), f"{field}.conditions")
        ready = _condition(conditions, "ready", True)
        hints = _mapping(raw.get("hints"), f"{field}.hints")
        zone_hints = (
            _mapping(h, f"{field}.hints.forZones[{j}]").get("name")
            for j, h in enumerate(_list(hints.get("forZones"), f"{field}.hints.forZones"))
        )
        endpoints.append(
            Endpoint(
                addresses=parsed,
                ready=ready,
                serving=_condition(conditions, "serving", True),
                terminating=_condition(conditions, "terminating", False),
                node_name=raw.get("nodeName"),
                zone=raw.get("zone"),
                zone_hints=tuple(str(z) for z in zone_hints if z),
            )
        )
    annotations = _mapping(meta.get("annotations"), "metadata.annotations")
    if WEIGHT_ANNOTATION in annotations or WEIGHTS_ANNOTATION in annotations:
        endpoints = _weighted(f"EndpointSlice {namespace}/{name}", annotations, endpoints)
    return EndpointSlice(
        namespace=namespace,
        name=name,
        service_name=str(service_name),
        address_type=str(address_type),
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        annotations=tuple(sorted((str(k), str(v)) for k, v in annotations.items())),
    )


def _weighted(
    name: str, annotations: Mapping[str, Any], endpoints: list[Endpoint]
) -> list[Endpoint]:
    """Endpoints with their weights: the address's own in lbctl.io/weights, else the
    slice's lbctl.io/weight, else 1.  A bad value is logged and counts as 1."""

    def report(annotation: str, bad: list[str]) -> None:
        log.error(
            "%s: metadata.annotations[%s]: %s: a weight is a whole number in 1-%d; using 1 instead",
            name,
            annotation,
            ", ".join(bad),
            MAX_WEIGHT,
        )

    default = 1
    if WEIGHT_ANNOTATION in annotations:
        text = str(annotations[WEIGHT_ANNOTATION]).strip()
        weight = _weight(text)
        if weight is None:
            report(WEIGHT_ANNOTATION, [repr(text)])
        default = weight or 1
    own: dict[IPAddress, int] = {}
    bad: list[str] = []
    for entry in str(annotations.get(WEIGHTS_ANNOTATION) or "").split(","):
        address, sep, value = (part.strip() for part in entry.partition("="))
        if not address and not sep:
            continue  # blank entries ("a=1,,b=2", a trailing comma) are harmless
        weight = _weight(value)
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            bad.append(f"{entry.strip()!r} (not ADDRESS=WEIGHT)")
            continue
        if weight is None:
            bad.append(repr(entry.strip()))
        own[ip] = weight or 1
    if bad:
        report(WEIGHTS_ANNOTATION, bad)
    out = []
    for ep in endpoints:
        weight = next((own[a] for a in ep.addresses if a in own), default)
        out.append(dataclasses.replace(ep, weight=weight) if weight != 1 else ep)
    return out


def _weight(text: str) -> int | None:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_WEIGHT:
        return None
    return int(text)


def parse_node(obj: Mapping[str, Any]) -> Node:
    meta = _mapping(obj.get("metadata"), "metadata")
    name = meta.get("name")
    if not name:
        raise InvalidObject("metadata.name: missing")
    labels = _mapping(meta.get("labels"), "metadata.labels")
    status = _mapping(obj.get("status"), "status")
    addresses = []
    for i, raw in enumerate(_list(status.get("addresses"), "status.addresses")):
        raw = _mapping(raw, f"status.addresses[{i}]")
        if raw.get("type") in ("InternalIP", "ExternalIP"):
            addresses.append(_ip(raw.get("address"), f"status.addresses[{i}].address"))
    zone = labels.get(ZONE_LABEL)
    return Node(str(name), str(zone) if zone else None, tuple(addresses), _pod_cidrs(obj))


def _pod_cidrs(obj: Mapping[str, Any]) -> tuple[IPNetwork, ...]:
    """spec.podCIDRs, or the older single spec.podCIDR: the node's pod ranges."""
    spec = _mapping(obj.get("spec"), "spec")
    field = "spec.podCIDRs"
    raw = _list(spec.get("podCIDRs"), field)
    if not raw and spec.get("podCIDR"):
        field, raw = "spec.podCIDR", [spec["podCIDR"]]
    out = []
    for i, text in enumerate(raw):
        try:
            out.append(ipaddress.ip_network(str(text)))
        except ValueError:
            where = field if field == "spec.podCIDR" else f"{field}[{i}]"
            raise InvalidObject(f"{where}: {text!r} is not a CIDR such as 10.244.1.0/24") from None
    return tuple(out)
