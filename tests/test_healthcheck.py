"""healthCheckNodePort servers of a real agent, asked from the outside client.

The world of tests/extlab.py: the agent runs on node A; a cloud load
balancer's probe is the outside client asking node A's address on the
Service's healthCheckNodePort.  Endpoints move between node A and node B
and the answer follows: 200 with the count of node A's ready endpoints, 503
when it has none (or only terminating ones).
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import k8s_yaml
from tests.extlab import NODE_IP
from tests.netlab import Lab, Netns
from tests.test_metrics import Env, load_balancer, scrape, start, value, wait_for

pytestmark = pytest.mark.netns

HC_PORT = 32100


def probe(ns: Netns, port: int = HC_PORT) -> tuple[int, dict[str, str], dict[str, Any]]:
    """What a load balancer's health probe gets from node A."""
    with ns.entered():
        conn = http.client.HTTPConnection(NODE_IP, port, timeout=5)
        try:
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), json.loads(resp.read())
        finally:
            conn.close()


def refused(ns: Netns, port: int) -> bool:
    with ns.entered(), socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((NODE_IP, port)) != 0


@pytest.fixture
def env(tmp_path: Path, pin_dir: Path) -> Iterator[Env]:
    with Lab() as lab:
        e = start(tmp_path, pin_dir, lab)
        try:
            yield e
        finally:
            e.agent.stop()


def local_web(env: Env, pods: list[str], port: int = HC_PORT, **conditions: Any) -> None:
    svc = load_balancer(
        "web",
        "10.96.0.50",
        [30080, 30081],
        externalTrafficPolicy="Local",
        healthCheckNodePort=port,
    )
    eps = env.slice("web", pods)
    for ep in eps["endpoints"]:
        name = next(
            p.name for p in env.world.pods_a + env.world.pods_b if p.ip == ep["addresses"][0]
        )
        ep["conditions"] = conditions.get(name, k8s_yaml.READY)
    env.write("web", svc, eps)


def answer(env: Env, status: int, count: int) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        try:
            got, headers, body = probe(env.world.client)
        except ConnectionRefusedError:  # not (yet) served
            return None
        return {"headers": headers, "body": body} if got == status else None

    found: dict[str, Any] = wait_for(check, f"health check answers {status}")
    body = found["body"]
    assert body == {
        "service": {"namespace": "test", "name": "web"},
        "localEndpoints": count,
        "serviceProxyHealthy": True,
    }
    headers = found["headers"]
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"
    return body


def test_answers_follow_the_local_endpoints(env: Env) -> None:
    local_web(env, ["a0", "a1", "b0"])
    env.agent.start()
    env.agent.wait_for_log("synced:")
    answer(env, 200, 2)  # node B's endpoint does not count on node A
    local_web(env, ["b0", "b1"])
    answer(env, 503, 0)
    # only terminating (still serving) here: 503, so the load balancer drains node A
    local_web(env, ["a0", "b0"], a0=k8s_yaml.TERMINATING)
    answer(env, 503, 0)
    local_web(env, ["a0", "a1", "b0"], a0=k8s_yaml.TERMINATING)
    answer(env, 200, 1)
    m = scrape(env.world.node_a)
    assert value(m, "lbctl_health_check_node_ports", state="serving") == 1
    assert value(m, "lbctl_health_check_node_ports", state="failed") == 0

    # a new port: the old one closes; the Service turning Cluster closes it all
    local_web(env, ["a0"], port=HC_PORT + 1)
    wait_for(lambda: refused(env.world.client, HC_PORT), "the old port closed")
    # the new port opens just after the old one closes: wait for it, then ask
    wait_for(lambda: not refused(env.world.client, HC_PORT + 1), "the new port open")
    assert probe(env.world.client, HC_PORT + 1)[0] == 200
    svc = load_balancer("web", "10.96.0.50", [30080, 30081])
    env.write("web", svc, env.slice("web", ["a0"]))
    wait_for(lambda: refused(env.world.client, HC_PORT + 1), "the health check closed")


def test_a_port_in_use_is_reported_and_retried_not_fatal(env: Env) -> None:
    with env.world.node_a.entered():
        squatter = socket.create_server(("0.0.0.0", HC_PORT))
    try:
        local_web(env, ["a0"])
        env.agent.start()
        env.agent.wait_for_log("synced:")
        env.agent.wait_for_log(f"healthCheckNodePort {HC_PORT} cannot be served: in use")
        m = scrape(env.world.node_a)
        assert value(m, "lbctl_health_check_node_ports", state="failed") == 1
        assert value(m, "lbctl_health_check_node_ports", state="serving") == 0
        # the agent serves on: the Service's traffic is balanced
        status, _, body = get_health(env)
        assert status == 200, body
    finally:
        squatter.close()
    # the next change retries the port
    env.write("other", k8s_yaml.service("other", "10.96.0.60", [("http", "TCP", 80)]))
    answer(env, 200, 1)
    m = scrape(env.world.node_a)
    assert value(m, "lbctl_health_check_node_ports", state="failed") == 0


def get_health(env: Env) -> tuple[int, dict[str, str], bytes]:
    from tests.test_metrics import get

    return get(env.world.node_a, ("127.0.0.1", 10249), "/healthz")
