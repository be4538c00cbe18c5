"""Malformed and hostile Services, EndpointSlices and Nodes, generated from a seed.

Each `Case` is one object (or, for damage only a file can carry, the raw text of
a manifest) with what is wrong with it and what lbctl must say about it:

- bad: lbctl must refuse it, reporting the object and a reason that contains
  `hint` (the field, or the conflict);
- served: odd but valid, lbctl must use it (an IPv4 address with leading zeros,
  which Kubernetes reads as decimal; 10,000 endpoints in one slice; an unknown
  scheduler annotation, logged and replaced by the default);
- ignored: left alone on purpose (headless, ExternalName, another proxy's).

`api` says whether the test API server can store it (it needs a metadata
mapping with a name, and JSON): the same cases go through the manifests
directory and the API.  Names are unique per case (`h<n>`), except where the
name itself is the damage; addresses are 10.97.x.y, away from the good
Services' 10.96.0.0/24, and NodePorts 31000+, except where a clash is the case.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Callable, Iterator
from typing import Any

Obj = dict[str, Any]
NAMESPACE = "test"
CLASH_VIP, CLASH_PORT, CLASH_NODE_PORT = "10.96.0.10", 80, 30080  # the good `web` Service's


@dataclasses.dataclass
class Case:
    kind: str  # Service, EndpointSlice, Node
    what: str  # the kind of damage, for the figures
    outcome: str  # bad, served, ignored
    hint: str = ""  # what a refusal's reason must contain
    obj: Obj | None = None
    raw: bytes | None = None  # a manifest file's bytes, when the damage needs YAML itself
    api: bool = True
    companions: list[Obj] = dataclasses.field(default_factory=list)  # valid, served with it

    @property
    def name(self) -> str:
        meta = (self.obj or {}).get("metadata")
        value = meta.get("name") if isinstance(meta, dict) else None
        return value if isinstance(value, str) else ""


def service(name: str, ip: str, port: int = 80, **spec: Any) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "ports": [{"name": "http", "protocol": "TCP", "port": port}],
            **spec,
        },
    }


def endpoint_slice(name: str, service_name: str, addresses: list[str]) -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
    }


def node(name: str, addresses: list[str] | None = None) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "status": {
            "addresses": [{"type": "InternalIP", "address": a} for a in addresses or ["10.0.0.1"]]
        },
    }


# Values of the wrong type or shape, for any field.
JUNK: list[Any] = [
    None,
    True,
    0,
    -1,
    2**64,
    1.5,
    float("inf"),
    "",
    "x" * 5000,
    "\x00",
    "ü",
    [],
    [[]],
    [None],
    {},
    {"a": {"b": []}},
]
BAD_IPS = [
    "10.97.0.300",
    "10.97.0",
    "10.97.0.1.5",
    "0x0a.97.0.1",
    "10.97.0.1 ",
    " 10.97.0.1",
    "\uff11\uff10.97.0.1",  # full-width digits
    "10.97.0.1/32",
    "10.97.0.-1",
    "localhost",
    "10.97.0.1\n",
    "1e3.0.0.1",
    "10.97.0.0256",
    "::ffff:zz",
    "fe80::1%eth0",
]
BAD_PORTS: list[Any] = [0, -1, 65536, 2**31, 2**64, 10**30, "80", "http", 80.0, True, None, [80]]
BAD_NAMES: list[Any] = [
    "Web",
    "wéb",
    "服务",
    "web\u200b",
    "web_1",
    "-web",
    "web-",
    "a" * 64,
    "web\nERROR forged log line",
    "web\x00x",
    "😀",
    "web.x",
    "1web",
    12345,
    1.5,
]


def storable(obj: Obj) -> bool:
    """Can the test API server store it (as the real one would need, and more)?"""
    meta = obj.get("metadata")
    return (
        isinstance(meta, dict)
        and isinstance(meta.get("name"), str)
        and bool(meta["name"])
        and isinstance(meta.get("namespace", ""), str)
        and isinstance(meta.get("labels") or {}, dict)
        and all(isinstance(k, str) for k in (meta.get("labels") or {}))
    )


def with_value(obj: Obj, path: str | tuple[str | int, ...], value: Any) -> Obj:
    """A copy of obj with `value` at the path (dotted, list indexes as numbers, or
    the keys themselves); DELETE there removes the field."""
    out = copy.deepcopy(obj)
    here: Any = out
    keys = path.split(".") if isinstance(path, str) else path
    for key in keys[:-1]:
        here = here[int(key)] if isinstance(here, list) else here[key]
    last = keys[-1]
    if isinstance(here, list):
        here[int(last)] = value
    elif value is DELETE:
        here.pop(last, None)
    else:
        here[last] = value
    return out


DELETE = object()
Maker = Callable[[random.Random, int], Case]


def _svc(n: int, **spec: Any) -> Obj:
    return service(f"h{n}", f"10.97.{n // 250}.{n % 250 + 1}", **spec)


def _eps(n: int, addresses: list[str] | None = None) -> Obj:
    return endpoint_slice(f"h{n}-a", f"h{n}", addresses or [f"10.98.{n // 250}.{n % 250 + 1}"])


def _service_cases() -> list[tuple[str, Maker]]:
    S = "Service"

    def bad_field(path: str, values: list[Any], hint: str, what: str) -> tuple[str, Maker]:
        def make(rng: random.Random, n: int) -> Case:
            return Case(S, what, "bad", hint, with_value(_svc(n), path, rng.choice(values)))

        return what, make

    def two_ports(rng: random.Random, n: int) -> Case:
        obj = _svc(n)
        second = dict(obj["spec"]["ports"][0])
        kind = rng.choice(["duplicate port", "duplicate name", "unnamed"])
        if kind == "duplicate name":
            second["port"] = 81
        elif kind == "unnamed":
            obj["spec"]["ports"][0].pop("name")
            second.update(port=81, name="other")
        obj["spec"]["ports"].append(second)
        hint = {"duplicate port": "duplicate port", "duplicate name": "same name"}
        return Case(S, f"two ports: {kind}", "bad", hint.get(kind, "needs a name"), obj)

    def clash(rng: random.Random, n: int) -> Case:
        if rng.random() < 0.5:  # another Service's nodePort
            obj = _svc(n, type="NodePort")
            obj["spec"]["ports"][0]["nodePort"] = CLASH_NODE_PORT
            what = "conflicting nodePort"
        else:
            obj = service(f"h{n}", CLASH_VIP, CLASH_PORT)
            what = "conflicting ClusterIP and port"
        return Case(S, what, "bad", "already served by Service test/web", obj)

    def bad_name(rng: random.Random, n: int) -> Case:
        value = rng.choice(BAD_NAMES)
        return Case(
            S, "invalid name", "bad", "metadata.name", with_value(_svc(n), "metadata.name", value)
        )

    def leading_zeros(rng: random.Random, n: int) -> Case:
        ip = f"010.97.{n // 250:03d}.{n % 250 + 1:03d}"
        return Case(
            S,
            "clusterIP with leading zeros (read as decimal)",
            "served",
            obj=with_value(_svc(n), "spec.clusterIP", ip),
        )

    def odd_but_fine(rng: random.Random, n: int) -> Case:
        obj = _svc(n)
        kind = rng.choice(["scheduler", "headless", "ExternalName", "other proxy"])
        if kind == "scheduler":
            obj["metadata"]["annotations"] = {
                "lbctl.io/scheduler": rng.choice(["fastest", "", "RR"])
            }
            return Case(S, "unknown scheduler annotation (default used)", "served", obj=obj)
        if kind == "headless":
            obj["spec"]["clusterIP"] = "None"
        elif kind == "ExternalName":
            obj["spec"] = {"type": "ExternalName", "externalName": "example.org"}
        else:
            obj["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "other"}
        return Case(S, f"{kind} (left alone)", "ignored", obj=obj)

    def without(path: str, hint: str, what: str) -> tuple[str, Maker]:
        def make(rng: random.Random, n: int) -> Case:
            return Case(S, what, "bad", hint, with_value(_svc(n), path, DELETE))

        return what, make

    return [
        bad_field(
            "metadata", [[], "x", 5], "metadata: expected a mapping", "metadata not a mapping"
        ),
        bad_field(
            "metadata.namespace",
            ["Test", "ns/x", "ü", 7],
            "metadata.namespace",
            "invalid namespace",
        ),
        ("invalid name", bad_name),
        without("metadata.name", "metadata.name: missing", "no name"),
        bad_field("spec", [[], "ClusterIP", 1], "spec", "spec not a mapping"),
        bad_field("spec.type", ["Foo", "clusterip", 5, ["ClusterIP"]], "spec.type", "unknown type"),
        bad_field(
            "spec.clusterIP",
            [*BAD_IPS, 167772160, ["10.97.0.1"]],
            "spec.clusterIP",
            "invalid clusterIP",
        ),
        without("spec.clusterIP", "spec.clusterIP: missing", "no clusterIP"),
        bad_field(
            "spec.clusterIPs",
            ["10.97.0.1", {"ip": "10.97.0.1"}],
            "spec.clusterIPs",
            "clusterIPs not a list",
        ),
        ("clusterIP with leading zeros", leading_zeros),
        without("spec.ports", "spec.ports", "no ports"),
        bad_field("spec.ports", [{"port": 80}, "80", 80], "spec.ports", "ports not a list"),
        bad_field(
            "spec.ports.0", [80, "http", None, []], "spec.ports[0]", "port entry not a mapping"
        ),
        bad_field("spec.ports.0.port", BAD_PORTS, "spec.ports[0].port", "absurd port"),
        bad_field(
            "spec.ports.0.protocol",
            ["tcp", "ICMP", 6, "", ["TCP"]],
            "spec.ports[0].protocol",
            "unknown protocol",
        ),
        bad_field(
            "spec.ports.0.name",
            ["HTTP", "h_p", 80, "ü", "-x"],
            "spec.ports[0].name",
            "invalid port name",
        ),
        ("two ports", two_ports),
        ("conflicting frontend", clash),
        bad_field(
            "spec.sessionAffinity",
            ["Cookie", 1, "clientip"],
            "spec.sessionAffinity",
            "unknown affinity",
        ),
        bad_field(
            "spec.sessionAffinityConfig",
            [{"clientIP": {"timeoutSeconds": v}} for v in (0, 86401, "60", -1, 2**70, 1.5)],
            "timeoutSeconds",
            "absurd affinity timeout",
        ),
        bad_field(
            "spec.externalIPs",
            ["10.97.9.9", [["x"]], BAD_IPS[:5]],
            "spec.externalIPs",
            "invalid externalIPs",
        ),
        bad_field(
            "spec.externalTrafficPolicy",
            ["Everywhere", "local", 1],
            "externalTrafficPolicy",
            "unknown traffic policy",
        ),
        bad_field(
            "status",
            [
                {"loadBalancer": {"ingress": v}}
                for v in ([{"ip": "300.1.1.1"}], [[1]], "x", [{"ip": 5}])
            ],
            "status.loadBalancer.ingress",
            "invalid load balancer status",
        ),
        bad_field(
            "spec.loadBalancerSourceRanges",
            [["10.0.0.1/8"], ["x"], "10.0.0.0/8", [5], ["10.0.0.0/33"]],
            "loadBalancerSourceRanges",
            "invalid source ranges",
        ),
        bad_field(
            "metadata.labels",
            [["a"], {"a": 1}, {"a": ["b"]}, "x"],
            "metadata.labels",
            "labels of the wrong type",
        ),
        bad_field(
            "metadata.annotations",
            [["a"], {"a": 1}, {"a": {"b": "c"}}],
            "metadata.annotations",
            "annotations of the wrong type",
        ),
        ("odd but valid", odd_but_fine),
    ]


def _slice_cases() -> list[tuple[str, Maker]]:
    E = "EndpointSlice"

    def bad_field(path: str, values: list[Any], hint: str, what: str) -> tuple[str, Maker]:
        def make(rng: random.Random, n: int) -> Case:
            return Case(E, what, "bad", hint, with_value(_eps(n), path, rng.choice(values)))

        return what, make

    bigs = iter(range(1 << 30))

    def big(rng: random.Random, n: int) -> Case:
        # the first two 10,000 endpoints (one valid, one not), later ones the API's
        # most, 1,000: they take seconds each to read as YAML
        nth = next(bigs)
        count = 10_000 if nth < 2 else 1_000
        addresses = [f"10.{99 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}" for i in range(count)]
        obj = _eps(n, addresses)
        what = f"{count:,} endpoints in one slice"
        if nth % 2 == 0:  # with its Service: one frontend with that many backends
            return Case(E, what, "served", obj=obj, companions=[_svc(n)])
        obj["endpoints"][-1]["addresses"] = ["10.99.0.999"]
        return Case(E, f"{what}, the last one invalid", "bad", f"endpoints[{count - 1}]", obj)

    def leading_zeros(rng: random.Random, n: int) -> Case:
        obj = _eps(n, [f"010.098.{n // 250:03d}.{n % 250 + 1:03d}"])
        return Case(E, "endpoint with leading zeros (read as decimal)", "served", obj=obj)

    def weights(rng: random.Random, n: int) -> Case:
        obj = _eps(n)
        obj["metadata"]["annotations"] = {
            "lbctl.io/weights": rng.choice(
                ["x=1", "10.98.0.1=0", ",,=,", "10.98.0.1=" + "9" * 5000]
            )
        }
        return Case(E, "garbage weights annotation (weight 1 used)", "served", obj=obj)

    def bad_service_label(rng: random.Random, n: int) -> Case:
        obj = _eps(n)
        obj["metadata"]["labels"]["kubernetes.io/service-name"] = rng.choice(
            ["", "Web", "a b", "x" * 70]
        )
        return Case(E, "invalid service-name label", "bad", "kubernetes.io/service-name", obj)

    return [
        bad_field(
            "metadata.labels",
            [{}, {"other": "x"}],
            "kubernetes.io/service-name",
            "no service-name label",
        ),
        ("invalid service-name label", bad_service_label),
        bad_field("metadata.name", [*BAD_NAMES[:4], 7], "metadata.name", "invalid name"),
        bad_field("addressType", ["IPv5", None, 4, "ipv4"], "addressType", "unknown addressType"),
        bad_field(
            "endpoints",
            [{"addresses": ["10.98.0.1"]}, "10.98.0.1"],
            "endpoints",
            "endpoints not a list",
        ),
        bad_field("endpoints.0", ["10.98.0.1", [], 5], "endpoints[0]", "endpoint not a mapping"),
        bad_field(
            "endpoints.0.addresses",
            [[], "10.98.0.1", None],
            "endpoints[0].addresses",
            "no or odd addresses",
        ),
        bad_field(
            "endpoints.0.addresses.0",
            [*BAD_IPS, "fd00::1", 5, None],
            "endpoints[0].addresses[0]",
            "invalid endpoint address",
        ),
        bad_field(
            "endpoints.0.conditions",
            [{"ready": v} for v in ("false", 0, "yes", [True])],
            "conditions.ready",
            "condition not a boolean",
        ),
        bad_field(
            "endpoints.0.nodeName",
            [["node-a"], 5, {"n": 1}],
            "endpoints[0].nodeName",
            "nodeName not a string",
        ),
        bad_field(
            "endpoints.0.hints",
            [{"forZones": v} for v in ("zone-a", [5], [{"name": 5}])],
            "hints.forZones",
            "invalid hints",
        ),
        bad_field("ports.0.port", BAD_PORTS[:-2], "ports[0].port", "absurd port"),
        bad_field("ports.0.protocol", ["udp", "ICMP", 17], "ports[0].protocol", "unknown protocol"),
        bad_field("ports", ["8080", {"port": 8080}], "ports", "ports not a list"),
        ("a big slice", big),
        ("endpoint with leading zeros", leading_zeros),
        ("garbage weights", weights),
    ]


def _node_cases(node_name: str | None) -> list[tuple[str, Maker]]:
    """Nodes named `node_name` (the agent's: the API shows it no other), else node-h<n>."""
    N = "Node"

    def bad_field(path: str, values: list[Any], hint: str, what: str) -> tuple[str, Maker]:
        def make(rng: random.Random, n: int) -> Case:
            damaged = with_value(node(node_name or f"node-h{n}"), path, rng.choice(values))
            return Case(N, what, "bad", hint, damaged)

        return what, make

    return [
        bad_field("status", [[], "Ready", 1], "status", "status not a mapping"),
        bad_field(
            "status.addresses",
            ["10.0.0.1", {"type": "InternalIP"}],
            "status.addresses",
            "addresses not a list",
        ),
        bad_field(
            "status.addresses.0", ["10.0.0.1", 5], "status.addresses[0]", "address not a mapping"
        ),
        bad_field(
            "status.addresses.0.address",
            [*BAD_IPS, None, 5],
            "status.addresses[0].address",
            "invalid address",
        ),
        bad_field(
            "metadata.labels",
            [{"topology.kubernetes.io/zone": v} for v in (5, ["a"], None)],
            "metadata.labels",
            "zone label not a string",
        ),
    ]


def _raw_cases() -> list[tuple[str, Callable[[random.Random, int], Case]]]:
    """Damage only YAML can carry: the file is refused whole, with the parser's reason."""

    def bomb(rng: random.Random, n: int) -> Case:
        lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
        where = rng.choice(["annotations: {boom: *a8}", "labels: {boom: *a8}"])
        text = (
            "apiVersion: v1\nkind: Service\nx:\n"
            + "".join(f"  {line}\n" for line in lines)
            + f"metadata: {{name: h{n}, namespace: {NAMESPACE}, {where}}}\n"
            + f"spec: {{clusterIP: 10.97.{n // 250}.{n % 250 + 1}, ports: [{{port: 80}}]}}\n"
        )
        return Case(
            "Service",
            "YAML alias bomb (a billion laughs)",
            "bad",
            "metadata.",
            raw=text.encode(),
            api=False,
        )

    def huge_int(rng: random.Random, n: int) -> Case:
        text = (
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: h{n}, namespace: {NAMESPACE}}}\n"
            f"spec: {{clusterIP: 10.97.0.1, ports: [{{port: {'9' * 5000}}}]}}\n"
        )
        return Case(
            "Service",
            "a 5000-digit port number",
            "bad",
            "cannot parse the file",
            raw=text.encode(),
            api=False,
        )

    def garbage(rng: random.Random, n: int) -> Case:
        choice = rng.choice(["binary", "deep", "tabs", "scalar", "list-of-junk"])
        raw = {
            "binary": b"\xff\xfe" + bytes(rng.randrange(256) for _ in range(300)),
            "deep": b"kind: Service\nspec: " + b"[" * 3000 + b"]" * 3000 + b"\n",
            "tabs": b"kind: Service\n\tmetadata: {name: x}\n",
            "scalar": b"just a string\n---\n42\n",
            "list-of-junk": b"apiVersion: v1\nkind: List\nitems: [1, [2], {kind: Service}]\n",
        }[choice]
        hint = "document" if choice in ("scalar", "list-of-junk") else "cannot parse the file"
        return Case("Service", f"not YAML of an object ({choice})", "bad", hint, raw=raw, api=False)

    return [("alias bomb", bomb), ("huge number", huge_int), ("garbage file", garbage)]


def cases(seed: int, count: int, node_name: str | None = None, first: int = 0) -> Iterator[Case]:
    """`count` cases, cycling through every kind of damage with random values.

    Nodes are named `node_name` when given (the agent's own), else each its own."""
    rng = random.Random(seed)
    makers = _service_cases() + _slice_cases() + _node_cases(node_name) + _raw_cases()
    for i in range(count):
        _, make = makers[i % len(makers)]
        case = make(rng, first + i)
        if case.obj is not None:
            case.api = case.api and storable(case.obj)
        yield case
