"""Services and EndpointSlices shaped as a real cluster writes them.

What kube-apiserver v1.24+ hands a LIST or a WATCH is much more than the
fields lbctl reads: every object carries ``metadata.managedFields`` (one entry
per writer, each a ``fieldsV1`` tree of the fields it set), a uid, a
resourceVersion, a creationTimestamp; a Service made with ``kubectl apply``
carries its whole manifest again in the
``kubectl.kubernetes.io/last-applied-configuration`` annotation and the
defaults the server filled in (``clusterIPs``, ``ipFamilies``,
``ipFamilyPolicy``, ``internalTrafficPolicy``, ``sessionAffinity``,
``status.loadBalancer``); an EndpointSlice made by the EndpointSlice
controller (kube-controller-manager) carries a ``generateName``, a
``generation``, ``ownerReferences`` to its Service, the managed-by label and
the last-change-trigger-time annotation, and per endpoint a ``targetRef`` to
its Pod, ``nodeName``, ``zone`` and ``conditions``.

These builders make such objects for the test API server (tests/apiserver.py)
so that benchmarks and tests pay the real decoding cost.  The shapes follow the
Kubernetes API reference (ObjectMeta, ManagedFieldsEntry, ServiceSpec,
EndpointSlice v1); tests/fixtures/real_list_items.json is the reference object
of each kind and tests/test_apiserver_shapes.py checks that these have the same
keys at every level.  Sizes: about 1.7 KB of JSON per Service and 3.9 KB per
EndpointSlice of 10 endpoints, a little above issue 20's real server (1.3 and
2.8 KB), whose slices had no Pods behind them (no targetRef).
"""

from __future__ import annotations

import ipaddress
import json
import uuid
from typing import Any

Obj = dict[str, Any]

CREATED = "2024-03-04T09:12:31Z"
TRIGGERED = "2024-03-04T09:13:02Z"
APP_LABEL = "app.kubernetes.io/name"
TEAM_LABEL = "team"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"
MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
SERVICE_NAME = "kubernetes.io/service-name"
CONTROLLER = "endpointslice-controller.k8s.io"


def uid_of(*parts: object) -> str:
    """A stable uid for an object (uuid5 of its identity): repeatable test data."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join(str(p) for p in parts)))


def _managed(manager: str, api_version: str, fields: Obj, time: str = CREATED) -> Obj:
    return {
        "manager": manager,
        "operation": "Update",
        "apiVersion": api_version,
        "time": time,
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    }


def _port_key(port: int, protocol: str) -> str:
    return "k:" + json.dumps({"port": port, "protocol": protocol}, separators=(",", ":"))


def service(
    namespace: str,
    name: str,
    cluster_ip: str,
    *,
    port: int = 80,
    target_port: int = 8080,
    port_name: str = "http",
    protocol: str = "TCP",
    team: str = "payments",
) -> Obj:
    """A ClusterIP Service as `kubectl apply` made it, then `kubectl label` touched it."""
    applied = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "annotations": {},
            "labels": {APP_LABEL: name},
            "name": name,
            "namespace": namespace,
        },
        "spec": {
            "ports": [
                {"name": port_name, "port": port, "protocol": protocol, "targetPort": target_port}
            ],
            "selector": {APP_LABEL: name},
        },
    }
    port_fields = {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}
    apply_fields = {
        "f:metadata": {
            "f:annotations": {".": {}, f"f:{LAST_APPLIED}": {}},
            "f:labels": {".": {}, f"f:{APP_LABEL}": {}},
        },
        "f:spec": {
            "f:internalTrafficPolicy": {},
            "f:ports": {".": {}, _port_key(port, protocol): port_fields},
            "f:selector": {},
            "f:sessionAffinity": {},
            "f:type": {},
        },
    }
    label_fields = {"f:metadata": {"f:labels": {f"f:{TEAM_LABEL}": {}}}}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid_of("Service", namespace, name),
            "creationTimestamp": CREATED,
            "labels": {APP_LABEL: name, TEAM_LABEL: team},
            "annotations": {LAST_APPLIED: json.dumps(applied, separators=(",", ":")) + "\n"},
            "managedFields": [
                _managed("kubectl-client-side-apply", "v1", apply_fields),
                _managed("kubectl-label", "v1", label_fields, TRIGGERED),
            ],
        },
        "spec": {
            "ports": [
                {"name": port_name, "protocol": protocol, "port": port, "targetPort": target_port}
            ],
            "selector": {APP_LABEL: name},
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "type": "ClusterIP",
            "sessionAffinity": "None",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
        },
        "status": {"loadBalancer": {}},
    }


def endpoint_slice(
    namespace: str,
    service_name: str,
    addresses: list[str],
    *,
    port: int = 8080,
    port_name: str = "http",
    protocol: str = "TCP",
    suffix: str = "x7k2p",
    team: str = "payments",
    zones: int = 3,
) -> Obj:
    """The EndpointSlice kube-controller-manager keeps for `service_name`'s Pods."""
    owner = uid_of("Service", namespace, service_name)
    fields = {
        "f:addressType": {},
        "f:endpoints": {},  # +listType=atomic: owned whole
        "f:metadata": {
            "f:annotations": {".": {}, f"f:{TRIGGER}": {}},
            "f:generateName": {},
            "f:labels": {
                ".": {},
                f"f:{APP_LABEL}": {},
                f"f:{TEAM_LABEL}": {},
                f"f:{MANAGED_BY}": {},
                f"f:{SERVICE_NAME}": {},
            },
            "f:ownerReferences": {
                ".": {},
                "k:" + json.dumps({"uid": owner}, separators=(",", ":")): {},
            },
        },
        "f:ports": {},
    }
    endpoints = []
    for i, address in enumerate(addresses):
        node = int(ipaddress.IPv4Address(address)) % 97
        pod = f"{service_name}-7d9f8c6b5-{i:05d}"
        endpoints.append(
            {
                "addresses": [address],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "targetRef": {
                    "kind": "Pod",
                    "namespace": namespace,
                    "name": pod,
                    "uid": uid_of("Pod", namespace, pod),
                },
                "nodeName": f"node-{node:03d}",
                "zone": f"zone-{'abcdefgh'[node % zones]}",
            }
        )
    name = f"{service_name}-{suffix}"
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "generateName": f"{service_name}-",
            "namespace": namespace,
            "uid": uid_of("EndpointSlice", namespace, name),
            "generation": 1,
            "creationTimestamp": CREATED,
            "labels": {
                APP_LABEL: service_name,
                TEAM_LABEL: team,
                MANAGED_BY: CONTROLLER,
                SERVICE_NAME: service_name,
            },
            "annotations": {TRIGGER: TRIGGERED},
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": service_name,
                    "uid": owner,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "managedFields": [
                _managed("kube-controller-manager", "discovery.k8s.io/v1", fields, TRIGGERED)
            ],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": port_name, "protocol": protocol, "port": port}],
    }
