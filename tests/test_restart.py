"""A `kill -9` of the agent: traffic keeps flowing, the restart adopts and repairs.

The agent follows tests/apiserver.py (standing in for kube-apiserver, which
cannot be installed here) from the node's namespace through a kubeconfig,
as it would follow a real API server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import k8s_yaml
from tests.agent_proc import AgentProcess
from tests.apiserver import FakeApiServer
from tests.netlab import (
    Cluster,
    Lab,
    RequestError,
    TcpServer,
    TcpSession,
    build_cluster,
    tcp_request,
)

pytestmark = pytest.mark.netns

WEB, OLD = "10.96.0.10", "10.96.0.11"


@pytest.fixture
def cluster() -> Iterator[tuple[Cluster, FakeApiServer]]:
    with Lab() as lab:
        cluster = build_cluster(lab, pods=3)
        sock = cluster.node.open_socket()
        sock.bind(("127.0.0.1", 0))
        server = FakeApiServer(sock).start()
        cluster.node.on_delete(server.stop)
        for pod in cluster.pods:
            TcpServer(pod, 8080)
            TcpServer(pod, 9090)
        yield cluster, server


def agent(
    cluster: Cluster, server: FakeApiServer, tmp: Path, pin_dir: Path, n: int
) -> AgentProcess:
    kubeconfig = server.write_kubeconfig(tmp / "kubeconfig")
    return AgentProcess(
        cluster.node,
        None,
        pin_dir,
        tmp / f"agent{n}.log",
        "--kubeconfig",
        str(kubeconfig),
        "--hostname-override",
        "node-a",
    )


def frontends(proc: AgentProcess) -> dict[str, list[str]]:
    return {
        f"{f['address']}:{f['port']}/{f['protocol']}": sorted(b["address"] for b in f["backends"])
        for f in proc.dump()["frontends"]
    }


def test_kill_9_keeps_connections_and_the_restart_removes_what_went_stale(
    cluster: tuple[Cluster, FakeApiServer], tmp_path: Path, pin_dir: Path
) -> None:
    lab, server = cluster
    ips = [p.ip for p in lab.pods]
    server.apply(k8s_yaml.service("web", WEB, [("http", "TCP", 80)]))
    server.apply(k8s_yaml.endpoint_slice("web", ips, [("http", "TCP", 8080)]))
    server.apply(k8s_yaml.service("old", OLD, [("http", "TCP", 80)]))
    server.apply(k8s_yaml.endpoint_slice("old", ips[:1], [("http", "TCP", 9090)]))

    first = agent(lab, server, tmp_path, pin_dir, 1).start()
    second = agent(lab, server, tmp_path, pin_dir, 2)
    try:
        first.wait_for_log("synced:")
        assert tcp_request(lab.client, OLD, 80).pod == "pod0"
        with TcpSession(lab.client, WEB, 80) as session:
            pod = session.ask("before").pod
            first.kill()
            # The datapath outlives its agent: the connection and new ones work.
            assert session.ask("agent dead").pod == pod
            assert tcp_request(lab.client, WEB, 80).pod in {"pod0", "pod1", "pod2"}
            # Meanwhile the API moves on: a service goes, another changes.
            server.delete("services", "test", "old")
            server.delete("endpointslices", "test", "old-1")
            server.apply(k8s_yaml.endpoint_slice("web", ips[1:], [("http", "TCP", 8080)]))

            second.start()
            second.wait_for_log("synced:")
            assert "adopted 2 frontends" in second.log_text()
            assert session.ask("after restart").pod == pod, "the established flow survived"
            dump = frontends(second)
            assert set(dump) == {f"{WEB}:80/TCP"}, f"stale frontend left behind: {dump}"
            assert dump[f"{WEB}:80/TCP"] == sorted(ips[1:])
            ports = {b["port"] for f in second.dump()["frontends"] for b in f["backends"]}
            assert ports == {8080}, "the deleted service's backends are gone"
            fresh = {tcp_request(lab.client, WEB, 80).pod for _ in range(30)}
            assert fresh == {"pod1", "pod2"}
        with pytest.raises(RequestError):
            tcp_request(lab.client, OLD, 80, timeout=0.5)
    finally:
        second.stop()
