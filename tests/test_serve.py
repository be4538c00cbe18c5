"""The health check and metrics servers of a real agent, reached inside a test namespace.

All traffic stays in a network namespace the test makes: the servers bind
there (their sockets are made in a thread that entered it) and the requests
are made from a thread inside it too.
"""

from __future__ import annotations

import datetime
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbctl.agent.http.server import Observability
from lbctl.agent.loop import Agent, AgentOptions
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.datapath.ebpf.inspect import STAT_NAMES
from lbctl.sources.kube import KubeSource
from lbctl.sources.manifests import ManifestSource
from tests import k8s_yaml
from tests.apiserver import FakeApiServer
from tests.kube_agent import kube_agent as kube_agent_in
from tests.netlab import Netns

pytestmark = pytest.mark.netns

LOCAL = ("127.0.0.1", 0)
PORTS = [("http", "TCP", 80)]
TARGET = [("http", "TCP", 8080)]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def ns() -> Iterator[Netns]:
    ns = Netns.create("obs")
    try:
        ns.ip("link", "set", "lo", "up")
        yield ns
    finally:
        ns.delete()


def publish(path: Path, name: str, vip: str, backends: list[str]) -> None:
    k8s_yaml.write(
        path,
        k8s_yaml.service(name, vip, PORTS),
        k8s_yaml.endpoint_slice(name, backends, TARGET),
    )


@pytest.fixture
def agent(tmp_path: Path, clean_datapath: BpfDatapath) -> Agent:
    """Two services, three backends, not synced yet."""
    publish(tmp_path / "web.yaml", "web", "10.96.0.10", ["10.9.0.1", "10.9.0.2"])
    publish(tmp_path / "api.yaml", "api", "10.96.0.11", ["10.9.0.3"])
    return Agent(ManifestSource(tmp_path), clean_datapath, AgentOptions(interfaces=[]))


def start(obs: Observability, ns: Netns, metrics: Any = LOCAL, healthz: Any = LOCAL) -> list[str]:
    with ns.entered():  # the listening sockets and server threads live in the namespace
        return obs.start(metrics, healthz)


@pytest.fixture
def served(agent: Agent, ns: Netns) -> Iterator[Observability]:
    obs = Observability(agent)
    try:
        assert start(obs, ns) == []
        yield obs
    finally:
        obs.stop()


def get(ns: Netns, address: tuple[str, int], path: str) -> tuple[int, str, bytes]:
    with ns.entered():
        conn = http.client.HTTPConnection(*address, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.getheader("Content-Type") or "", resp.read()
        finally:
            conn.close()


def health(obs: Observability, ns: Netns, path: str = "/healthz") -> tuple[int, dict[str, Any]]:
    status, ctype, body = get(ns, obs.addresses["healthz"], path)
    assert ctype == "application/json"
    return status, json.loads(body)


def scrape(obs: Observability, ns: Netns) -> Samples:
    status, ctype, body = get(ns, obs.addresses["metrics"], "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        assert family.documentation, f"{family.name} has no HELP text"
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_healthz_fails_until_the_first_sync(agent: Agent, served: Observability, ns: Netns) -> None:
    status, body = health(served, ns)
    assert status == 503 and body["synced"] is False
    agent.sync()
    for path in ("/healthz", "/livez"):
        status, body = health(served, ns, path)
        assert status == 200, body
        assert body["synced"] is True and body["mode"] == "ebpf" and body["problems"] == []
        now, last = parse_time(body["currentTime"]), parse_time(body["lastUpdated"])
        assert now.tzinfo is not None and datetime.timedelta(0) <= now - last < datetime.timedelta(
            seconds=30
        )
    # the metrics port answers health checks too, as kube-proxy's does
    assert get(ns, served.addresses["metrics"], "/healthz")[0] == 200
    assert get(ns, served.addresses["metrics"], "/proxyMode")[2] == b"ebpf\n"
    for server in ("healthz", "metrics"):  # the document `lbctl status` reads
        status, _, raw = get(ns, served.addresses[server], "/statusz")
        assert status == 200 and json.loads(raw)["counts"]["frontends"] == 2
    assert get(ns, served.addresses["healthz"], "/nothing")[0] == 404


def test_healthz_fails_when_the_loop_stops_ticking(
    agent: Agent, served: Observability, ns: Netns
) -> None:
    agent.sync()
    agent.last_tick = time.monotonic() - 45  # the default timeout is 30 s
    status, body = health(served, ns)
    assert status == 503 and body["synced"] is True
    lag = parse_time(body["currentTime"]) - parse_time(body["lastUpdated"])
    assert abs(lag.total_seconds() - 45) < 1
    agent.last_tick = time.monotonic()
    assert health(served, ns)[0] == 200


def test_metrics_describe_the_agent_and_the_maps(
    agent: Agent, served: Observability, ns: Netns
) -> None:
    agent.sync()
    dp = agent.datapath
    assert isinstance(dp, BpfDatapath)
    m = scrape(served, ns)
    assert value(m, "lbctl_frontends") == 2
    assert value(m, "lbctl_backends") == 3
    assert value(m, "lbctl_frontend_errors") == 0
    assert value(m, "lbctl_invalid_objects") == 0
    assert 0 < value(m, "lbctl_first_sync_seconds") == agent.sync_seconds
    assert 0 <= value(m, "lbctl_last_tick_age_seconds") < 30
    for name, entries, capacity in [
        ("services", 2, dp.settings.max_services),
        ("backends", 3, dp.settings.max_backends),
        ("slots", 3, dp.settings.max_slots),
    ]:
        assert value(m, "lbctl_map_entries", map=name) == entries
        assert value(m, "lbctl_map_capacity", map=name) == capacity
    assert value(m, "lbctl_map_operations_total") == dp.table.map_ops > 0
    for verdict in STAT_NAMES.values():  # the session's datapath may have seen packets
        assert value(m, "lbctl_verdicts_total", verdict=verdict) >= 0
    assert value(m, "lbctl_change_apply_latency_seconds_count") == 0
    assert not any(name.startswith("lbctl_source_") for name, _ in m)  # not a KubeSource


def test_an_applied_change_is_timed(
    agent: Agent, served: Observability, ns: Netns, tmp_path: Path
) -> None:
    agent.sync()
    publish(tmp_path / "api.yaml", "api", "10.96.0.11", ["10.9.0.3", "10.9.0.4"])
    (tmp_path / "bad.yaml").write_text("kind: [oops\n")
    assert agent.step()  # one frontend updated
    m = scrape(served, ns)
    assert value(m, "lbctl_change_apply_latency_seconds_count") == 1
    assert 0 < value(m, "lbctl_change_apply_latency_seconds_sum") < 10
    assert value(m, "lbctl_change_apply_latency_seconds_bucket", le="10.0") == 1
    assert value(m, "lbctl_backends") == 4
    assert value(m, "lbctl_map_entries", map="slots") == 4
    assert value(m, "lbctl_invalid_objects") == 1
    # an unreadable file is reported, but the maps still serve what they hold
    status, body = health(served, ns)
    assert status == 200 and len(body["problems"]) == 1 and "bad.yaml" in body["problems"][0]


def test_scrapes_while_the_loop_applies_changes(
    agent: Agent, served: Observability, ns: Netns, tmp_path: Path
) -> None:
    """Scrapes read the agent's state from another thread while the loop changes it."""
    agent.options.poll_interval_s = 0.01
    stop = threading.Event()
    loop = threading.Thread(target=agent.run, args=(stop,), name="agent-loop")
    loop.start()
    try:
        assert agent.synced.wait(10)
        for i in range(40):
            publish(tmp_path / f"s{i}.yaml", f"s{i}", f"10.96.1.{i}", [f"10.9.1.{i}"])
            assert value(scrape(served, ns), "lbctl_frontends") >= 2
            assert health(served, ns)[0] == 200
        deadline = time.monotonic() + 30  # a hang guard: the machine may be busy
        # planned first, then written: the map may trail the plan by the apply under way
        while (m := scrape(served, ns))[("lbctl_frontends", frozenset())] < 42 or (
            value(m, "lbctl_map_entries", map="services") < 42
        ):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert value(m, "lbctl_map_entries", map="services") == 42
        assert value(m, "lbctl_map_entries", map="backends") == 43
        assert value(m, "lbctl_change_apply_latency_seconds_count") >= 1
        assert value(m, "lbctl_last_tick_age_seconds") < 1
    finally:
        stop.set()
        loop.join()


def test_a_port_in_use_is_reported_and_the_other_server_runs(agent: Agent, ns: Netns) -> None:
    with ns.entered():
        taken = socket.create_server(("127.0.0.1", 0))
    obs = Observability(agent)
    try:
        address = taken.getsockname()
        problems = start(obs, ns, metrics=address)
        assert problems == [
            f"metrics server on 127.0.0.1:{address[1]}: address in use; set "
            'metricsBindAddress/--metrics-bind-address to another port or "" to disable'
        ]
        assert set(obs.addresses) == {"healthz"}
        agent.sync()
        assert health(obs, ns)[0] == 200
    finally:
        obs.stop()
        taken.close()


def test_disabled_servers_and_stop_leave_no_thread(agent: Agent, ns: Netns) -> None:
    before = set(threading.enumerate())
    obs = Observability(agent)
    assert start(obs, ns, metrics=None, healthz=None) == []
    assert obs.addresses == {}
    obs.stop()
    obs = Observability(agent)
    start(obs, ns)
    agent.sync()
    for _ in range(3):
        health(obs, ns)
        scrape(obs, ns)
    assert set(threading.enumerate()) - before
    addresses = obs.addresses
    obs.stop()
    assert set(threading.enumerate()) - before == set()
    assert agent.observers == []
    for address in addresses.values():
        with pytest.raises(ConnectionRefusedError):
            get(ns, address, "/healthz")


def test_two_agents_in_one_process_do_not_clash(
    agent: Agent, served: Observability, ns: Netns, tmp_path: Path
) -> None:
    other = Observability(agent)  # its own registry: same metric names, no error
    try:
        start(other, ns)
        agent.sync()
        assert value(scrape(other, ns), "lbctl_frontends") == 2
    finally:
        other.stop()


# -- a KubeSource: trouble with the API is reported, not fatal -------------------------


@pytest.fixture
def kube_agent(ns: Netns, clean_datapath: BpfDatapath) -> Iterator[tuple[Agent, FakeApiServer]]:
    with kube_agent_in(ns, clean_datapath) as made:
        yield made


def test_api_outage_is_a_problem_not_a_failure(
    kube_agent: tuple[Agent, FakeApiServer], ns: Netns
) -> None:
    agent, server = kube_agent
    obs = Observability(agent)
    try:
        start(obs, ns)
        agent.sync()  # waits for Services and EndpointSlices; the Node may come later
        source = agent.source
        assert isinstance(source, KubeSource)
        deadline = time.monotonic() + 10
        while not all(r.lists for r in source.reflectors.values()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        m = scrape(obs, ns)
        for kind in ("Service", "EndpointSlice", "Node"):
            assert value(m, "lbctl_source_up", resource=kind) == 1
            assert value(m, "lbctl_source_lists_total", resource=kind) == 1
        assert value(m, "lbctl_frontends") == 1
        assert health(obs, ns)[1]["problems"] == []

        server.set_down(True)
        deadline = time.monotonic() + 10
        while len(source.trouble_by_kind) < 3:
            assert time.monotonic() < deadline, source.trouble_by_kind
            time.sleep(0.05)
        status, body = health(obs, ns)
        assert status == 200 and len(body["problems"]) == 3
        assert value(scrape(obs, ns), "lbctl_source_up", resource="Service") == 0

        server.set_down(False)
        deadline = time.monotonic() + 10
        while source.trouble_by_kind:
            assert time.monotonic() < deadline, source.trouble_by_kind
            time.sleep(0.05)
        assert health(obs, ns)[1]["problems"] == []
        assert value(scrape(obs, ns), "lbctl_source_up", resource="Service") == 1
    finally:
        obs.stop()
