"""Parsing Kubernetes objects into the model (pure)."""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Any

import pytest

from lbctl.model import Protocol
from lbctl.sources.parse import (
    Ignored,
    InvalidObject,
    meta_ref,
    parse_checked,
    parse_endpoint_slice,
    parse_service,
)

pytestmark = pytest.mark.unit  # pure: make unit runs it without root


def service(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "ClusterIP",
        "clusterIP": "10.96.0.10",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
    }
    base.update(spec)
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": base}


def eps(endpoints: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    obj = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-1",
            "namespace": "ns",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }
    obj.update(extra)
    return obj


def test_service_fields() -> None:
    svc = parse_service(service(ports=[{"port": 53, "protocol": "UDP"}]))
    assert str(svc.ref) == "default/web"
    assert svc.cluster_ips == (ipaddress.ip_address("10.96.0.10"),)
    assert svc.ports[0].protocol is Protocol.UDP and svc.ports[0].name == ""


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"clusterIP": "10.96.0.300"}, "spec.clusterIPs[0]: '10.96.0.300' is not a valid IP"),
        ({"ports": [{"port": 70000}]}, "spec.ports[0].port: 70000 is out of range (1-65535)"),
        ({"ports": [{"port": 80, "protocol": "ICMP"}]}, "unknown protocol 'ICMP'"),
        ({"ports": [{"port": "http"}]}, "spec.ports[0].port: 'http' is not a port number"),
        ({"ports": []}, "spec.ports: a Service needs at least one port"),
        ({"clusterIP": None}, "spec.clusterIP: missing"),
        (
            {"ports": [{"port": 80}, {"port": 81}]},
            "every port of a multi-port Service needs a name",
        ),
    ],
)
def test_invalid_services_name_the_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidObject, match=re.escape(message)):
        parse_service(service(**spec))


def test_ignored_services() -> None:
    with pytest.raises(Ignored, match="headless"):
        parse_service(service(clusterIP="None"))
    with pytest.raises(Ignored, match="ExternalName"):
        parse_service(service(type="ExternalName"))
    labelled = service()
    labelled["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "other"}
    with pytest.raises(Ignored, match="service-proxy-name"):
        parse_service(labelled)


def test_endpoint_conditions_follow_the_api_defaults() -> None:
    parsed = parse_endpoint_slice(
        eps(
            [
                {"addresses": ["10.0.0.1"]},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
                {
                    "addresses": ["10.0.0.3"],
                    "conditions": {"ready": False, "serving": True, "terminating": True},
                },
            ]
        )
    )
    states = [(e.ready, e.serving, e.terminating) for e in parsed.endpoints]
    # nil ready and serving mean true, nil terminating means false (as kube-proxy reads them)
    assert states == [(True, True, False), (False, True, False), (False, True, True)]
    assert str(parsed.service) == "ns/web"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"endpoints": [{"addresses": ["10.0.0.999"]}]}, "endpoints[0].addresses[0]"),
        ({"endpoints": [{"addresses": ["fd00::1"]}]}, "is not an IPv4 address"),
        ({"ports": [{"port": 0}]}, "ports[0].port: 0 is out of range"),
        ({"ports": [{"port": 80, "protocol": "GRE"}]}, "unknown protocol 'GRE'"),
        ({"addressType": "IPv5"}, "addressType"),
    ],
)
def test_invalid_slices_name_the_field(change: dict[str, Any], message: str) -> None:
    obj = eps([{"addresses": ["10.0.0.1"]}])
    obj.update(change)
    with pytest.raises(InvalidObject, match=re.escape(message)):
        parse_endpoint_slice(obj)


def test_slice_without_service_label_is_invalid() -> None:
    obj = eps([])
    obj["metadata"]["labels"] = {}
    with pytest.raises(InvalidObject, match=re.escape("kubernetes.io/service-name")):
        parse_endpoint_slice(obj)


def test_source_ranges_from_the_field_or_the_annotation() -> None:
    got = parse_service(service(loadBalancerSourceRanges=[" 203.0.113.0/25", "2001:db8::/64"]))
    assert [str(n) for n in got.load_balancer_source_ranges] == ["203.0.113.0/25", "2001:db8::/64"]
    obj = service()
    obj["metadata"]["annotations"] = {
        "service.beta.kubernetes.io/load-balancer-source-ranges": "10.0.0.0/8, 192.0.2.0/24"
    }
    assert [str(n) for n in parse_service(obj).load_balancer_source_ranges] == [
        "10.0.0.0/8",
        "192.0.2.0/24",
    ]
    with pytest.raises(InvalidObject, match=r"loadBalancerSourceRanges\[0\]: '10.0.0.1/8'"):
        parse_service(service(loadBalancerSourceRanges=["10.0.0.1/8"]))


def test_zone_hints_are_the_named_zones() -> None:
    parsed = parse_endpoint_slice(
        eps(
            [
                {
                    "addresses": ["10.0.0.1"],
                    "zone": "zone-a",
                    "hints": {"forZones": [{"name": "zone-a"}, {"name": "zone-b"}]},
                },
                {"addresses": ["10.0.0.2"], "hints": {"forZones": [{}]}},
            ]
        )
    )
    assert [e.zone_hints for e in parsed.endpoints] == [("zone-a", "zone-b"), ()]
    assert parsed.endpoints[0].zone == "zone-a"


# -- lbctl's own annotations: a bad value is logged and the default used ------------


def annotated(obj: dict[str, Any], **annotations: str) -> dict[str, Any]:
    obj["metadata"]["annotations"] = annotations
    return obj


def test_scheduler_annotation(caplog: pytest.LogCaptureFixture) -> None:
    assert parse_service(service()).scheduler is None  # the cluster default
    obj = annotated(service(), **{"lbctl.io/scheduler": "maglev"})
    assert parse_service(obj).scheduler == "maglev"
    with caplog.at_level(logging.ERROR, logger="lbctl.sources.parse"):
        bad = parse_service(annotated(service(), **{"lbctl.io/scheduler": "fastest"}))
    assert bad.scheduler is None
    (record,) = caplog.records
    assert record.getMessage() == (
        "Service default/web: metadata.annotations[lbctl.io/scheduler]: unknown scheduler "
        "'fastest' (valid: random, rr, wrr, maglev, sh, lc); using the cluster default"
    )


def test_session_affinity_and_its_timeout() -> None:
    plain = parse_service(service())
    assert plain.session_affinity == "None"
    sticky = parse_service(service(sessionAffinity="ClientIP"))
    assert (sticky.session_affinity, sticky.affinity_timeout_s) == ("ClientIP", 10800)
    for seconds in (1, 86400):
        config = {"clientIP": {"timeoutSeconds": seconds}}
        got = parse_service(service(sessionAffinity="ClientIP", sessionAffinityConfig=config))
        assert got.affinity_timeout_s == seconds
    for seconds in (0, 86401, "60"):
        config = {"clientIP": {"timeoutSeconds": seconds}}
        with pytest.raises(InvalidObject, match=r"timeoutSeconds: .* is not a number of seconds"):
            parse_service(service(sessionAffinity="ClientIP", sessionAffinityConfig=config))
    with pytest.raises(
        InvalidObject, match=re.escape("spec.sessionAffinity: 'Cookie' is not None or")
    ):
        parse_service(service(sessionAffinity="Cookie"))


ADDRESSES = [{"addresses": [f"10.0.0.{i}"]} for i in (1, 2, 3)]


def weights(**annotations: str) -> list[int]:
    return [
        e.weight for e in parse_endpoint_slice(annotated(eps(ADDRESSES), **annotations)).endpoints
    ]


def test_slice_annotations_are_kept() -> None:
    parsed = parse_endpoint_slice(annotated(eps(ADDRESSES), b="2", a="1"))
    assert parsed.annotations == (("a", "1"), ("b", "2"))
    assert parse_endpoint_slice(eps(ADDRESSES)).annotations == ()


def test_weights_per_address_win_over_the_slices_weight() -> None:
    assert weights() == [1, 1, 1]
    assert weights(**{"lbctl.io/weight": "3"}) == [3, 3, 3]
    assert weights(**{"lbctl.io/weights": "10.0.0.1=5, 10.0.0.3=100,"}) == [5, 1, 100]
    both = {"lbctl.io/weight": "2", "lbctl.io/weights": "10.0.0.2=7"}
    assert weights(**both) == [2, 7, 2]


@pytest.mark.parametrize(
    ("annotations", "expected", "message"),
    [
        ({"lbctl.io/weight": "0"}, [1, 1, 1], "lbctl.io/weight]: '0': "),
        ({"lbctl.io/weight": "101"}, [1, 1, 1], "lbctl.io/weight]: '101': "),
        ({"lbctl.io/weight": "heavy"}, [1, 1, 1], "lbctl.io/weight]: 'heavy': "),
        (
            {"lbctl.io/weight": "4", "lbctl.io/weights": "10.0.0.1=-2,10.0.0.2=3"},
            [1, 3, 4],
            "lbctl.io/weights]: '10.0.0.1=-2': ",
        ),
        (
            {"lbctl.io/weights": "10.0.0.1:3,10.0.0.300=2,10.0.0.3=2"},
            [1, 1, 2],
            "lbctl.io/weights]: '10.0.0.1:3' (not ADDRESS=WEIGHT), '10.0.0.300=2' (not "
            "ADDRESS=WEIGHT): ",
        ),
    ],
)
def test_a_bad_weight_is_logged_once_and_counts_as_one(
    caplog: pytest.LogCaptureFixture,
    annotations: dict[str, str],
    expected: list[int],
    message: str,
) -> None:
    with caplog.at_level(logging.ERROR, logger="lbctl.sources.parse"):
        assert weights(**annotations) == expected
    (record,) = caplog.records
    text = record.getMessage()
    assert text.startswith("EndpointSlice ns/web-1: metadata.annotations[")
    assert message in text
    assert text.endswith("a weight is a whole number in 1-100; using 1 instead")


# -- hostile input (tests/test_reliability_input.py feeds thousands of these) --------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"ports": [{"name": 80, "port": 80}]}, "spec.ports[0].name: expected a string, got int"),
        ({"type": ["ClusterIP"]}, "spec.type: expected a string, got list"),
        ({"externalTrafficPolicy": "Everywhere"}, "'Everywhere' is not Cluster or Local"),
        ({"clusterIP": "fe80::1%eth0"}, "'fe80::1%eth0' is not a valid IP address"),
        (
            {"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]},
            "two ports have the same name",
        ),
    ],
)
def test_fields_of_the_wrong_type_or_value_are_refused(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidObject, match=re.escape(message)):
        parse_service(service(**spec))


def test_labels_and_annotations_are_strings() -> None:
    obj = service()
    obj["metadata"]["annotations"] = {"lbctl.io/scheduler": ["maglev"]}
    with pytest.raises(InvalidObject, match=re.escape("metadata.annotations[lbctl.io/scheduler]")):
        parse_service(obj)
    obj["metadata"]["annotations"] = {}
    obj["metadata"]["labels"] = {"app": 7}
    with pytest.raises(InvalidObject, match=re.escape("metadata.labels[app]: expected a string")):
        parse_service(obj)


def test_a_condition_is_true_or_false_not_a_word() -> None:
    # "false" in quotes is a string, which Python would take for true: a ready endpoint
    obj = eps([{"addresses": ["10.0.0.1"], "conditions": {"ready": "false"}}])
    with pytest.raises(
        InvalidObject, match=re.escape("endpoints[0].conditions.ready: expected true or false")
    ):
        parse_endpoint_slice(obj)


@pytest.mark.parametrize(
    ("name", "namespace", "field"),
    [
        ("Web", "ns", "metadata.name"),
        ("wéb", "ns", "metadata.name"),
        ("1web", "ns", "metadata.name"),  # a Service name starts with a letter
        ("a" * 64, "ns", "metadata.name"),
        ("web", "Prod", "metadata.namespace"),
        ("web", "ns/x", "metadata.namespace"),
    ],
)
def test_names_follow_the_apis_rules(name: str, namespace: str, field: str) -> None:
    obj = service()
    obj["metadata"].update(name=name, namespace=namespace)
    with pytest.raises(InvalidObject, match=re.escape(f"{field}: ") + ".* is not a valid name"):
        parse_service(obj)


def test_a_slice_name_may_have_dots_a_service_name_may_not() -> None:
    obj = eps([{"addresses": ["10.0.0.1"]}])
    obj["metadata"]["name"] = "web.v1-abc"
    assert parse_endpoint_slice(obj).name == "web.v1-abc"
    with pytest.raises(InvalidObject, match=re.escape("metadata.name")):
        parse_service(service() | {"metadata": {"name": "web.v1"}})


def test_a_name_cannot_forge_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    obj = service(ports=[{"port": 0}])
    obj["metadata"]["name"] = "web\nERROR lbctl: forged"
    assert meta_ref(obj) == ("default", "'web\\nERROR lbctl: forged'")
    with pytest.raises(InvalidObject) as raised:
        parse_checked(parse_service, obj)
    assert "\n" not in str(raised.value)


def test_an_ipv4_address_with_leading_zeros_is_read_as_decimal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As Kubernetes reads it (netutils.ParseIPSloppy), never as octal, and logged."""
    obj = service(clusterIP="010.096.000.010", externalIPs=["192.0.2.010"])
    obj["metadata"]["namespace"] = "ns"
    with caplog.at_level(logging.WARNING, logger="lbctl.sources.parse"):
        svc = parse_checked(parse_service, obj)
    assert svc.cluster_ips == (ipaddress.ip_address("10.96.0.10"),)
    assert svc.external_ips == (ipaddress.ip_address("192.0.2.10"),)
    first, second = (r.getMessage() for r in caplog.records)
    assert first == (
        "Service ns/web: spec.clusterIPs[0]: '010.096.000.010' has leading zeros: read as "
        "10.96.0.10 (decimal, as Kubernetes reads it, not octal); write it without them"
    )
    assert second.startswith("Service ns/web: spec.externalIPs[0]: '192.0.2.010'")
    slice_ = parse_endpoint_slice(eps([{"addresses": ["010.000.000.001"]}]))
    assert slice_.endpoints[0].addresses == (ipaddress.ip_address("10.0.0.1"),)
    for bad in ("0x0a.0.0.1", "10.0.0.0256", "10.0.0.1 ", "10.0.1", "10.0.0.0001.1"):
        with pytest.raises(InvalidObject, match="is not a valid IP address"):
            parse_service(service(clusterIP=bad))


def test_an_address_with_a_nul_is_not_an_address() -> None:
    """socket.inet_pton raises ValueError, not OSError, on a NUL (found by hypothesis)."""
    with pytest.raises(InvalidObject, match=re.escape("'10.0.0.1\\x00' is not a valid IP")):
        parse_endpoint_slice(eps([{"addresses": ["10.0.0.1\x00"]}]))


def test_node_port_zero_is_none_allocated() -> None:
    """The API's own "no nodePort"; a ClusterIP Service may carry it."""
    assert parse_service(service(ports=[{"port": 80, "nodePort": 0}])).ports[0].node_port is None


def test_a_message_shows_a_value_cut_short() -> None:
    with pytest.raises(InvalidObject) as raised:
        parse_service(service(ports=[{"port": list(range(100_000))}]))
    assert len(str(raised.value)) < 200
    with pytest.raises(InvalidObject, match="<an integer of"):
        parse_service(service(ports=[{"port": 10**5000}]))


def test_a_nodes_pod_ranges() -> None:
    """spec.podCIDRs (dual-stack: one per family), or the older spec.podCIDR alone."""
    from lbctl.sources.parse import parse_node
    from tests import k8s_yaml

    node = parse_node(k8s_yaml.node("n1", addresses=["192.0.2.1"], pod_cidrs=["10.244.1.0/24"]))
    assert node.pod_cidrs == (ipaddress.ip_network("10.244.1.0/24"),)
    both = k8s_yaml.node("n1", pod_cidrs=["10.244.1.0/24", "fd00:10:244:1::/64"])
    assert [c.version for c in parse_node(both).pod_cidrs] == [4, 6]
    old = k8s_yaml.node("n1")
    old["spec"] = {"podCIDR": "10.244.2.0/24"}
    assert parse_node(old).pod_cidrs == (ipaddress.ip_network("10.244.2.0/24"),)
    assert parse_node(k8s_yaml.node("n1")).pod_cidrs == ()
    bad = k8s_yaml.node("n1", pod_cidrs=["10.244.1.1/24"])
    with pytest.raises(InvalidObject, match=r"spec.podCIDRs\[0\]: '10.244.1.1/24' is not a CIDR"):
        parse_node(bad)
