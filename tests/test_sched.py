"""Schedulers and session affinity with real packets, through the agent.

A client namespace connects to a ClusterIP whose Service picks its scheduler
with the lbctl.io/scheduler annotation; three pods answer with their names.
The agent runs from a manifest directory, as in tests/test_clusterip.py.
"""

from __future__ import annotations

import collections
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import k8s_yaml
from tests.agent_proc import AgentProcess
from tests.netlab import (
    Cluster,
    Lab,
    Reply,
    TcpServer,
    TcpSession,
    build_cluster,
    tcp_request,
)

pytestmark = pytest.mark.netns

VIP = "10.96.0.20"
PORTS = [("http", "TCP", 80)]
TARGET_PORTS = [("http", "TCP", 8080)]
EXTRA_CLIENTS = [f"10.244.0.{200 + i}" for i in range(12)]  # more sources for sh


class Env:
    def __init__(self, cluster: Cluster, agent: AgentProcess, manifests: Path) -> None:
        self.cluster = cluster
        self.agent = agent
        self.manifests = manifests

    def publish(
        self,
        annotations: dict[str, str],
        slice_annotations: dict[str, str] | None = None,
        **spec: Any,
    ) -> None:
        svc = k8s_yaml.service("web", VIP, PORTS, **spec)
        svc["metadata"]["annotations"] = annotations
        eps = k8s_yaml.endpoint_slice("web", [p.ip for p in self.cluster.pods], TARGET_PORTS)
        if slice_annotations:
            eps["metadata"]["annotations"] = slice_annotations
        k8s_yaml.write(self.manifests / "web.yaml", svc, eps)

    def wait_for(self, scheduler: str, affinity: int = 0, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for fe in self.agent.dump()["frontends"]:
                if (
                    fe["scheduler"] == scheduler
                    and fe["affinity_timeout_s"] == affinity
                    and len(fe["backends"]) == len(self.cluster.pods)
                ):
                    return dict(fe)
            time.sleep(0.05)
        raise AssertionError(f"the frontend never became {scheduler}: {self.agent.dump()}")

    def request(self) -> str:
        return tcp_request(self.cluster.client, VIP, 80).pod


@pytest.fixture
def env(tmp_path: Path, pin_dir: Path) -> Iterator[Env]:
    with Lab() as lab:
        cluster = build_cluster(lab, pods=3)
        for pod in cluster.pods:
            TcpServer(pod, 8080)
        manifests = tmp_path / "manifests"
        manifests.mkdir()
        agent = AgentProcess(cluster.node, manifests, pin_dir, tmp_path / "agent.log")
        e = Env(cluster, agent, manifests)
        e.publish({})
        agent.start()
        agent.wait_for_log("synced:")
        try:
            yield e
        finally:
            agent.stop()


def test_rr_rotates_exactly(env: Env) -> None:
    env.publish({"lbctl.io/scheduler": "rr"})
    env.wait_for("rr")
    got = [env.request() for _ in range(12)]
    assert sorted(got[:3]) == ["pod0", "pod1", "pod2"]
    assert got == got[:3] * 4


def test_wrr_follows_slice_weights(env: Env) -> None:
    pods = env.cluster.pods
    weights = ",".join(f"{p.ip}={w}" for p, w in zip(pods, (1, 2, 3), strict=True))
    env.publish({"lbctl.io/scheduler": "wrr"}, {"lbctl.io/weights": weights})
    env.wait_for("wrr")
    got = collections.Counter(env.request() for _ in range(3000))
    shares = {pod: got[pod] / 3000 for pod in ("pod0", "pod1", "pod2")}
    for pod, want in zip(("pod0", "pod1", "pod2"), (1 / 6, 2 / 6, 3 / 6), strict=True):
        assert abs(shares[pod] - want) <= 0.03, shares


def request_from(env: Env, source: str) -> str:
    ns = env.cluster.client.ns
    with ns.open_socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.bind((source, 0))
        sock.connect((VIP, 80))
        sock.sendall(b"hi\n")
        raw = b""
        while b"\n" not in raw:
            data = sock.recv(4096)
            assert data, f"connection from {source} closed early"
            raw += data
    return Reply.parse(raw.split(b"\n", 1)[0].decode()).pod


def test_sh_keeps_each_source_on_one_backend(env: Env) -> None:
    client, node = env.cluster.client, env.cluster.node
    for addr in EXTRA_CLIENTS:
        client.ns.ip("addr", "add", f"{addr}/32", "dev", "eth0")
        node.ip("route", "add", f"{addr}/32", "dev", client.host_if)
    env.publish({"lbctl.io/scheduler": "sh"})
    env.wait_for("sh")
    seen: dict[str, set[str]] = {a: set() for a in EXTRA_CLIENTS}
    for _ in range(5):
        for addr in EXTRA_CLIENTS:
            seen[addr].add(request_from(env, addr))
    assert all(len(pods) == 1 for pods in seen.values()), seen
    assert len({pod for pods in seen.values() for pod in pods}) >= 2  # sources spread


def test_lc_avoids_backends_with_open_connections(env: Env) -> None:
    env.publish({"lbctl.io/scheduler": "lc"})
    env.wait_for("lc")
    client = env.cluster.client
    held = [TcpSession(client, VIP, 80) for _ in range(2)]
    try:
        busy = [s.ask().pod for s in held]
        assert len(set(busy)) == 2  # the second went to an idle backend, not the first's
        (idle,) = {"pod0", "pod1", "pod2"} - set(busy)
        # short connections (each closed before the next) all go to the idle one
        assert {env.request() for _ in range(10)} == {idle}
        held.append(TcpSession(client, VIP, 80))
        assert held[-1].ask().pod == idle
        # one open each; closing the first long one makes its backend the least loaded
        held.pop(0).close()
        assert {env.request() for _ in range(5)} == {busy[0]}
    finally:
        for s in held:
            s.close()
    # every connection closed (with a RST): nothing counts as open any more
    backends = env.wait_for("lc")["backends"]
    assert [be["open_flows"] for be in backends] == [0, 0, 0], backends


def test_client_ip_affinity_holds_then_releases(env: Env) -> None:
    env.publish(
        {"lbctl.io/scheduler": "rr"},
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 2}},
    )
    env.wait_for("rr", affinity=2)
    first = env.request()
    for _ in range(5):
        time.sleep(0.3)  # traffic within the timeout keeps it
        assert env.request() == first
    time.sleep(2.5)  # silent for longer than the timeout
    # rr's turn did not move while affinity held: the next pick is the next pod
    after = env.request()
    assert after != first
    assert {env.request() for _ in range(5)} == {after}
