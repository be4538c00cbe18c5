"""Kubernetes Service and EndpointSlice objects (plain dicts) into the model.

Both sources use these parsers: the manifest directory hands them YAML
documents, the informer hands them decoded API JSON.  Validation follows the
API's own rules where lbctl depends on them (types, names, addresses, ports;
lbctl/sources/fields.py reads each field); every failure names the field and the
fix, and shows the value cut short.  lbctl's own annotations (scheduler, weights) never make an
object unusable: a bad value is logged, once per version of the object, and
the default is used.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from lbctl.model import (
    SCHEDULER_ANNOTATION,
    SCHEDULERS,
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
from lbctl.sources import fields
from lbctl.sources.fields import InvalidObject

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SOURCE_RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"
ZONE_LABEL = "topology.kubernetes.io/zone"
WEIGHTS_ANNOTATION = "lbctl.io/weights"  # on a slice: "10.244.1.5=3,10.244.1.6=1"
WEIGHT_ANNOTATION = "lbctl.io/weight"  # on a slice: "3", for each of its endpoints
MAX_WEIGHT = 100
SESSION_AFFINITIES = ("None", "ClientIP")
TRAFFIC_POLICIES = ("Cluster", "Local")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")

__all__ = ["Ignored", "InvalidObject", "meta_ref", "parse_checked"]  # InvalidObject: fields'


class Ignored(Exception):
    """An object lbctl deliberately leaves alone (headless, ExternalName...)."""


T = TypeVar("T")
_KINDS = {"parse_service": "Service", "parse_endpoint_slice": "EndpointSlice", "parse_node": "Node"}


def parse_checked(parser: Callable[[Mapping[str, Any]], T], obj: Mapping[str, Any]) -> T:
    """Run a parser; any failure of it is the object's fault, never the agent's.

    Raises Ignored as it comes, and every other parser error as InvalidObject.
    What the parser read leniently (an IPv4 address with leading zeros) is
    logged as a warning that names the object.
    """
    found: list[str] = []
    token = fields.notes.set(found)
    try:
        parsed = parser(obj)
    except (Ignored, InvalidObject):
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as err:
        message = (
            fields.show(str(err)) if not isinstance(err, RecursionError) else "nested too deep"
        )
        raise InvalidObject(f"malformed object ({type(err).__name__}: {message})") from err
    finally:
        fields.notes.reset(token)
    if found:
        kind = _KINDS.get(getattr(parser, "__name__", ""), "object")
        namespace, name = meta_ref(obj)
        where = f"{kind} {name}" if kind == "Node" else f"{kind} {namespace}/{name}"
        for note in found:
            log.warning("%s: %s", where, note)
    return parsed


def meta_ref(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name) of any object, for error messages too: a value that is
    not a printable string is shown (bounded and escaped), never converted whole."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return ("default", "")
    namespace, name = meta.get("namespace") or "default", meta.get("name") or ""
    return _printable(namespace), _printable(name)


def _printable(value: Any) -> str:
    """A name as it may appear in a log line: one with a newline or other control
    characters (or that is no string) is shown quoted and escaped, so no name can
    forge a line of its own."""
    if isinstance(value, str) and value.isprintable() and len(value) <= 253:
        return value
    return fields.show(value)


def _name(obj: Mapping[str, Any], rule: str) -> tuple[str, str]:
    meta = fields.mapping(obj.get("metadata"), "metadata")
    if not meta.get("name"):
        raise InvalidObject("metadata.name: missing")
    name = fields.name(meta.get("name"), "metadata.name", rule)
    namespace = fields.name(meta.get("namespace") or "default", "metadata.namespace", "label")
    return namespace, name


def parse_service(obj: Mapping[str, Any]) -> Service:
    namespace, name = _name(obj, "service")
    meta = fields.mapping(obj.get("metadata"), "metadata")
    spec = fields.mapping(obj.get("spec"), "spec")
    svc_type = fields.text(spec.get("type"), "spec.type", default="ClusterIP")
    if svc_type == "ExternalName":
        raise Ignored("type ExternalName has no proxy rules")
    if svc_type not in SERVICE_TYPES:
        raise InvalidObject(f"spec.type: unknown Service type {fields.show(svc_type)}")
    labels = fields.string_map(meta.get("labels"), "metadata.labels")
    if "service.kubernetes.io/service-proxy-name" in labels:
        raise Ignored("labelled service.kubernetes.io/service-proxy-name: another proxy owns it")

    raw_ips = fields.listing(spec.get("clusterIPs"), "spec.clusterIPs") or (
        [spec["clusterIP"]] if spec.get("clusterIP") else []
    )
    if any(ip == "None" for ip in raw_ips):
        raise Ignored("headless (clusterIP: None)")
    if not raw_ips:
        raise InvalidObject("spec.clusterIP: missing (set the address the Service answers on)")
    cluster_ips = tuple(fields.ip(ip, f"spec.clusterIPs[{i}]") for i, ip in enumerate(raw_ips))

    ports = []
    seen: set[tuple[int, Protocol]] = set()
    raw_ports = fields.listing(spec.get("ports"), "spec.ports")
    if not raw_ports:
        raise InvalidObject("spec.ports: a Service needs at least one port")
    for i, raw in enumerate(raw_ports):
        field = f"spec.ports[{i}]"
        raw = fields.mapping(raw, field)
        protocol = fields.protocol(raw.get("protocol"), f"{field}.protocol")
        number = fields.port(raw.get("port"), f"{field}.port")
        if (number, protocol) in seen:
            raise InvalidObject(f"{field}: duplicate port {number}/{protocol.name}")
        seen.add((number, protocol))
        node_port = raw.get("nodePort")
        if type(node_port) is int and node_port == 0:
            node_port = None  # the API's "none allocated"
        ports.append(
            ServicePort(
                name=fields.port_name(raw.get("name"), f"{field}.name"),
                protocol=protocol,
                port=number,
                node_port=None
                if node_port is None
                else fields.port(node_port, f"{field}.nodePort"),
            )
        )
    if len(ports) > 1 and any(not p.name for p in ports):
        raise InvalidObject("spec.ports: every port of a multi-port Service needs a name")
    names = [p.name for p in ports]
    if len(set(names)) != len(names):
        raise InvalidObject("spec.ports: two ports have the same name; give each its own")

    status = fields.mapping(obj.get("status"), "status")
    lb = fields.mapping(status.get("loadBalancer"), "status.loadBalancer")
    lb_ips = []
    for i, raw in enumerate(fields.listing(lb.get("ingress"), "status.loadBalancer.ingress")):
        field = f"status.loadBalancer.ingress[{i}]"
        address = fields.mapping(raw, field).get("ip")
        if address:
            lb_ips.append(fields.ip(address, f"{field}.ip"))
    session_affinity = fields.text(spec.get("sessionAffinity"), "spec.sessionAffinity", "None")
    if session_affinity not in SESSION_AFFINITIES:
        raise InvalidObject(
            f"spec.sessionAffinity: {fields.show(session_affinity)} is not None or ClientIP"
        )
    affinity = fields.mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
    client_ip = fields.mapping(affinity.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
    annotations = fields.string_map(meta.get("annotations"), "metadata.annotations")
    health = spec.get("healthCheckNodePort")
    return Service(
        ref=ServiceRef(namespace, name),
        type=svc_type,
        cluster_ips=cluster_ips,
        ports=tuple(ports),
        external_ips=tuple(
            fields.ip(ip, f"spec.externalIPs[{i}]")
            for i, ip in enumerate(fields.listing(spec.get("externalIPs"), "spec.externalIPs"))
        ),
        load_balancer_ips=tuple(lb_ips),
        session_affinity=session_affinity,
        affinity_timeout_s=_timeout(client_ip.get("timeoutSeconds")),
        external_traffic_policy=_policy(spec, "externalTrafficPolicy"),
        internal_traffic_policy=_policy(spec, "internalTrafficPolicy"),
        annotations=tuple(sorted(annotations.items())),
        load_balancer_source_ranges=_source_ranges(spec, annotations),
        health_check_node_port=None
        if not health
        else fields.port(health, "spec.healthCheckNodePort"),
        scheduler=_scheduler(f"Service {namespace}/{name}", annotations),
    )


def _policy(spec: Mapping[str, Any], key: str) -> str:
    value = fields.text(spec.get(key), f"spec.{key}", default="Cluster")
    if value not in TRAFFIC_POLICIES:
        raise InvalidObject(f"spec.{key}: {fields.show(value)} is not Cluster or Local")
    return value


def _scheduler(name: str, annotations: Mapping[str, str]) -> str | None:
    """The Service's own scheduler; None (the cluster default) when unset or unknown."""
    value = annotations.get(SCHEDULER_ANNOTATION)
    if value is None:
        return None
    if value in SCHEDULERS:
        return value
    log.error(
        "%s: metadata.annotations[%s]: unknown scheduler %s (valid: %s); using the cluster default",
        name,
        SCHEDULER_ANNOTATION,
        fields.show(value),
        ", ".join(SCHEDULERS),
    )
    return None


def _source_ranges(
    spec: Mapping[str, Any], annotations: Mapping[str, str]
) -> tuple[IPNetwork, ...]:
    """spec.loadBalancerSourceRanges, or the older annotation when the field is empty.

    Surrounding blanks are tolerated, as kube-proxy tolerates them; a range with
    host bits set is refused, as the API refuses it.
    """
    field = "spec.loadBalancerSourceRanges"
    raw: list[Any] = fields.listing(spec.get("loadBalancerSourceRanges"), field)
    if not raw and annotations.get(SOURCE_RANGES_ANNOTATION):
        field = f"metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"
        raw = annotations[SOURCE_RANGES_ANNOTATION].split(",")
    return tuple(fields.network(text, f"{field}[{i}]") for i, text in enumerate(raw))


def _timeout(value: Any) -> int:
    field = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
    if value is None:
        return 10800  # the API's default, 3 hours
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 86400:
        raise InvalidObject(f"{field}: {fields.show(value)} is not a number of seconds in 1-86400")
    return value


def parse_endpoint_slice(obj: Mapping[str, Any]) -> EndpointSlice:
    namespace, name = _name(obj, "subdomain")
    meta = fields.mapping(obj.get("metadata"), "metadata")
    labels = fields.string_map(meta.get("labels"), "metadata.labels")
    service_name = labels.get(SERVICE_NAME_LABEL)
    if not service_name:
        raise InvalidObject(
            f"metadata.labels: missing {SERVICE_NAME_LABEL} (the Service this slice belongs to)"
        )
    fields.name(service_name, f"metadata.labels[{SERVICE_NAME_LABEL}]", "service")
    address_type = obj.get("addressType")
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise InvalidObject(f"addressType: {fields.show(address_type)} is not IPv4, IPv6 or FQDN")

    ports = []
    for i, raw in enumerate(fields.listing(obj.get("ports"), "ports")):
        field = f"ports[{i}]"
        raw = fields.mapping(raw, field)
        ports.append(
            EndpointPort(
                name=fields.port_name(raw.get("name"), f"{field}.name"),
                protocol=fields.protocol(raw.get("protocol"), f"{field}.protocol"),
                port=fields.port(raw.get("port"), f"{field}.port"),
            )
        )

    endpoints = []
    want_version = {"IPv4": 4, "IPv6": 6}.get(address_type)
    for i, raw in enumerate(fields.listing(obj.get("endpoints"), "endpoints")):
        field = f"endpoints[{i}]"
        raw = fields.mapping(raw, field)
        addresses = fields.listing(raw.get("addresses"), f"{field}.addresses")
        if not addresses:
            raise InvalidObject(f"{field}.addresses: an endpoint needs an address")
        if want_version is None:
            continue  # FQDN endpoints carry names, which a proxy cannot use
        parsed = tuple(fields.ip(a, f"{field}.addresses[{j}]") for j, a in enumerate(addresses))
        for j, ip in enumerate(parsed):
            if ip.version != want_version:
                raise InvalidObject(
                    f"{field}.addresses[{j}]: {ip} is not an {address_type} address"
                )
        conditions = fields.mapping(raw.get("conditions"), f"{field}.conditions")
        hints = fields.mapping(raw.get("hints"), f"{field}.hints")
        zone_hints = []
        for j, h in enumerate(fields.listing(hints.get("forZones"), f"{field}.hints.forZones")):
            zone = fields.mapping(h, f"{field}.hints.forZones[{j}]").get("name")
            if zone:
                zone_hints.append(fields.text(zone, f"{field}.hints.forZones[{j}].name"))
        endpoints.append(
            Endpoint(
                addresses=parsed,
                ready=fields.flag(conditions.get("ready"), f"{field}.conditions.ready", True),
                serving=fields.flag(conditions.get("serving"), f"{field}.conditions.serving", True),
                terminating=fields.flag(
                    conditions.get("terminating"), f"{field}.conditions.terminating", False
                ),
                node_name=fields.optional_text(raw.get("nodeName"), f"{field}.nodeName"),
                zone=fields.optional_text(raw.get("zone"), f"{field}.zone"),
                zone_hints=tuple(zone_hints),
            )
        )
    annotations = fields.string_map(meta.get("annotations"), "metadata.annotations")
    if WEIGHT_ANNOTATION in annotations or WEIGHTS_ANNOTATION in annotations:
        endpoints = _weighted(f"EndpointSlice {namespace}/{name}", annotations, endpoints)
    return EndpointSlice(
        namespace=namespace,
        name=name,
        service_name=service_name,
        address_type=address_type,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        annotations=tuple(sorted(annotations.items())),
    )


def _weighted(
    name: str, annotations: Mapping[str, str], endpoints: list[Endpoint]
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
        text = annotations[WEIGHT_ANNOTATION].strip()
        weight = _weight(text)
        if weight is None:
            report(WEIGHT_ANNOTATION, [fields.show(text)])
        default = weight or 1
    own: dict[IPAddress, int] = {}
    bad: list[str] = []
    for entry in annotations.get(WEIGHTS_ANNOTATION, "").split(","):
        address, sep, value = (part.strip() for part in entry.partition("="))
        if not address and not sep:
            continue  # blank entries ("a=1,,b=2", a trailing comma) are harmless
        weight = _weight(value)
        try:
            ip = fields.ip(address, WEIGHTS_ANNOTATION)
        except InvalidObject:
            bad.append(f"{fields.show(entry.strip())} (not ADDRESS=WEIGHT)")
            continue
        if weight is None:
            bad.append(fields.show(entry.strip()))
        own[ip] = weight or 1
    if bad:
        report(WEIGHTS_ANNOTATION, bad)
    out = []
    for ep in endpoints:
        weight = next((own[a] for a in ep.addresses if a in own), default)
        out.append(dataclasses.replace(ep, weight=weight) if weight != 1 else ep)
    return out


def _weight(text: str) -> int | None:
    if not (text.isascii() and text.isdigit()) or len(text) > 3 or not 1 <= int(text) <= MAX_WEIGHT:
        return None
    return int(text)


def parse_node(obj: Mapping[str, Any]) -> Node:
    meta = fields.mapping(obj.get("metadata"), "metadata")
    if not meta.get("name"):
        raise InvalidObject("metadata.name: missing")
    name = fields.name(meta.get("name"), "metadata.name", "subdomain")
    labels = fields.string_map(meta.get("labels"), "metadata.labels")
    status = fields.mapping(obj.get("status"), "status")
    addresses = []
    for i, raw in enumerate(fields.listing(status.get("addresses"), "status.addresses")):
        raw = fields.mapping(raw, f"status.addresses[{i}]")
        if raw.get("type") in ("InternalIP", "ExternalIP"):
            addresses.append(fields.ip(raw.get("address"), f"status.addresses[{i}].address"))
    zone = labels.get(ZONE_LABEL)
    return Node(name, zone or None, tuple(addresses), _pod_cidrs(obj))


def _pod_cidrs(obj: Mapping[str, Any]) -> tuple[IPNetwork, ...]:
    """spec.podCIDRs, or the older single spec.podCIDR: the node's pod ranges."""
    spec = fields.mapping(obj.get("spec"), "spec")
    raw = fields.listing(spec.get("podCIDRs"), "spec.podCIDRs")
    if not raw and spec.get("podCIDR"):
        return (fields.network(spec["podCIDR"], "spec.podCIDR", "10.244.1.0/24"),)
    return tuple(
        fields.network(text, f"spec.podCIDRs[{i}]", "10.244.1.0/24") for i, text in enumerate(raw)
    )
