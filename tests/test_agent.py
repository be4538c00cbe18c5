"""The agent loop in-process against real maps (attached nowhere)."""

from __future__ import annotations

from pathlib import Path

from lbctl.agent.loop import Agent, AgentOptions
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.datapath.ebpf.frontends import FrontendWriter
from lbctl.sources.manifests import ManifestSource
from tests import k8s_yaml


def services_in_maps(dp: BpfDatapath) -> set[str]:
    return {f"{fe.service}" for fe in dp.table.frontends.values()}


def publish(path: Path, name: str, vip: str) -> None:
    k8s_yaml.write(
        path,
        k8s_yaml.service(name, vip, [("http", "TCP", 80)]),
        k8s_yaml.endpoint_slice(name, ["10.9.0.1"], [("http", "TCP", 8080)]),
    )


def restart(dp: BpfDatapath, manifests: Path) -> Agent:
    """A new agent process: it adopts what the pinned maps hold."""
    dp.table = FrontendWriter(dp.maps)
    dp.table.adopt()
    agent = Agent(ManifestSource(manifests), dp, AgentOptions(interfaces=[]))
    agent.sync()
    return agent


def test_restart_with_an_unreadable_file_keeps_what_it_may_hold(
    tmp_path: Path, clean_datapath: BpfDatapath
) -> None:
    dp = clean_datapath
    publish(tmp_path / "a.yaml", "web", "10.96.0.10")
    publish(tmp_path / "b.yaml", "api", "10.96.0.11")
    first = Agent(ManifestSource(tmp_path), dp, AgentOptions(interfaces=[]))
    first.sync()
    assert services_in_maps(dp) == {"test/web", "test/api"}

    # While the agent is down, a.yaml loses its service and b.yaml gets a typo.
    (tmp_path / "a.yaml").write_text("")
    (tmp_path / "b.yaml").write_text("kind: [oops\n")
    agent = restart(dp, tmp_path)
    # web is certainly gone, but api may still be in the unreadable file
    assert services_in_maps(dp) == {"test/web", "test/api"}
    assert agent.errors == []

    # Once b.yaml reads again, what it does not hold is stale and goes.
    publish(tmp_path / "b.yaml", "api2", "10.96.0.12")
    agent.step()
    assert services_in_maps(dp) == {"test/api2"}


def test_restart_removes_only_stale_frontends(tmp_path: Path, clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    publish(tmp_path / "a.yaml", "web", "10.96.0.10")
    publish(tmp_path / "b.yaml", "api", "10.96.0.11")
    Agent(ManifestSource(tmp_path), dp, AgentOptions(interfaces=[])).sync()
    (tmp_path / "b.yaml").unlink()
    restart(dp, tmp_path)
    assert services_in_maps(dp) == {"test/web"}
    # api's header, slot, membership and metadata; the backend entry stays
    # (web balances to the same pod) and web itself is untouched
    assert dp.table.map_ops == 4


def test_what_lbctl_status_reads_of_the_agent(tmp_path: Path, clean_datapath: BpfDatapath) -> None:
    """Last full sync, last change, and recent errors each once, at their last time."""
    publish(tmp_path / "a.yaml", "web", "10.96.0.10")
    agent = Agent(ManifestSource(tmp_path), clean_datapath, AgentOptions(interfaces=["nosuch0"]))
    agent.sync()
    assert agent.last_sync is not None and agent.last_sync.what == "first sync"
    missing = "interface nosuch0: not found in this network namespace"
    assert agent.last_sync.errors == (missing,) and agent.last_change is None
    publish(tmp_path / "b.yaml", "api", "10.96.0.11")
    agent.step()
    assert agent.last_change is not None and agent.last_change.errors == ()
    assert agent.last_change.what == "1 frontend updates, 0 removals"
    first = agent.recent_errors[missing]
    agent._record(["Service test/x: map lb4_services is full"])
    agent._record([missing])  # retried: moves to the end, not repeated
    assert list(agent.recent_errors) == ["Service test/x: map lb4_services is full", missing]
    assert agent.recent_errors[missing] >= first
