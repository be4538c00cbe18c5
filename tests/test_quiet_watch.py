"""A quiet watch is no outage; a hung one is noticed and replaced.

The API server (tests/apiserver.py) sends BOOKMARKs as kube-apiserver v1.24
does: only when asked, one shortly before the watch's timeoutSeconds ends
it, none in between.  A resource nobody changes then sends nothing for a
whole watch, which the server ends on time: the reflector must take that as
the normal end of a watch (no WARNING or ERROR, no API error, no trouble)
and watch again.  Only a watch silent past its own timeoutSeconds plus a
margin (packets to the server dropped here, a peer gone without a reset) is
a failure, noticed and replaced.  Timeouts are scaled down to seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lbctl.agent.loop import Agent, AgentOptions
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.sources.kube import KubeSource
from tests import k8s_yaml
from tests.apiserver import FakeApiServer
from tests.netlab import Netns
from tests.test_kubesource import api_state, converge, eps, make_source, seed, synced

pytestmark = pytest.mark.netns

LEAD = 0.5  # s before a watch's end that its one bookmark comes (2 s on a real server)


@pytest.fixture
def api() -> Iterator[tuple[FakeApiServer, Netns]]:
    ns = Netns.create("quiet")
    try:
        sock = ns.open_socket()
        sock.bind(("127.0.0.1", 0))
        server = FakeApiServer(sock, bookmark_lead=LEAD).start()  # no periodic bookmarks
        ns.on_delete(server.stop)
        yield server, ns
    finally:
        ns.delete()


class Calls:
    """The keyword arguments of every WATCH call the reflectors make (a recording
    wrapper around the real client methods, not a mock: the calls go through)."""

    def __init__(self, source: KubeSource) -> None:
        self.watches: list[dict[str, Any]] = []
        for reflector in source.reflectors.values():
            real = reflector.list_func

            def record(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                if kwargs.get("watch"):
                    self.watches.append(kwargs)
                return _real(*args, **kwargs)

            reflector.list_func = record


def start(source: KubeSource, ns: Netns) -> None:
    with ns.entered():  # threads started here inherit the namespace
        source.start()


def test_a_quiet_watch_ends_on_the_servers_timeout_without_an_outage(
    api: tuple[FakeApiServer, Netns], caplog: pytest.LogCaptureFixture
) -> None:
    server, ns = api
    seed(server, 1)
    server.apply(k8s_yaml.node("node-a"))
    source = make_source(server, ns, watch_timeout_s=2, started=False)
    calls = Calls(source)
    caplog.set_level(logging.DEBUG, logger="lbctl")
    start(source, ns)
    try:
        assert source.wait_ready(10)
        began = time.monotonic()
        reflectors = source.reflectors.values()
        # nothing changes: each watch runs its 2 s and the server ends it, three times
        while any(r.watch_restarts["closed"] < 3 for r in reflectors):
            assert time.monotonic() - began < 20, {r.kind: r.watch_restarts for r in reflectors}
            time.sleep(0.1)
        took = time.monotonic() - began
    finally:
        source.stop()
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [], [r.getMessage() for r in loud]
    for r in reflectors:
        assert r.api_errors == 0 and r.watch_restarts["error"] == 0, (r.kind, r.watch_restarts)
        assert r.lists == 1, "a watch that ends on time resumes without listing again"
    assert source.trouble_by_kind == {}
    assert took >= 3 * 2 - 1, "the watches lasted their timeoutSeconds"
    ended = [m for m in caplog.messages if "the server ended the watch after" in m]
    assert len(ended) >= 9, caplog.messages
    # asked for on the wire, and the one bookmark per watch came
    wire = [q for q in (r.query for r in server.requests) if q.get("watch") == "true"]
    assert len(wire) >= 9
    assert all(q["allowWatchBookmarks"] == "true" and q["timeoutSeconds"] == "2" for q in wire)
    assert server.bookmarks_sent >= 9
    # the client waits longer than the server's timeout before it calls a watch dead
    for kwargs in calls.watches:
        _connect, read = kwargs["_request_timeout"]
        assert read > kwargs["timeout_seconds"], kwargs


def test_the_read_timeout_outlasts_the_default_watch_timeout(
    api: tuple[FakeApiServer, Netns],
) -> None:
    """With the agent's defaults (KubeSource as `lbctl run` makes it), a watch quiet for
    all of its timeoutSeconds is not cut by the client first: on a real server (v1.24) a
    quiet Node watch was called an outage every 2 minutes, as the client gave up after
    120 s on a 300 s watch that brought no bookmark before its end."""
    from kubernetes import client

    server, ns = api
    conf = client.Configuration()
    conf.host = server.url
    source = KubeSource(client.ApiClient(conf), "node-a")  # the defaults
    calls = Calls(source)
    start(source, ns)
    try:
        assert source.wait_ready(10)
        server.wait_until(lambda: server.open_watches() == 3)
    finally:
        source.stop()
    assert len(calls.watches) >= 3
    for kwargs in calls.watches:
        _connect, read = kwargs["_request_timeout"]
        timeout = kwargs["timeout_seconds"]
        assert kwargs["allow_watch_bookmarks"] is True
        assert read > timeout, f"the client cuts a quiet watch after {read} s of its {timeout} s"
        assert read - timeout <= 60, "a hung watch is still noticed soon after its timeout"


def test_a_watch_silent_past_its_timeout_is_noticed_and_replaced(
    api: tuple[FakeApiServer, Netns], clean_datapath: BpfDatapath
) -> None:
    """Packets to the API server vanish (no reset): past timeoutSeconds plus the
    margin the watch is declared dead, said why, and watched again once it works."""
    server, ns = api
    source = make_source(server, ns, watch_timeout_s=1, hang_margin_s=1.0)
    agent = Agent(source, clean_datapath, AgentOptions(interfaces=[]))
    try:
        seed(server, 2)
        synced(agent, server)
        rule = f"add rule inet lbtest in tcp dport {server.port} drop"
        ns.run("nft", "add table inet lbtest")
        ns.run("nft", "add chain inet lbtest in { type filter hook input priority 0 ; }")
        ns.run("nft", rule)
        try:
            deadline = time.monotonic() + 10
            while not source.trouble_by_kind and time.monotonic() < deadline:
                time.sleep(0.05)
            assert source.trouble_by_kind, "a watch that went silent was never noticed"
            said = next(iter(source.trouble_by_kind.values()))
            assert "past the timeoutSeconds=1" in said and "the connection is dead" in said, said
            server.apply(eps(1, ["10.1.0.11"]))
        finally:
            ns.run("nft", "delete table inet lbtest")
        converge(agent, lambda: api_state(server))
        assert any(r.watch_restarts["error"] for r in source.reflectors.values())
    finally:
        source.stop()
