"""The fake API server (tests/apiserver.py) against the official kubernetes client.

Every test gets a fresh server on ``127.0.0.1`` inside this module's network namespace;
the ``env`` fixture switches the test's thread into that namespace for the whole test,
so the client's lazily opened connections are made there too.  Nothing listens on or
connects to the host namespace.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from tests.apiserver import FakeApiServer
from tests.netlab import Netns, current_netns_inode

pytestmark = pytest.mark.netns

TIMEOUT = (2.0, 5.0)  # (connect, read) for every client call: a hang fails, not stalls
Obj = dict[str, Any]


def service(name: str, ns: str = "default", ip: str = "10.96.0.1", **labels: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }


def endpoint_slice(name: str, ns: str, svc: str, ips: list[str]) -> Obj:
    return {
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
    }


def node(name: str, **labels: str) -> Obj:
    return {"kind": "Node", "metadata": {"name": name, "labels": labels}}


@dataclass
class Env:
    ns: Netns
    server: FakeApiServer
    api: client.ApiClient
    core: client.CoreV1Api
    discovery: client.DiscoveryV1Api


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    """One namespace for the module (creating one per test costs ~0.3 s)."""
    ns = Netns.create("api")
    try:
        ns.ip("link", "set", "lo", "up")  # Netns.create did it already; it is what we rely on
        yield ns
    finally:
        ns.delete()


@pytest.fixture
def env(netns: Netns) -> Iterator[Env]:
    """A fresh server in ``netns``, a client for it, and this thread inside ``netns``."""
    sock = netns.open_socket()
    try:
        sock.bind(("127.0.0.1", 0))
    except BaseException:
        sock.close()
        raise
    server = FakeApiServer(sock, bookmark_interval=0.2)
    with server, client.ApiClient(client.Configuration(host=server.url)) as api, netns.entered():
        yield Env(netns, server, api, client.CoreV1Api(api), client.DiscoveryV1Api(api))


def later(delay: float, action: Callable[[], object]) -> threading.Thread:
    """Run a server-side ``action`` after ``delay`` seconds (join the returned thread)."""
    thread = threading.Timer(delay, action)
    thread.start()
    return thread


def raw_watch(
    list_call: Callable[..., Any], *args: Any, **kwargs: Any
) -> tuple[Any, Iterator[Obj]]:
    """The fast path: an urllib3 response and an iterator over its JSON events."""
    resp = list_call(*args, watch=True, _preload_content=False, _request_timeout=TIMEOUT, **kwargs)
    return resp, (json.loads(line) for line in iter_resp_lines(resp))


def next_event(events: Iterator[Obj], skip_bookmarks: bool = True) -> Obj:
    for event in events:
        if not (skip_bookmarks and event["type"] == "BOOKMARK"):
            return event
    raise AssertionError("watch stream ended")


def until_bookmark(events: Iterator[Obj]) -> list[Obj]:
    """Events before the first BOOKMARK: all there is, as bookmarks come only when idle."""
    return list(itertools.takewhile(lambda event: event["type"] != "BOOKMARK", events))


def status_of(exc: ApiException) -> Obj:
    body: Obj = json.loads(exc.body or b"{}")
    return body


def listening_ports(proc_net_tcp: str) -> set[int]:
    ports = set()
    for line in Path(proc_net_tcp).read_text().splitlines()[1:]:
        _slot, local, _remote, state, *_ = line.split()
        if state == "0A":  # TCP_LISTEN
            ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def test_server_listens_only_in_the_test_namespace(env: Env) -> None:
    assert env.server.url == f"http://127.0.0.1:{env.server.port}"
    assert current_netns_inode() == os.stat(env.ns.path).st_ino  # the fixture's doing
    assert env.server.port in listening_ports("/proc/thread-self/net/tcp")
    assert env.server.port not in listening_ports("/proc/1/net/tcp")  # the host's namespace
    assert f"apiserver:{env.server.port}" in [t.name for t in threading.enumerate()]


def test_list_paging_and_namespaces(env: Env) -> None:
    server, core = env.server, env.core
    for i in range(5):
        server.create(service(f"s{i}", "a", f"10.96.0.{i}"))
    server.create(service("s0", "b"))
    server.create(service("s1", "b"))
    for i in range(3):
        server.create(endpoint_slice(f"s{i}-x", "a", f"s{i}", [f"10.244.0.{i}"]))
    assert server.resource_version == 10

    full = core.list_service_for_all_namespaces(_request_timeout=TIMEOUT)
    keys = [(s.metadata.namespace, s.metadata.name) for s in full.items]
    assert keys == [("a", f"s{i}") for i in range(5)] + [("b", "s0"), ("b", "s1")]
    assert full.metadata.resource_version == "10"
    assert [s.metadata.resource_version for s in full.items] == [str(i) for i in range(1, 8)]
    assert len({s.metadata.uid for s in full.items}) == 7
    assert all(s.metadata.creation_timestamp is not None for s in full.items)
    assert full.items[2].spec.cluster_ip == "10.96.0.2"

    in_b = core.list_namespaced_service("b", _request_timeout=TIMEOUT)
    assert [s.metadata.name for s in in_b.items] == ["s0", "s1"]

    # Paging serves one consistent snapshot, even when objects change in between.
    page = core.list_service_for_all_namespaces(limit=3, _request_timeout=TIMEOUT)
    pages = [page]
    assert page.metadata.remaining_item_count == 4
    server.create(service("s9", "a"))
    server.delete("Service", "b", "s1")
    while page.metadata._continue:
        page = core.list_service_for_all_namespaces(
            limit=3, _continue=page.metadata._continue, _request_timeout=TIMEOUT
        )
        pages.append(page)
    assert [len(p.items) for p in pages] == [3, 3, 1]
    assert {p.metadata.resource_version for p in pages} == {"10"}
    assert [(s.metadata.namespace, s.metadata.name) for p in pages for s in p.items] == keys
    assert len(core.list_service_for_all_namespaces(_request_timeout=TIMEOUT).items) == 7
    assert server.requests[-2].query == {"limit": "3", "continue": pages[-2].metadata._continue}

    # The wire format: List kinds; items without apiVersion/kind, as kube-apiserver
    # sends them (kubernetes/kubernetes#3030: only the list names its kind).
    resp = env.discovery.list_namespaced_endpoint_slice(
        "a", _preload_content=False, _request_timeout=TIMEOUT
    )
    body = json.loads(resp.data)
    assert (body["kind"], body["apiVersion"]) == ("EndpointSliceList", "discovery.k8s.io/v1")
    assert body["metadata"] == {"resourceVersion": "12"}
    assert [i["metadata"]["name"] for i in body["items"]] == ["s0-x", "s1-x", "s2-x"]
    assert not [key for i in body["items"] for key in ("kind", "apiVersion") if key in i]
    slices = env.discovery.list_endpoint_slice_for_all_namespaces(_request_timeout=TIMEOUT)
    assert slices.items[1].endpoints[0].addresses == ["10.244.0.1"]
    nodes = core.list_node(_preload_content=False, _request_timeout=TIMEOUT)
    assert json.loads(nodes.data) == {
        "kind": "NodeList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": "12"},
        "items": [],
    }


def test_label_selector_and_python_api(env: Env) -> None:
    server = env.server
    server.create(service("web", "a", app="web", tier="front"))
    server.create(service("db", "a", app="db"))
    stored = server.apply(service("web", "a", "10.96.0.99", app="web"))
    assert stored["metadata"]["resourceVersion"] == "3"
    web = server.get("services", "a", "web")
    assert web is not None and web["spec"]["clusterIP"] == "10.96.0.99"
    assert web["metadata"]["uid"] == stored["metadata"]["uid"]
    assert server.get("Service", "a", "nope") is None
    assert [s["metadata"]["name"] for s in server.list_objects("service")] == ["db", "web"]

    def names(selector: str) -> list[str]:
        items = env.core.list_service_for_all_namespaces(
            label_selector=selector, _request_timeout=TIMEOUT
        ).items
        return [s.metadata.name for s in items]

    assert names("app=web") == ["web"]
    assert names("app!=web") == ["db"]
    assert names("tier") == []  # the apply replaced web's labels
    assert names("!tier") == ["db", "web"]
    with pytest.raises(ApiException) as err:
        names("app in (web)")
    assert err.value.status == 400


def test_unknown_paths_and_verbs_get_status_errors(env: Env) -> None:
    env.server.create(service("s0", "a"))
    with pytest.raises(ApiException) as err:
        env.core.read_namespaced_service("s0", "a", _request_timeout=TIMEOUT)
    assert err.value.status == 404
    assert status_of(err.value) | {"message": ""} == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "",
        "reason": "NotFound",
        "code": 404,
    }
    with pytest.raises(ApiException) as err:
        env.core.list_namespaced_pod("a", _request_timeout=TIMEOUT)
    assert err.value.status == 404
    with pytest.raises(ApiException) as err:
        env.core.create_namespaced_service("a", service("s1", "a"), _request_timeout=TIMEOUT)
    assert (err.value.status, status_of(err.value)["reason"]) == (405, "MethodNotAllowed")
    with pytest.raises(ApiException) as err:
        env.core.delete_namespaced_service("s0", "a", _request_timeout=TIMEOUT)
    assert err.value.status == 405
    assert env.server.get("Service", "a", "s0") is not None
    assert [r.method for r in env.server.requests] == ["GET", "GET", "POST", "DELETE"]
    assert len(env.core.list_service_for_all_namespaces(_request_timeout=TIMEOUT).items) == 1


def test_watch_delivers_history_then_live_events_in_order(env: Env) -> None:
    server, core = env.server, env.core
    server.create(service("s1", "a"))
    start = core.list_service_for_all_namespaces(_request_timeout=TIMEOUT).metadata
    server.update(service("s1", "a", "10.96.0.7", app="x"))
    server.create(endpoint_slice("s1-x", "a", "s1", ["10.244.0.1"]))  # another resource
    server.create(service("s2", "b"))
    deleted = server.delete("Service", "a", "s1")
    live = later(0.3, lambda: server.create(service("s3", "c")))

    seen: list[Obj] = []
    w = watch.Watch()
    for event in w.stream(
        core.list_service_for_all_namespaces,
        resource_version=start.resource_version,
        timeout_seconds=5,
        _request_timeout=TIMEOUT,
    ):
        seen.append(event)
        if len(seen) == 4:
            w.stop()
    live.join()

    assert [(e["type"], e["object"].metadata.name) for e in seen] == [
        ("MODIFIED", "s1"),
        ("ADDED", "s2"),
        ("DELETED", "s1"),
        ("ADDED", "s3"),
    ]
    rvs = [int(e["object"].metadata.resource_version) for e in seen]
    assert rvs == [2, 4, 5, 6]
    assert seen[2]["raw_object"] == deleted  # last state, with the deletion's version
    assert seen[2]["object"].spec.cluster_ip == "10.96.0.7"
    assert seen[2]["object"].metadata.labels == {"app": "x"}
    assert w.resource_version == "6"

    # No resourceVersion: synthetic ADDED events for what exists now (one namespace).
    server.create(endpoint_slice("s2-x", "b", "s2", ["10.244.0.2"]))
    w = watch.Watch()
    events = []
    for event in w.stream(
        env.discovery.list_namespaced_endpoint_slice, "a", allow_watch_bookmarks=True
    ):
        if event["type"] == "BOOKMARK":
            w.stop()
        events.append(event)
    assert [(e["type"], e["object"].metadata.name) for e in events[:-1]] == [("ADDED", "s1-x")]
    assert events[0]["object"].endpoints[0].addresses == ["10.244.0.1"]
    assert events[-1]["raw_object"]["metadata"] == {"resourceVersion": "7"}  # not deserialized


def test_raw_watch_bookmarks_and_timeout(env: Env) -> None:
    server, core = env.server, env.core
    server.create(service("s1", "a"))
    resp, events = raw_watch(
        core.list_service_for_all_namespaces, resource_version="1", allow_watch_bookmarks=True
    )
    assert resp.status == 200 and resp.headers["Transfer-Encoding"] == "chunked"
    began = time.monotonic()
    bookmark = next(events)
    assert 0.1 < time.monotonic() - began < 1.0  # bookmark_interval is 0.2 s
    assert bookmark == {
        "type": "BOOKMARK",
        "object": {"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}},
    }

    server.create(service("s2", "a"))
    added = next_event(events)
    assert (added["type"], added["object"]["metadata"]["name"]) == ("ADDED", "s2")
    assert added["object"]["metadata"]["resourceVersion"] == "2"
    # Bookmarks carry the global resourceVersion, bumped here by another resource.
    server.create(endpoint_slice("s2-x", "a", "s2", ["10.244.0.2"]))
    while (event := next(events))["object"]["metadata"]["resourceVersion"] != "3":
        assert event["type"] == "BOOKMARK"  # maybe one still at "2"
    assert event["type"] == "BOOKMARK"
    resp.release_conn()
    resp.close()

    # timeoutSeconds ends the stream cleanly (terminating chunk, no error).
    began = time.monotonic()
    resp, events = raw_watch(core.list_namespaced_service, "a", timeout_seconds=1)
    assert [e["object"]["metadata"]["name"] for e in events] == ["s1", "s2"]
    assert 0.9 < time.monotonic() - began < 3.0
    assert env.server.requests[-1].query == {"timeoutSeconds": "1", "watch": "true"}


def test_compacted_resource_version_and_expired_continue_get_410(env: Env) -> None:
    server, core = env.server, env.core
    for i in range(3):
        server.create(service(f"s{i}", "a"))
    page = core.list_service_for_all_namespaces(limit=1, _request_timeout=TIMEOUT)
    assert page.metadata._continue
    server.compact()
    server.create(service("s3", "a"))

    # The raw stream: a 200 whose only event is an ERROR Status, then the end.
    resp, events = raw_watch(core.list_service_for_all_namespaces, resource_version="1")
    assert resp.status == 200
    assert list(events) == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": "too old resource version: 1 (3)",
                "reason": "Expired",
                "code": 410,
            },
        }
    ]

    # Watch.stream retries a 410 once with the same version, then raises.
    before = len(server.requests)
    with pytest.raises(ApiException) as err:
        list(watch.Watch().stream(core.list_service_for_all_namespaces, resource_version="2"))
    assert err.value.status == 410
    assert "too old resource version: 2 (3)" in str(err.value.reason)
    assert [r.query.get("resourceVersion") for r in server.requests[before:]] == ["2", "2"]

    # The compaction point itself and later are still fine.
    _, events = raw_watch(
        core.list_service_for_all_namespaces, resource_version="3", allow_watch_bookmarks=True
    )
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in until_bookmark(events)] == [
        ("ADDED", "s3")
    ]

    with pytest.raises(ApiException) as err:
        core.list_service_for_all_namespaces(
            limit=1, _continue=page.metadata._continue, _request_timeout=TIMEOUT
        )
    assert (err.value.status, status_of(err.value)["reason"]) == (410, "Expired")
    with pytest.raises(ApiException) as err:
        core.list_service_for_all_namespaces(limit=1, _continue="garbage!")
    assert err.value.status == 410


def test_compaction_does_not_break_open_watches(env: Env) -> None:
    server = env.server
    resp, events = raw_watch(env.core.list_service_for_all_namespaces, resource_version="0")
    server.wait_until(lambda: server.open_watches("services") == 1)
    with server.batch():  # the watcher cannot have read these before compact()
        server.create(service("s1", "a"))
        server.create(service("s2", "a"))
        server.compact()
    assert [next_event(events)["object"]["metadata"]["name"] for _ in range(2)] == ["s1", "s2"]
    resp.close()


def test_fail_next_injects_http_errors(env: Env) -> None:
    server, core = env.server, env.core
    server.create(service("s1", "a"))
    server.fail_next(2)
    for _ in range(2):
        with pytest.raises(ApiException) as err:
            core.list_service_for_all_namespaces(_request_timeout=TIMEOUT)
        assert (err.value.status, status_of(err.value)["reason"]) == (500, "InternalError")
    assert len(core.list_service_for_all_namespaces(_request_timeout=TIMEOUT).items) == 1

    server.fail_next(1, code=503)
    with pytest.raises(ApiException) as err:  # raised even with _preload_content=False
        raw_watch(core.list_service_for_all_namespaces, resource_version="0")
    assert err.value.status == 503
    assert status_of(err.value)["code"] == 503
    _, events = raw_watch(core.list_service_for_all_namespaces, allow_watch_bookmarks=True)
    assert [e["object"]["metadata"]["name"] for e in until_bookmark(events)] == ["s1"]
    assert len(server.requests) == 5


def test_cut_watches_breaks_the_clients_stream(env: Env) -> None:
    server, core = env.server, env.core
    server.create(service("s1", "a"))
    resp, events = raw_watch(core.list_service_for_all_namespaces, resource_version="0")
    assert next(events)["object"]["metadata"]["name"] == "s1"
    server.wait_until(lambda: server.open_watches() == 1)
    server.cut_watches()
    with pytest.raises(urllib3.exceptions.ProtocolError):
        next(events)
    server.wait_until(lambda: server.open_watches() == 0)
    resp.release_conn()

    # Watch.stream does not hide it either: the error ends the generator.  (Cut only
    # once the response has begun: a connection reset before that, urllib3 retries.)
    w = watch.Watch()
    seen = []
    with pytest.raises(urllib3.exceptions.ProtocolError):
        for event in w.stream(core.list_service_for_all_namespaces, _request_timeout=TIMEOUT):
            seen.append(event["object"].metadata.name)
            server.cut_watches()
    assert seen == ["s1"]
    assert server.watches_started == 2

    # The client re-connects from what it saw and misses nothing.
    server.create(service("s2", "a"))
    _, events = raw_watch(core.list_service_for_all_namespaces, resource_version=w.resource_version)
    server.wait_until(lambda: server.watches_started == 3 and server.open_watches() == 1)
    assert next_event(events)["object"]["metadata"]["name"] == "s2"


def test_outage_then_recovery_delivers_changes_made_meanwhile(env: Env) -> None:
    server, core = env.server, env.core
    server.create(service("s1", "a"))
    rv = core.list_service_for_all_namespaces(_request_timeout=TIMEOUT).metadata.resource_version
    _, events = raw_watch(core.list_service_for_all_namespaces, resource_version=rv)
    server.wait_until(lambda: server.open_watches() == 1)

    server.set_down(True)
    with pytest.raises(urllib3.exceptions.ProtocolError):
        next(events)
    server.wait_until(lambda: server.open_watches() == 0)
    with pytest.raises(urllib3.exceptions.MaxRetryError):  # every connection is reset
        core.list_service_for_all_namespaces(_request_timeout=TIMEOUT)
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        raw_watch(core.list_service_for_all_namespaces, resource_version=rv)
    server.create(service("s2", "a"))
    server.update(service("s1", "a", "10.96.0.5"))
    server.delete("Service", "a", "s2")
    assert server.watches_started == 1

    server.set_down(False)
    _, events = raw_watch(core.list_service_for_all_namespaces, resource_version=rv)
    got = [next_event(events) for _ in range(3)]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in got] == [
        ("ADDED", "s2"),
        ("MODIFIED", "s1"),
        ("DELETED", "s2"),
    ]
    assert [e["object"]["metadata"]["resourceVersion"] for e in got] == ["2", "3", "4"]
    items = core.list_service_for_all_namespaces(_request_timeout=TIMEOUT).items
    assert [(s.metadata.name, s.spec.cluster_ip) for s in items] == [("s1", "10.96.0.5")]


def test_nodes_with_field_selector(env: Env) -> None:
    server, core = env.server, env.core
    for name in ("n1", "n2", "n3"):
        server.create(node(name, role="worker"))
    assert server.create(service("n2", "a"))  # same name, other resource
    nodes = core.list_node(_request_timeout=TIMEOUT).items
    assert [n.metadata.name for n in nodes] == ["n1", "n2", "n3"]
    assert {n.metadata.namespace for n in nodes} == {None}
    one = core.list_node(field_selector="metadata.name=n2", _request_timeout=TIMEOUT)
    assert [n.metadata.name for n in one.items] == ["n2"]
    assert server.requests[-1].query == {"fieldSelector": "metadata.name=n2"}
    assert core.list_node(field_selector="metadata.name=nx", _request_timeout=TIMEOUT).items == []

    _, events = raw_watch(core.list_node, field_selector="metadata.name=n2", resource_version="4")
    server.update(node("n1", role="x"))
    server.update(node("n2", role="y"))
    server.delete("Node", None, "n3")
    event = next_event(events)
    assert (event["type"], event["object"]["metadata"]) == (
        "MODIFIED",
        event["object"]["metadata"] | {"name": "n2", "labels": {"role": "y"}},
    )
    assert event["object"]["kind"] == "Node" and "namespace" not in event["object"]["metadata"]

    with pytest.raises(ApiException) as err:
        core.list_node(field_selector="spec.unschedulable=true", _request_timeout=TIMEOUT)
    assert err.value.status == 400


def test_kubeconfig_points_the_client_at_the_server(env: Env, tmp_path: Path) -> None:
    env.server.create(node("n1"))
    path = env.server.write_kubeconfig(tmp_path / "kubeconfig")
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=cfg)
    assert cfg.host == env.server.url
    with client.ApiClient(cfg) as api:
        nodes = client.CoreV1Api(api).list_node(_request_timeout=TIMEOUT).items
    assert [n.metadata.name for n in nodes] == ["n1"]


def test_bulk_load_and_large_list_are_fast(env: Env) -> None:
    server = env.server
    # CPU time of the whole process (server threads included), not wall time, so that a
    # busy machine does not fail the test; quiet, loading takes ~0.4 s, listing ~0.05 s.
    began = time.process_time()
    with server.batch():
        for i in range(10_000):
            ns, ip = f"ns{i % 50}", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
            server.create(service(f"svc{i}", ns, f"10.96.{i // 256}.{i % 256}", app=f"a{i}"))
            server.create(endpoint_slice(f"svc{i}-x", ns, f"svc{i}", [ip] * 10))
    loaded = time.process_time() - began
    assert loaded < 2.0, f"loading 20k objects took {loaded:.2f}s of CPU"
    assert server.resource_version == 20_000

    began = time.process_time()
    resp = env.discovery.list_endpoint_slice_for_all_namespaces(
        _preload_content=False, _request_timeout=TIMEOUT
    )
    raw = resp.data
    listed = time.process_time() - began
    body = json.loads(raw)
    assert listed < 0.5, f"listing 10k EndpointSlices ({len(raw)} B) took {listed:.2f}s of CPU"
    assert len(body["items"]) == 10_000
    assert body["metadata"]["resourceVersion"] == "20000"
    assert all(len(item["endpoints"]) == 10 for item in body["items"])

    def page(**kwargs: Any) -> Obj:
        resp = env.core.list_service_for_all_namespaces(
            limit=6000, _preload_content=False, _request_timeout=TIMEOUT, **kwargs
        )
        body: Obj = json.loads(resp.data)
        return body

    first = page()
    second = page(_continue=first["metadata"]["continue"])
    assert [len(first["items"]), len(second["items"])] == [6000, 4000]
    assert "continue" not in second["metadata"]
    assert first["metadata"]["remainingItemCount"] == 4000


def test_wire_format_over_a_plain_socket(env: Env) -> None:
    """Chunked framing, ``watch=1``, and a cut that leaves out the terminating chunk."""
    env.server.create(node("n1"))
    with socket.create_connection(("127.0.0.1", env.server.port), timeout=5) as sock:
        sock.sendall(b"GET /api/v1/nodes?watch=1&resourceVersion=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while not received.endswith(b"}\n\r\n"):
            received += sock.recv(65536)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"Transfer-Encoding: chunked" in head.split(b"\r\n")
        size, _, rest = body.partition(b"\r\n")
        assert int(size, 16) == len(rest) - 2 and rest.count(b"\n") == 2
        event = json.loads(rest)
        assert (event["type"], event["object"]["kind"], event["object"]["apiVersion"]) == (
            "ADDED",
            "Node",
            "v1",
        )
        env.server.cut_watches()
        tail = b""
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                tail += data
        assert tail == b""  # no "0\r\n\r\n": the stream just stops

    with socket.create_connection(("127.0.0.1", env.server.port), timeout=5) as sock:
        sock.sendall(b"HEAD /api/v1/nodes HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 405 ")


def test_bookmarks_come_as_kube_apiserver_sends_them(netns: Netns) -> None:
    """By default (kube-apiserver v1.24's watch cache): one BOOKMARK bookmark_lead
    before timeoutSeconds ends the watch, only when asked, none without a timeout."""
    sock = netns.open_socket()
    sock.bind(("127.0.0.1", 0))
    server = FakeApiServer(sock, bookmark_lead=0.5)
    with server, client.ApiClient(client.Configuration(host=server.url)) as api, netns.entered():
        core = client.CoreV1Api(api)
        server.create(service("s1", "a"))

        def timed(**kwargs: Any) -> list[tuple[float, str]]:
            began = time.monotonic()
            _, events = raw_watch(
                core.list_service_for_all_namespaces, resource_version="1", **kwargs
            )
            return [(time.monotonic() - began, e["type"]) for e in events]

        # asked, timeoutSeconds 2: a quiet watch gets one bookmark 0.5 s before its end
        seen = timed(allow_watch_bookmarks=True, timeout_seconds=2)
        ended = server.requests[-1]
        assert ended.query["allowWatchBookmarks"] == "true", ended
        assert [kind for _, kind in seen] == ["BOOKMARK"], seen
        assert 1.3 < seen[0][0] < 1.9, seen
        # not asked: nothing at all, the server just ends the watch on time
        began = time.monotonic()
        assert timed(timeout_seconds=1) == []
        assert 0.9 < time.monotonic() - began < 1.9
        # asked, but no timeoutSeconds: no bookmark (cut the watch after a while)
        resp, events = raw_watch(
            core.list_service_for_all_namespaces, resource_version="1", allow_watch_bookmarks=True
        )
        later(1.5, server.cut_watches).join()
        with pytest.raises(urllib3.exceptions.ProtocolError):
            next(events)
        resp.release_conn()
        assert server.bookmarks_sent == 1


def test_stop_closes_everything_and_joins_its_threads(env: Env) -> None:
    before = set(threading.enumerate())
    server = FakeApiServer(host="127.0.0.1", port=0)  # this thread is in env.ns: so is it
    with server, client.ApiClient(client.Configuration(host=server.url)) as api:
        core = client.CoreV1Api(api)
        _, events = raw_watch(core.list_node, resource_version="0")
        server.wait_until(lambda: server.open_watches() == 1)
        assert core.list_node(_request_timeout=TIMEOUT).items == []  # a kept-alive connection
        assert len(set(threading.enumerate()) - before) == 3  # accept loop + 2 connections
        began = time.monotonic()
        server.stop()
        assert time.monotonic() - began < 1.0
        with pytest.raises(urllib3.exceptions.ProtocolError):
            next(events)
    assert set(threading.enumerate()) <= before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    server.stop()  # idempotent
