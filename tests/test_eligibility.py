"""Which endpoints get traffic, with real packets: kube-proxy's eligibility rules.

Terminating endpoints that still serve, internalTrafficPolicy Local and topology
hints, through the real agent in the world of tests/extlab.py: node A runs the
agent (as node-a, whose Node in the manifest directory is in zone-a), pods a0 and
a1 live on it, b0 and b1 on node B, and the client is a pod on node A reaching
ClusterIPs.  One agent serves the whole module; each test has its own Service.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbctl.model import ServiceTable
from lbctl.sources.manifests import ManifestSource
from tests import extlab, k8s_yaml
from tests.agent_proc import AgentProcess
from tests.conftest import BPFFS, PIN_PREFIX, remove_pins
from tests.extlab import NODE_A, NODE_B, World
from tests.netlab import Lab, RequestError, TcpServer, TcpSession, tcp_request

PORTS = [("http", "TCP", 80)]
TARGETS = [("http", "TCP", 8080)]


class Env:
    def __init__(self, world: World, agent: AgentProcess, manifests: Path) -> None:
        self.world = world
        self.agent = agent
        self.manifests = manifests
        self.ips = {p.name: p.ip for p in world.pods_a + world.pods_b}
        self.names = {ip: name for name, ip in self.ips.items()}

    def set_zone(self, zone: str) -> None:
        k8s_yaml.write(self.manifests / "node.yaml", k8s_yaml.node(NODE_A, zone))

    def publish(
        self,
        name: str,
        vip: str,
        pods: list[str],
        conditions: dict[str, dict[str, bool]] | None = None,
        hints: dict[str, list[str]] | None = None,
        **spec: Any,
    ) -> None:
        """Service `name` on `vip`:80 over the named pods (each on its own node);
        conditions and hints are by pod name."""
        ips = [self.ips[p] for p in pods]
        k8s_yaml.write(
            self.manifests / f"{name}.yaml",
            k8s_yaml.service(name, vip, PORTS, **spec),
            k8s_yaml.endpoint_slice(
                name,
                ips,
                TARGETS,
                nodes={self.ips[p]: NODE_A if p.startswith("a") else NODE_B for p in pods},
                conditions={self.ips[p]: c for p, c in (conditions or {}).items()},
                hints={self.ips[p]: h for p, h in (hints or {}).items()},
            ),
        )

    def wait_for(self, vip: str, pods: set[str], flag: str | None = None) -> None:
        """Until the maps give vip:80 exactly these pods (and the flag, if named)."""
        deadline = time.monotonic() + 10
        while True:
            frontends = [
                f for f in self.agent.dump()["frontends"] if f["address"] == vip and f["port"] == 80
            ]
            got = {
                self.names.get(b.get("address", ""), "?") for f in frontends for b in f["backends"]
            }
            if frontends and got == pods and (flag is None or flag in frontends[0]["flags"]):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{vip}: never {pods} {flag or ''}: {frontends}")
            time.sleep(0.05)

    def landed(self, vip: str, count: int = 30) -> set[str]:
        return {tcp_request(self.world.pod_client, vip, 80).pod for _ in range(count)}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("eligibility")
    pins = BPFFS / f"{PIN_PREFIX}eligibility"
    with Lab() as lab:
        world = extlab.build(lab, pods_a=2, pods_b=2)
        for pod in world.pods_a + world.pods_b:
            TcpServer(pod, 8080)
        manifests = tmp / "manifests"
        manifests.mkdir()
        agent = AgentProcess(
            world.node_a, manifests, pins, tmp / "agent.log", *extlab.agent_flags()
        )
        e = Env(world, agent, manifests)
        e.set_zone("zone-a")
        try:
            agent.start()
            agent.wait_for_log("synced:")
            yield e
        finally:
            agent.stop()
            remove_pins(pins)


@pytest.mark.netns
def test_serving_terminating_endpoints_serve_until_one_is_ready(env: Env) -> None:
    vip = "10.96.0.60"
    everyone = ["a0", "a1", "b0", "b1"]
    terminating = {p: k8s_yaml.TERMINATING for p in ("a0", "a1", "b0")}
    # b1 is terminating and no longer serving: never chosen
    env.publish("term", vip, everyone, conditions={**terminating, "b1": k8s_yaml.GONE})
    env.wait_for(vip, {"a0", "a1", "b0"})
    assert env.landed(vip) == {"a0", "a1", "b0"}
    with TcpSession(env.world.pod_client, vip, 80) as session:
        before = session.ask("before").pod
        # b0 becomes ready: the others are abandoned for new connections
        env.publish(
            "term",
            vip,
            everyone,
            conditions={**terminating, "b0": k8s_yaml.READY, "b1": k8s_yaml.GONE},
        )
        env.wait_for(vip, {"b0"})
        assert env.landed(vip) == {"b0"}
        assert session.ask("after").pod == before  # an open connection keeps its endpoint


@pytest.mark.netns
def test_internal_policy_local_uses_this_nodes_endpoints_or_drops(env: Env) -> None:
    vip = "10.96.0.61"
    env.publish("itp", vip, ["a0", "a1", "b0", "b1"], internalTrafficPolicy="Local")
    env.wait_for(vip, {"a0", "a1"})
    assert env.landed(vip) == {"a0", "a1"}
    # endpoints only on node B: dropped, not refused
    env.publish("itp", vip, ["b0", "b1"], internalTrafficPolicy="Local")
    env.wait_for(vip, set(), "drop-when-empty")
    started = time.monotonic()
    with pytest.raises(RequestError, match="timed out"):
        tcp_request(env.world.pod_client, vip, 80, timeout=1.0)
    assert time.monotonic() - started >= 0.9
    # no endpoint anywhere: refused at once
    env.publish("itp", vip, [], internalTrafficPolicy="Local")
    env.wait_for(vip, set())
    started = time.monotonic()
    with pytest.raises(RequestError, match="refused"):
        tcp_request(env.world.pod_client, vip, 80, timeout=2.0)
    assert time.monotonic() - started < 0.5


@pytest.mark.netns
def test_topology_hints_keep_traffic_in_the_nodes_zone(env: Env) -> None:
    vip = "10.96.0.62"
    everyone = ["a0", "a1", "b0", "b1"]
    hints = {"a0": ["zone-a"], "b0": ["zone-a"], "a1": ["zone-b"], "b1": ["zone-b"]}
    env.publish("topo", vip, everyone, hints=hints)
    env.wait_for(vip, {"a0", "b0"})
    assert env.landed(vip) == {"a0", "b0"}
    try:
        env.set_zone("zone-b")  # the Node's label changes: the agent re-plans
        env.wait_for(vip, {"a1", "b1"})
        assert env.landed(vip) == {"a1", "b1"}
    finally:
        env.set_zone("zone-a")
    # one ready endpoint without a hint: topology is not used at all
    env.publish("topo", vip, everyone, hints={p: z for p, z in hints.items() if p != "b1"})
    env.wait_for(vip, set(everyone))
    assert env.landed(vip, 40) == set(everyone)


def test_the_manifest_source_takes_its_own_node(tmp_path: Path) -> None:
    k8s_yaml.write(
        tmp_path / "nodes.yaml",
        k8s_yaml.node("node-a", "zone-a", ["192.168.0.2"]),
        k8s_yaml.node("node-b", "zone-b"),
    )
    table = ServiceTable()
    source = ManifestSource(tmp_path, "node-a")
    assert source.poll(table) == set()  # a Node touches no Service by itself
    assert table.node is not None
    assert (table.node.name, table.node.zone) == ("node-a", "zone-a")
    assert [str(a) for a in table.node.addresses] == ["192.168.0.2"]
    k8s_yaml.write(tmp_path / "nodes.yaml", k8s_yaml.node("node-b", "zone-b"))
    source.poll(table)
    assert table.node is None
    assert ManifestSource(tmp_path).poll(ServiceTable()) == set()  # no name: no Node
