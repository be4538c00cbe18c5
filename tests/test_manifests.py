"""ManifestSource: a directory of YAML as a source of changes (no datapath)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from lbctl.manifests import ManifestSource
from lbctl.model import ServiceRef, ServiceTable

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: ns}}
spec:
  clusterIP: {ip}
  ports: [{{name: http, port: {port}, protocol: TCP}}]
"""
SLICE = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: ns
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints: [{{addresses: [{addr}]}}]
"""


def write(path: Path, text: str) -> None:
    # A new inode each time, as editors that save atomically do.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def svc(name: str, ip: str = "10.96.0.10", port: int = 80) -> str:
    return SERVICE.format(name=name, ip=ip, port=port)


def eps(name: str, addr: str = "10.0.0.1") -> str:
    return SLICE.format(name=name, addr=addr)


@pytest.fixture
def source(tmp_path: Path) -> ManifestSource:
    return ManifestSource(tmp_path)


def test_documents_lists_and_changes(tmp_path: Path, source: ManifestSource) -> None:
    table = ServiceTable()
    write(tmp_path / "a.yaml", svc("web") + "---\n" + eps("web"))
    listing = "apiVersion: v1\nkind: List\nitems:\n" + "".join(
        "- " + doc.replace("\n", "\n  ").rstrip() + "\n"
        for doc in (svc("api", "10.96.0.11"), eps("api", "10.0.0.2"))
    )
    write(tmp_path / "b.yml", listing)
    (tmp_path / "notes.txt").write_text("not a manifest")
    touched = source.poll(table)
    assert touched == {ServiceRef("ns", "web"), ServiceRef("ns", "api")}
    assert [str(e.addresses[0]) for e in table.slices[("ns", "api-1")].endpoints] == ["10.0.0.2"]
    assert source.poll(table) == set()  # nothing changed, nothing touched

    write(tmp_path / "a.yaml", svc("web") + "---\n" + eps("web", "10.0.0.9"))
    assert source.poll(table) == {ServiceRef("ns", "web")}
    assert str(table.slices[("ns", "web-1")].endpoints[0].addresses[0]) == "10.0.0.9"

    (tmp_path / "b.yml").unlink()
    assert source.poll(table) == {ServiceRef("ns", "api")}
    assert ServiceRef("ns", "api") not in table.services and ("ns", "api-1") not in table.slices


def test_unparsable_file_keeps_its_objects_and_says_why(
    tmp_path: Path, source: ManifestSource, caplog: pytest.LogCaptureFixture
) -> None:
    table = ServiceTable()
    write(tmp_path / "a.yaml", svc("web"))
    write(tmp_path / "b.yaml", svc("api", "10.96.0.11"))
    source.poll(table)
    write(tmp_path / "a.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: [oops\n")
    with caplog.at_level(logging.ERROR):
        assert source.poll(table) == set()
    assert ServiceRef("ns", "web") in table.services
    [message] = source.errors[tmp_path / "a.yaml"]
    assert "cannot parse the file" in message and "keeping its 1 previously loaded" in message
    assert str(tmp_path / "a.yaml") in caplog.text
    # fixing the file clears the error
    write(tmp_path / "a.yaml", svc("web", port=81))
    assert source.poll(table) == {ServiceRef("ns", "web")}
    assert tmp_path / "a.yaml" not in source.errors


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (svc("web", ip="10.96.0.300"), "'10.96.0.300' is not a valid IP address"),
        (svc("web", port=70000), "spec.ports[0].port: 70000 is out of range (1-65535)"),
        (svc("web").replace("TCP", "ICMP"), "unknown protocol 'ICMP'"),
        (eps("web", "10.0.0.999"), "endpoints[0].addresses[0]"),
    ],
)
def test_invalid_object_is_reported_and_the_rest_applied(
    tmp_path: Path, source: ManifestSource, bad: str, reason: str
) -> None:
    table = ServiceTable()
    write(tmp_path / "a.yaml", bad + "---\n" + svc("api", "10.96.0.11"))
    source.poll(table)
    assert ServiceRef("ns", "api") in table.services
    [message] = source.errors[tmp_path / "a.yaml"]
    kind = "Service" if "kind: Service" in bad else "EndpointSlice"
    name = "web" if kind == "Service" else "web-1"
    assert message.startswith(f"{kind} ns/{name}: ")
    assert reason in message


def test_invalid_edit_keeps_the_last_valid_version(tmp_path: Path, source: ManifestSource) -> None:
    table = ServiceTable()
    write(tmp_path / "a.yaml", svc("web"))
    source.poll(table)
    write(tmp_path / "a.yaml", svc("web", port=0))
    assert source.poll(table) == set()
    assert table.services[ServiceRef("ns", "web")].ports[0].port == 80
    assert "keeping its previous version" in source.errors[tmp_path / "a.yaml"][0]


def test_duplicate_object_first_file_wins_then_hands_over(
    tmp_path: Path, source: ManifestSource, caplog: pytest.LogCaptureFixture
) -> None:
    table = ServiceTable()
    write(tmp_path / "a.yaml", svc("web", port=80))
    write(tmp_path / "b.yaml", svc("web", port=81))
    with caplog.at_level(logging.ERROR):
        source.poll(table)
    assert table.services[ServiceRef("ns", "web")].ports[0].port == 80
    assert "already defined in" in caplog.text
    (tmp_path / "a.yaml").unlink()
    source.poll(table)  # a.yaml's copy goes
    source.poll(table)  # b.yaml's copy gets its turn
    assert table.services[ServiceRef("ns", "web")].ports[0].port == 81


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    from lbctl.manifests import SourceError

    with pytest.raises(SourceError, match=r"manifest directory .*nope"):
        ManifestSource(tmp_path / "nope").poll(ServiceTable())


def test_malformed_nested_field_is_reported_and_the_rest_applied(
    tmp_path: Path, source: ManifestSource
) -> None:
    table = ServiceTable()
    # status.loadBalancer.ingress entries must be mappings; a string is malformed
    bad = svc("web") + "status: {loadBalancer: {ingress: [{ip: 10.0.0.1}, [1, 2]]}}\n"
    write(tmp_path / "a.yaml", bad + "---\n" + svc("api", "10.96.0.11"))
    write(tmp_path / "b.yaml", svc("other", "10.96.0.12"))
    source.poll(table)
    assert ServiceRef("ns", "api") in table.services
    assert ServiceRef("ns", "other") in table.services
    assert source.errors[tmp_path / "a.yaml"][0].startswith("Service ns/web: ")


def test_complete_is_false_while_a_file_cannot_be_parsed(
    tmp_path: Path, source: ManifestSource
) -> None:
    table = ServiceTable()
    write(tmp_path / "a.yaml", "kind: [oops\n")
    source.poll(table)
    assert not source.complete
    write(tmp_path / "a.yaml", svc("web"))
    source.poll(table)
    assert source.complete
