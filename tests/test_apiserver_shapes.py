"""The test API server's objects against a real kube-apiserver's, key by key.

tests/fixtures/real_list_pages.json holds one LIST page of Services and one of
EndpointSlices as kube-apiserver v1.24+ answers them (written from the API
reference; see its _comment).  The objects tests/k8s_payloads.py builds, served
by tests/apiserver.py, must have the same keys at every level: a stand-in that
drops managedFields or the server-set metadata would make the benchmarks
(bench/control_plane.py) decode less than a real cluster sends.  Also here: the
content type whatever the client accepts, and LIST pages of 500 with a
continue token, as client-go's informers ask for them.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbctl.sources.parse import parse_checked, parse_endpoint_slice, parse_service
from tests import k8s_payloads
from tests.apiserver import FakeApiServer
from tests.netlab import Netns

pytestmark = pytest.mark.netns

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "real_list_pages.json").read_text())
PATHS = {
    "services": "/api/v1/services",
    "endpointslices": "/apis/discovery.k8s.io/v1/endpointslices",
}


def key_paths(value: Any, path: str = "") -> set[str]:
    """Every key path in a JSON value; list items merge under "[]".

    A fieldsV1 key of a list item (``k:{"port":80,"protocol":"TCP"}``) stands for
    its key fields' names: the values in it are data, the names are the shape."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, sub in value.items():
            if key.startswith("k:{"):
                key = "k:" + ",".join(sorted(json.loads(key[2:])))
            here = f"{path}.{key}"
            paths.add(here)
            paths |= key_paths(sub, here)
    elif isinstance(value, list):
        for item in value:
            paths |= key_paths(item, path + "[]")
    return paths


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[Netns, FakeApiServer]]:
    ns = Netns.create("shape")
    try:
        sock = ns.open_socket()
        sock.bind(("127.0.0.1", 0))
        with FakeApiServer(sock) as api:
            with api.batch():
                for i in range(1200):
                    name = f"svc{i:04d}"
                    ip = f"{i // 250}.{i % 250 + 1}"
                    api.create(k8s_payloads.service("shop", name, f"10.96.{ip}"))
                    ips = [f"10.244.{ip}", f"10.245.{ip}"]
                    api.create(k8s_payloads.endpoint_slice("shop", name, ips))
            yield ns, api
    finally:
        ns.delete()


def get(
    env: tuple[Netns, FakeApiServer], path: str, accept: str = "application/json"
) -> tuple[int, str, dict[str, Any]]:
    """(status, Content-Type, decoded body) of a GET, made inside the test namespace."""
    ns, api = env
    with ns.entered():
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
        try:
            conn.request("GET", path, headers={"Accept": accept})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
    return resp.status, resp.getheader("Content-Type") or "", json.loads(body)


@pytest.mark.parametrize("resource", ["services", "endpointslices"])
def test_list_pages_have_the_real_servers_keys(
    server: tuple[Netns, FakeApiServer], resource: str
) -> None:
    status, _, page = get(server, PATHS[resource] + "?limit=1")
    assert status == 200
    real = FIXTURE[resource]
    assert key_paths(page) == key_paths(real), (
        f"missing: {sorted(key_paths(real) - key_paths(page))}; "
        f"extra: {sorted(key_paths(page) - key_paths(real))}"
    )
    assert (page["kind"], page["apiVersion"]) == (real["kind"], real["apiVersion"])
    # The same parsers lbctl runs accept both; the real one and the stand-in's agree.
    parser = parse_service if resource == "services" else parse_endpoint_slice
    for item in (page["items"][0], real["items"][0]):
        assert parse_checked(parser, item) is not None


def test_objects_are_real_sized(server: tuple[Netns, FakeApiServer]) -> None:
    """Near the issue's real server (1.3 KB a Service, 2.8 KB an EndpointSlice of 10),
    a little above it: slices kept for Pods carry a targetRef per endpoint."""
    compact = {"separators": (",", ":")}  # as the server writes JSON
    service = json.dumps(k8s_payloads.service("shop", "svc0001", "10.96.0.2"), **compact)
    ips = [f"10.244.0.{i}" for i in range(10)]
    endpoint_slice = json.dumps(k8s_payloads.endpoint_slice("shop", "svc0001", ips), **compact)
    print(f"Service {len(service)} B, EndpointSlice of 10 {len(endpoint_slice)} B")
    assert 1100 < len(service) < 2200
    assert 2400 < len(endpoint_slice) < 4500


@pytest.mark.parametrize(
    "accept",
    [
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;"
        "g=meta.k8s.io,application/json",
        "application/vnd.kubernetes.protobuf",
        "application/vnd.kubernetes.protobuf, */*",
        "*/*",
    ],
)
def test_any_accept_gets_json(server: tuple[Netns, FakeApiServer], accept: str) -> None:
    status, content_type, page = get(server, PATHS["services"] + "?limit=2", accept)
    assert (status, content_type) == (200, "application/json")
    assert page["kind"] == "ServiceList" and len(page["items"]) == 2


def test_pages_of_500_with_a_continue_token(server: tuple[Netns, FakeApiServer]) -> None:
    _, api = server
    names: list[str] = []
    token = ""
    sizes = []
    versions = set()
    while True:
        query = "?limit=500" + (f"&continue={token}" if token else "")
        status, _, page = get(server, PATHS["endpointslices"] + query)
        assert status == 200
        sizes.append(len(page["items"]))
        names += [item["metadata"]["name"] for item in page["items"]]
        versions.add(page["metadata"]["resourceVersion"])
        token = page["metadata"].get("continue", "")
        if not token:
            assert "remainingItemCount" not in page["metadata"]
            break
        assert page["metadata"]["remainingItemCount"] == 1200 - len(names)
    assert sizes == [500, 500, 200]
    assert names == sorted(names) and len(set(names)) == 1200
    assert len(versions) == 1  # one snapshot
    # The server keeps an EndpointSlice's generation, as kube-apiserver does.
    item = api.get("endpointslices", "shop", names[0])
    assert item is not None and item["metadata"]["generation"] == 1
    assert api.apply(item)["metadata"]["generation"] == 2
