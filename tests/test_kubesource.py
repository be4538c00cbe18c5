"""The informer against an API server: changes, cut watches, 410 Gone, outages.

tests/apiserver.py stands in for kube-apiserver (none can be installed on
this machine); the real `kubernetes` client talks to it over HTTP inside a
test network namespace, and the agent programs the session's real BPF maps.
Every check compares the maps with the API's own state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lbctl.agent.loop import Agent, AgentOptions
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.sources.informer import Backoff
from lbctl.sources.kube import KubeSource
from tests import k8s_yaml
from tests.apiserver import FakeApiServer
from tests.netlab import Netns
from tests.test_frontends import decoded

pytestmark = pytest.mark.netns

PORTS = [("http", "TCP", 80)]
TARGET = [("http", "TCP", 8080)]


@pytest.fixture
def api() -> Iterator[tuple[FakeApiServer, Netns]]:
    ns = Netns.create("api")
    try:
        sock = ns.open_socket()
        sock.bind(("127.0.0.1", 0))
        server = FakeApiServer(sock).start()
        ns.on_delete(server.stop)
        yield server, ns
    finally:
        ns.delete()


def make_source(server: FakeApiServer, ns: Netns, **options: Any) -> KubeSource:
    """A KubeSource whose reflector threads (started unless started=False) live in the namespace."""
    from kubernetes import client

    conf = client.Configuration()
    conf.host = server.url
    conf.retries = False  # as lbctl.sources.kube.api_client sets it
    started = options.pop("started", True)
    source = KubeSource(
        client.ApiClient(conf),
        "node-a",
        watch_timeout_s=options.pop("watch_timeout_s", 30),
        backoff=lambda: Backoff(0.05, 0.3),
        **options,
    )
    if started:
        with ns.entered():  # threads started here inherit the namespace
            source.start()
    return source


@pytest.fixture
def agent(api: tuple[FakeApiServer, Netns], clean_datapath: BpfDatapath) -> Iterator[Agent]:
    source = make_source(*api)
    agent = Agent(source, clean_datapath, AgentOptions(interfaces=[]))
    try:
        yield agent
    finally:
        source.stop()


def svc(i: int, **spec: Any) -> dict[str, Any]:
    return k8s_yaml.service(f"s{i}", f"10.96.0.{i}", PORTS, **spec)


def eps(i: int, addresses: list[str], suffix: str = "1", **kw: Any) -> dict[str, Any]:
    return k8s_yaml.endpoint_slice(f"s{i}", addresses, TARGET, suffix=suffix, **kw)


def seed(server: FakeApiServer, count: int) -> None:
    """Services s1..sCOUNT, each with one endpoint 10.1.0.i."""
    for i in range(1, count + 1):
        server.apply(svc(i))
        server.apply(eps(i, [f"10.1.0.{i}"]))


def api_state(server: FakeApiServer) -> dict[str, list[str]]:
    """What the maps must hold, worked out from the API's objects directly."""
    out: dict[str, list[str]] = {}
    slices = server.list_objects("endpointslices")
    for s in server.list_objects("services"):
        labels = s["metadata"].get("labels") or {}
        if "service.kubernetes.io/service-proxy-name" in labels:
            continue
        if s["spec"].get("clusterIP") in (None, "None"):  # headless or ExternalName
            continue
        name = s["metadata"]["name"]
        ready = {
            ep["addresses"][0]
            for sl in slices
            if sl["metadata"]["labels"]["kubernetes.io/service-name"] == name
            for ep in sl["endpoints"]
            if ep.get("conditions", {}).get("ready", True)
        }
        out[f"{s['spec']['clusterIP']}:80"] = sorted(ready)
    return out


def converge(agent: Agent, want: Callable[[], dict[str, list[str]]], timeout: float = 10) -> None:
    """Run the agent's loop body until the maps hold `want()`."""
    deadline = time.monotonic() + timeout
    while True:
        agent.source.wait(0.05)
        agent.step()
        got, expected = decoded(agent.datapath), want()  # type: ignore[arg-type]
        if got == expected:
            return
        assert time.monotonic() < deadline, f"maps {got} never became {expected}"


def step_until(agent: Agent, what: str, check: Callable[[], bool], timeout: float = 10) -> None:
    """Run the agent's loop body until `check()` holds (the watch events may still be
    on their way), failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"the agent never held {what}"
        agent.source.wait(0.05)
        agent.step()


def synced(agent: Agent, server: FakeApiServer) -> None:
    agent.sync()
    converge(agent, lambda: api_state(server))


def test_add_update_delete_reach_the_maps(agent: Agent, api: tuple[FakeApiServer, Netns]) -> None:
    server, _ = api
    server.apply(svc(1))
    server.apply(eps(1, ["10.1.0.1", "10.1.0.2"]))
    synced(agent, server)
    assert decoded(agent.datapath) == {"10.96.0.1:80": ["10.1.0.1", "10.1.0.2"]}  # type: ignore[arg-type]

    server.apply(svc(2))
    server.apply(eps(2, ["10.1.0.3"]))
    server.apply(eps(1, ["10.1.0.1", "10.1.0.4"]))  # one endpoint replaced
    converge(agent, lambda: api_state(server))
    assert api_state(server)["10.96.0.1:80"] == ["10.1.0.1", "10.1.0.4"]

    server.delete("endpointslices", "test", "s1-1")  # no endpoints left: rejected, not gone
    converge(agent, lambda: api_state(server))
    assert decoded(agent.datapath)["10.96.0.1:80"] == []  # type: ignore[arg-type]

    server.delete("services", "test", "s2")
    converge(agent, lambda: api_state(server))
    assert "10.96.0.2:80" not in decoded(agent.datapath)  # type: ignore[arg-type]


def test_slices_merge_dedupe_and_keep_conditions(
    agent: Agent, api: tuple[FakeApiServer, Netns]
) -> None:
    server, _ = api
    server.apply(svc(1))
    server.apply(eps(1, ["10.1.0.1", "10.1.0.2"], suffix="a"))
    server.apply(eps(1, ["10.1.0.2", "10.1.0.3"], suffix="b"))  # 10.1.0.2 in both
    server.apply(eps(1, ["10.1.0.9"], suffix="c", ready=False))  # not ready: not used
    synced(agent, server)
    assert decoded(agent.datapath) == {  # type: ignore[arg-type]
        "10.96.0.1:80": ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
    }
    table = agent.table

    def conditions() -> list[bool]:
        ref = table.services[_ref(1)].ref
        return sorted(ep.ready for sl in table.slices_of(ref) for ep in sl.endpoints)

    # the maps are the same with or without the not-ready slice c: wait for the table
    # to hold all three slices, not just for the maps
    step_until(agent, "the three slices", lambda: conditions() == [False, True, True, True, True])
    server.delete("endpointslices", "test", "s1-a")  # 10.1.0.2 stays through slice b
    converge(agent, lambda: {"10.96.0.1:80": ["10.1.0.2", "10.1.0.3"]})


def test_services_kube_proxy_leaves_alone_are_left_alone(
    agent: Agent, api: tuple[FakeApiServer, Netns]
) -> None:
    server, _ = api
    owned = svc(1)
    owned["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "other"}
    server.apply(owned)
    server.apply(svc(2, clusterIP="None"))  # headless
    external = svc(3, type="ExternalName", externalName="example.org")
    del external["spec"]["clusterIP"]
    server.apply(external)
    server.apply(svc(4))
    for i in (1, 2, 3, 4):
        server.apply(eps(i, ["10.1.0.1"]))
    synced(agent, server)
    assert decoded(agent.datapath) == {"10.96.0.4:80": ["10.1.0.1"]}  # type: ignore[arg-type]
    # A service that gains the label is handed over: lbctl drops it.
    labelled = svc(4)
    labelled["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "other"}
    server.apply(labelled)
    converge(agent, lambda: {})


def test_an_invalid_object_keeps_its_last_version_and_the_others_go_on(
    agent: Agent, api: tuple[FakeApiServer, Netns]
) -> None:
    server, _ = api
    seed(server, 1)
    synced(agent, server)
    broken = svc(1)
    broken["spec"]["ports"][0]["port"] = 70000
    server.apply(broken)
    server.apply(svc(2))
    server.apply(eps(2, ["10.1.0.2"]))
    converge(agent, lambda: {"10.96.0.1:80": ["10.1.0.1"], "10.96.0.2:80": ["10.1.0.2"]})
    source = agent.source
    assert isinstance(source, KubeSource)
    [problem] = source.problems.values()
    assert "Service test/s1" in problem and "spec.ports[0].port" in problem


def test_a_watch_cut_mid_stream_resumes_without_listing_again(
    agent: Agent, api: tuple[FakeApiServer, Netns]
) -> None:
    server, _ = api
    seed(server, 3)
    synced(agent, server)
    lists_before = _lists(agent)
    for round_ in range(3):
        server.cut_watches()
        server.apply(eps(1, [f"10.1.1.{round_}"]))
        if round_ < 2:
            server.delete("services", "test", f"s{round_ + 2}")
        converge(agent, lambda: api_state(server))
    assert _lists(agent) == lists_before, "a cut watch must resume, not re-list"


def test_410_gone_lists_again_and_changes_only_what_differs(
    agent: Agent, api: tuple[FakeApiServer, Netns]
) -> None:
    server, _ = api
    seed(server, 5)
    synced(agent, server)
    table = agent.datapath.table  # type: ignore[attr-defined]
    kept = {key: fe.ident for key, fe in table.frontends.items()}
    lists_before = _lists(agent)

    server.set_down(True)  # the watch breaks and cannot resume...
    server.delete("services", "test", "s1")
    server.apply(eps(2, ["10.1.0.2", "10.1.0.22"]))
    server.apply(svc(6))
    server.apply(eps(6, ["10.1.0.6"]))
    server.compact()  # ...and by the time it can, its resourceVersion is gone
    server.set_down(False)
    converge(agent, lambda: api_state(server))

    assert _lists(agent) > lists_before, "a 410 must be answered with a new LIST"
    # Services that did not change kept their frontends: nothing valid was
    # removed and added again (a new frontend would have a new id).
    for key, ident in kept.items():
        if str(key.address) in ("10.96.0.3", "10.96.0.4", "10.96.0.5", "10.96.0.2"):
            assert table.frontends[key].ident == ident


def test_no_change_during_an_outage_then_converge_to_the_api(
    agent: Agent, api: tuple[FakeApiServer, Netns]
) -> None:
    server, _ = api
    seed(server, 3)
    synced(agent, server)
    before = decoded(agent.datapath)  # type: ignore[arg-type]
    ops = agent.datapath.table.map_ops  # type: ignore[attr-defined]

    server.set_down(True)
    server.delete("services", "test", "s1")
    server.apply(eps(2, ["10.1.0.20", "10.1.0.21"]))
    server.apply(svc(4))
    server.apply(eps(4, ["10.1.0.4"]))
    source = agent.source
    assert isinstance(source, KubeSource)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:  # the reflectors retry and fail meanwhile
        agent.source.wait(0.05)
        agent.step()
    assert decoded(agent.datapath) == before  # type: ignore[arg-type]
    assert agent.datapath.table.map_ops == ops  # type: ignore[attr-defined]
    assert source.trouble_by_kind, "the outage is reported"

    server.set_down(False)
    converge(agent, lambda: api_state(server))
    deadline = time.monotonic() + 5
    while source.trouble_by_kind and time.monotonic() < deadline:
        time.sleep(0.05)  # the Node reflector may still be backing off
    assert not source.trouble_by_kind


def test_api_errors_are_retried_with_backoff(
    api: tuple[FakeApiServer, Netns], clean_datapath: BpfDatapath
) -> None:
    server, ns = api
    server.apply(svc(1))
    server.apply(eps(1, ["10.1.0.1"]))
    server.fail_next(6, code=500)  # the first LISTs fail
    source = make_source(server, ns)
    try:
        agent = Agent(source, clean_datapath, AgentOptions(interfaces=[]))
        synced(agent, server)
        assert decoded(clean_datapath) == {"10.96.0.1:80": ["10.1.0.1"]}
        failed = [r for r in server.requests if "watch" not in r.query]
        assert len(failed) >= 7, "every failed LIST was tried again"
    finally:
        source.stop()


def test_each_applied_change_records_its_latency_from_the_watch(
    agent: Agent, api: tuple[FakeApiServer, Netns]
) -> None:
    """The latency the agent reports (for metrics and the benchmark) is real:
    never more than the time the test itself saw from the API write to the maps."""
    server, _ = api
    seed(server, 1)
    synced(agent, server)
    agent.latencies.clear()
    for n in range(2, 22):
        written = time.monotonic()
        server.apply(eps(1, [f"10.1.0.{n}"]))
        converge(agent, lambda n=n: {"10.96.0.1:80": [f"10.1.0.{n}"]})  # type: ignore[misc]
        seen = time.monotonic() - written
        assert 0 <= agent.latencies[-1] <= seen
    assert len(agent.latencies) == 20  # one batch per change, each recorded


def _lists(agent: Agent) -> int:
    source = agent.source
    assert isinstance(source, KubeSource)
    return sum(r.lists for r in source.reflectors.values())


def _ref(i: int) -> Any:
    from lbctl.model import ServiceRef

    return ServiceRef("test", f"s{i}")


def test_a_restart_that_cannot_list_endpointslices_keeps_the_adopted_backends(
    api: tuple[FakeApiServer, Netns], clean_datapath: BpfDatapath
) -> None:
    """Services without their slices would look endpoint-less: nothing is applied
    until both are listed, and the adopted frontends keep serving meanwhile."""
    server, ns = api
    server.apply(svc(1))
    server.apply(eps(1, ["10.1.0.1", "10.1.0.2"]))
    first = make_source(server, ns)
    try:
        synced(Agent(first, clean_datapath, AgentOptions(interfaces=[])), server)
    finally:
        first.stop()
    before = decoded(clean_datapath)

    blocked = threading.Event()
    blocked.set()
    second = make_source(server, ns, started=False)
    reflector = second.reflectors["EndpointSlice"]
    real_list = reflector.list_func

    def slices(**kwargs: Any) -> Any:
        if blocked.is_set():  # as an RBAC gap or an overloaded server would
            raise OSError("EndpointSlice list refused for this test")
        return real_list(**kwargs)

    reflector.list_func = slices
    with ns.entered():
        second.start()
    try:
        agent = Agent(second, clean_datapath, AgentOptions(interfaces=[], ready_timeout_s=1))
        agent.sync()
        server.delete("services", "test", "s1")
        server.apply(svc(2))
        server.apply(eps(2, ["10.1.0.3"]))
        for _ in range(10):
            agent.source.wait(0.05)
            agent.step()
        assert decoded(clean_datapath) == before
        blocked.clear()  # the slices can be listed again: now everything converges
        converge(agent, lambda: api_state(server))
        assert decoded(clean_datapath) == {"10.96.0.2:80": ["10.1.0.3"]}
    finally:
        second.stop()


def test_stop_ends_every_reflector_even_mid_watch(api: tuple[FakeApiServer, Netns]) -> None:
    server, ns = api
    seed(server, 1)
    source = make_source(server, ns)
    assert source.wait_ready(10)
    server.wait_until(lambda: server.open_watches() == 3)
    source.stop()
    threads = [r._thread for r in source.reflectors.values()]
    assert not any(t.is_alive() for t in threads), "a reflector outlived stop()"


def test_objects_gone_from_a_relist_take_their_problems_along(
    api: tuple[FakeApiServer, Netns],
) -> None:
    server, ns = api
    source = make_source(server, ns, started=False)  # fed by hand, no traffic
    broken = svc(1)
    broken["metadata"]["resourceVersion"] = "7"
    broken["spec"]["ports"][0]["port"] = 0
    source.replace("Service", [broken], time.monotonic())
    assert list(source.problems) == [("Service", ("test", "s1"))]
    source.replace("Service", [], time.monotonic())
    assert source.problems == {}


def test_an_object_made_again_invalid_while_away_does_not_keep_the_old_one(
    agent: Agent, api: tuple[FakeApiServer, Netns]
) -> None:
    """Deleted and made again under the same name (a new uid) while the watch was
    away: the LIST after it is all the agent sees.  An invalid new object must not
    keep the deleted one's frontends and backends, as a same-uid invalid update
    keeps its last valid version: its DELETED event, had it come, would have
    removed them (stale backends after an API blip)."""
    server, _ = api
    seed(server, 3)
    synced(agent, server)
    server.set_down(True)
    server.delete("services", "test", "s1")
    bad = svc(1)
    bad["spec"]["ports"][0]["port"] = 70000
    server.create(bad)  # s1 again, a new uid, invalid
    server.delete("endpointslices", "test", "s2-1")
    server.create(eps(2, ["10.1.0.300"]))  # s2's slice again, a new uid, invalid
    server.apply(eps(3, ["10.1.0.3", "10.1.0.33"]))  # an ordinary change, for contrast
    server.compact()
    server.set_down(False)
    converge(agent, lambda: {"10.96.0.2:80": [], "10.96.0.3:80": ["10.1.0.3", "10.1.0.33"]})
    source = agent.source
    assert isinstance(source, KubeSource)
    assert sorted(source.problems.values()) == [
        "EndpointSlice test/s2-1: endpoints[0].addresses[0]: '10.1.0.300' is not a valid IP "
        "address; removing the object of this name it replaced (another uid)",
        "Service test/s1: spec.ports[0].port: 70000 is out of range (1-65535); removing the "
        "object of this name it replaced (another uid)",
    ]
