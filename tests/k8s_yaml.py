"""Building Service and EndpointSlice manifests for tests."""

from __future__ import annotations

import os
from collections.abc import Iterable
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
    nodes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """nodes: address -> nodeName (default "node" for every endpoint)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service_name}-{suffix}",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports],
        "endpoints": [
            {
                "addresses": [a],
                "conditions": {"ready": ready},
                "nodeName": (nodes or {}).get(a, "node"),
            }
            for a in addresses
        ],
    }


def write(path: Path, *objects: dict[str, Any]) -> None:
    """Write a multi-document file atomically (as editors and kubectl tools do)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    os.replace(tmp, path)
