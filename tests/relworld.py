"""The world of the reliability suites: tests/extlab.py's two nodes, an
outside client and pods, with echo servers on every pod, the agent on node A
following a manifests directory, and a "mirror" namespace where a fresh agent
can sync the same manifests to compare its maps with a survivor's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests import extlab, k8s_yaml, mapstate, netlab
from tests.agent_proc import AgentProcess
from tests.conftest import remove_pins
from tests.extlab import World
from tests.netlab import Lab, Netns, Pod, TcpServer, UdpServer

CLUSTER_IP = "10.96.0.50"
NODE_PORT = 30080  # TCP; UDP is NODE_PORT + 1
PORTS = [("http", "TCP", 80), ("dns", "UDP", 53)]
TARGETS = [("http", "TCP", 8080), ("dns", "UDP", 5353)]


def build(lab: Lab, pods_a: int = 2, pods_b: int = 2) -> World:
    world = extlab.build(lab, pods_a, pods_b)
    for pod in world.pods_a + world.pods_b:
        serve(pod)
    # wide client port ranges: thousands of FIN-closed connections sit in
    # TIME_WAIT for a minute
    for ns in (world.client, world.pod_client.ns):
        ns.sysctl("net.ipv4.ip_local_port_range", "10000 60999")
    return world


def serve(pod: Pod) -> tuple[TcpServer, UdpServer]:
    return TcpServer(pod, 8080), UdpServer(pod, 5353)


def web(
    world: World,
    pods: Iterable[Pod] | None = None,
    name: str = "web",
    cluster_ip: str = CLUSTER_IP,
    node_port: int = NODE_PORT,
    conditions: dict[str, dict[str, bool]] | None = None,
    **spec: object,
) -> list[dict[str, Any]]:
    """A NodePort Service on `pods` (default all) and its EndpointSlice."""
    chosen = list(world.pods_a + world.pods_b if pods is None else pods)
    svc = k8s_yaml.service(name, cluster_ip, PORTS, type="NodePort", **spec)
    for port in svc["spec"]["ports"]:
        port["nodePort"] = node_port if port["protocol"] == "TCP" else node_port + 1
    nodes = {p.ip: world.node_of(p) for p in chosen}
    ips = [p.ip for p in chosen]
    return [svc, k8s_yaml.endpoint_slice(name, ips, TARGETS, nodes=nodes, conditions=conditions)]


def many(count: int, prefix: str = "bulk", first_ip: int = 0) -> list[dict[str, Any]]:
    """`count` ClusterIP Services with two endpoints each (addresses in
    10.245.0.0/16, where nothing answers: only the maps matter)."""
    out = []
    for i in range(count):
        n = first_ip + i
        name = f"{prefix}-{i}"
        out.append(k8s_yaml.service(name, f"10.97.{n // 250}.{n % 250 + 1}", [("p", "TCP", 80)]))
        ips = [f"10.245.{n // 120}.{(n % 120) * 2 + 1}", f"10.245.{n // 120}.{(n % 120) * 2 + 2}"]
        out.append(k8s_yaml.endpoint_slice(name, ips, [("p", "TCP", 8080)]))
    return out


def agent(node: Netns, manifests: Path, pin_dir: Path, log: Path, *extra: str) -> AgentProcess:
    return AgentProcess(node, manifests, pin_dir, log, *extlab.agent_flags(), *extra)


def wait_synced(proc: AgentProcess, timeout: float = 180.0) -> float:
    """Until the agent's first sync; the seconds it took (a loaded machine
    compiles slowly: the bound is generous)."""
    began = time.monotonic()
    proc.wait_for_log("synced:", timeout=timeout)
    return time.monotonic() - began


def mirror(lab: Lab, of: Netns) -> Netns:
    """A namespace holding the same IPv4 addresses as `of` (so NodePorts
    answer on the same addresses), wired to nothing."""
    ns = lab.netns("mirror")
    netlab.veth(ns, "ext0", ns, "peer0")
    addrs = json.loads(of.ip("-j", "-4", "addr", "show").stdout)
    seen = set()
    for link in addrs:
        for a in link.get("addr_info", []):
            cidr = f"{a['local']}/{a['prefixlen']}"
            if a["local"].startswith("127.") or cidr in seen:
                continue
            seen.add(cidr)
            ns.ip("addr", "add", cidr, "dev", "ext0")
    return ns


def fresh_snapshot(
    lab: Lab, world: World, manifests: Path, pin_dir: Path, log: Path
) -> tuple[dict[str, Any], list[str]]:
    """What a fresh agent writes for the same manifests: one started in a
    mirror of node A with maps of its own, read back once it synced
    (tests/mapstate.py), then stopped and its maps removed."""
    fresh_pins = pin_dir.with_name(pin_dir.name + "-fresh")
    proc = agent(mirror(lab, world.node_a), manifests, fresh_pins, log)
    try:
        proc.start()
        wait_synced(proc)
        return mapstate.read(fresh_pins)
    finally:
        proc.stop()
        remove_pins(fresh_pins)
