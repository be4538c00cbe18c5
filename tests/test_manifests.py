"""ManifestSource: a directory of YAML as a source of changes (no datapath)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lbctl.model import ServiceRef, ServiceTable
from lbctl.sources.manifests import ManifestSource

pytestmark = pytest.mark.unit  # pure: make unit runs it without root

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
    from lbctl.sources.manifests import SourceError

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


ALIAS_BOMB = """\
apiVersion: v1
kind: List
x:
  a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]
  a1: &a1 [*a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0]
  a2: &a2 [*a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1]
  a3: &a3 [*a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2]
  a4: &a4 [*a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3]
  a5: &a5 [*a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4]
  a6: &a6 [*a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5]
  a7: &a7 [*a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6]
  a8: &a8 [*a7, *a7, *a7, *a7, *a7, *a7, *a7, *a7, *a7]
items:
- apiVersion: v1
  kind: Service
  metadata: {name: bomb, namespace: ns, annotations: {boom: *a8}}
  spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}
- apiVersion: v1
  kind: Service
  metadata: {name: bomb2, namespace: ns}
  spec: {clusterIP: 10.96.0.21, ports: [{port: *a8}]}
"""


def test_a_yaml_alias_bomb_costs_one_error_line(tmp_path: Path) -> None:
    """Nine aliases deep, one value is 387 million items; made into text whole (an
    annotation, an error message) it took the agent's loop and its memory for good.
    Run in a child process with a memory cap and a deadline, so that a regression
    fails this test instead of the machine."""
    write(tmp_path / "bomb.yaml", ALIAS_BOMB)
    write(tmp_path / "web.yaml", svc("web"))
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from pathlib import Path\n"
        "from lbctl.sources.manifests import ManifestSource\n"
        "from lbctl.model import ServiceTable\n"
        "source, table = ManifestSource(Path(sys.argv[1])), ServiceTable()\n"
        "source.poll(table)\n"
        "print(sorted(str(r) for r in table.services))\n"
        "print(list(source.errors.values()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    services, errors = out.stdout.splitlines()
    assert services == "['ns/web']"
    assert errors == repr(
        [
            [
                "Service ns/bomb: metadata.annotations[boom]: expected a string, got list",
                "Service ns/bomb2: spec.ports[0].port: [[[...], [...], [...], [...], ...], "
                "[[...], [...], [...], [...], ...], [[...], [...], [...], [...], ...], "
                "[[...], [...], [...], [...], ...], ...] is not a port number",
            ]
        ]
    )


def test_a_number_too_long_for_python_fails_its_file_only(tmp_path: Path) -> None:
    """PyYAML turns a 5000-digit number into int(), which refuses it with a
    ValueError: that is the file's problem, not the scan's."""
    write(tmp_path / "a.yaml", svc("web").replace("port: 80", "port: " + "9" * 5000))
    write(tmp_path / "b.yaml", svc("api", "10.96.0.11"))
    table = ServiceTable()
    source = ManifestSource(tmp_path)
    assert source.poll(table) == {ServiceRef("ns", "api")}
    [message] = source.errors[tmp_path / "a.yaml"]
    assert message.startswith("cannot parse the file: Exceeds the limit (4300 digits)")


def test_json_files_are_read_as_json(tmp_path: Path, source: ManifestSource) -> None:
    obj = yaml.safe_load(svc("web"))
    (tmp_path / "a.json").write_text(json.dumps(obj))
    (tmp_path / "b.json").write_text('{"kind": "Service",')
    table = ServiceTable()
    assert source.poll(table) == {ServiceRef("ns", "web")}
    [message] = source.errors[tmp_path / "b.json"]
    assert message.startswith("cannot parse the file: Expecting")
