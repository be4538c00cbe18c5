"""Building Service, EndpointSlice and Node manifests for tests."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml


def service(
    name: str,
    cluster_ip: str,
    ports: Iterable[tuple[str, str, int]],
    namespace: str = "test",
    **spec: Any,
) -> dict[str, Any]:
    """ports: (name, protocol, port)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports],
            **spec,
        },
    }


def endpoint_slice(
    service_name: str,
    addresses: Iterable[str],
    ports: Iterable[tuple[str, str, int]],
    namespace: str = "test",
    suffix: str = "1",
    ready: bool = True,
    nodes: Mapping[str, str | None] | None = None,
    conditions: dict[str, dict[str, bool]] | None = None,
    hints: dict[str, list[str]] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """nodes: address -> nodeName (default "node" for every endpoint; None: no
    nodeName, as the `kubernetes` Service's endpoints have none); conditions:
    address -> its conditions (default {"ready": ready}); hints: address -> the
    zones of its hints.forZones (default none)."""
    endpoints = []
    for a in addresses:
        endpoint: dict[str, Any] = {
            "addresses": [a],
            "conditions": (conditions or {}).get(a, {"ready": ready}),
        }
        node_name = (nodes or {}).get(a, "node")
        if node_name is not None:
            endpoint["nodeName"] = node_name
        if hints and a in hints:
            endpoint["hints"] = {"forZones": [{"name": zone} for zone in hints[a]]}
        endpoints.append(endpoint)
    metadata: dict[str, Any] = {
        "name": f"{service_name}-{suffix}",
        "namespace": namespace,
        "labels": {"kubernetes.io/service-name": service_name},
    }
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": metadata,
        "addressType": "IPv4",
        "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports],
        "endpoints": endpoints,
    }


# Endpoint conditions, as the API reports them.
READY = {"ready": True, "serving": True, "terminating": False}
TERMINATING = {"ready": False, "serving": True, "terminating": True}  # still serving
GONE = {"ready": False, "serving": False, "terminating": True}  # terminating, no longer serving


def node(
    name: str,
    zone: str | None = None,
    addresses: Iterable[str] = (),
    pod_cidrs: Iterable[str] = (),
) -> dict[str, Any]:
    """A Node, with its topology.kubernetes.io/zone label when `zone` is given and
    the pod ranges the node controller gave it (spec.podCIDRs) when any."""
    labels = {"topology.kubernetes.io/zone": zone} if zone else {}
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]},
    }
    cidrs = list(pod_cidrs)
    if cidrs:
        obj["spec"] = {"podCIDR": cidrs[0], "podCIDRs": cidrs}
    return obj


def write(path: Path, *objects: dict[str, Any]) -> None:
    """Write a multi-document file atomically (as editors and kubectl tools do)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    os.replace(tmp, path)
