"""Reliability: the agent killed with -9 and restarted, again and again,
under load (issue 18: figures, not anecdotes).

Steady new TCP connections and UDP flows, and long-lived TCP sessions and
UDP "sessions" (a line every 100 ms), go through a ClusterIP from a pod and
through a NodePort from an outside client (masqueraded: the NAT table
matters), while the agent on node A is killed with SIGKILL and started
again: sometimes after it synced, sometimes in the middle of its start (its
compile, adoption of the pinned maps, attach or first sync).  Meanwhile
another Service changes, so each start has something to repair.  What must
hold: not one failed new connection or flow, not one broken session, and
after the last restart the service maps equal what a fresh agent writes for
the same manifests, with nothing half-written in them (tests/mapstate.py).

The second test kills the agent while it applies 500 new Services at once.

Short in `make test`; LBCTL_RELIABILITY=full (`make bench-reliability`)
restarts more often under longer load.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbctl.datapath.ebpf.maps import Maps
from tests import k8s_yaml, mapstate, relworld
from tests.agent_proc import AgentProcess
from tests.extlab import NODE_IP, World
from tests.loadgen import NewFlows, Sessions, report, scaled
from tests.netlab import Lab

pytestmark = [pytest.mark.netns, pytest.mark.reliability]

OTHER_IP = "10.96.0.60"


class Node:
    """The agent of node A, restarted under a new log file each time."""

    def __init__(self, world: World, manifests: Path, pin_dir: Path, logs: Path) -> None:
        self.world, self.manifests, self.pin_dir, self.logs = world, manifests, pin_dir, logs
        self.starts = 0
        self.proc: AgentProcess | None = None
        self.sync_s: list[float] = []

    def start(self) -> AgentProcess:
        self.starts += 1
        log = self.logs / f"agent{self.starts}.log"
        self.proc = relworld.agent(self.world.node_a, self.manifests, self.pin_dir, log)
        return self.proc.start()

    def synced(self) -> None:
        assert self.proc is not None
        self.sync_s.append(relworld.wait_synced(self.proc))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@pytest.fixture
def node(tmp_path: Path, pin_dir: Path) -> Iterator[tuple[Lab, Node]]:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    with Lab() as lab:
        world = relworld.build(lab)
        k8s_yaml.write(manifests / "web.yaml", *relworld.web(world))
        n = Node(world, manifests, pin_dir, tmp_path)
        try:
            yield lab, n
        finally:
            n.stop()


class Load:
    """New flows and sessions through the ClusterIP (from a pod) and the
    NodePort (from outside)."""

    def __init__(self, world: World, rate: float, tcp_sessions: int, udp_sessions: int) -> None:
        pc, out = world.pod_client, world.client
        cip, port = relworld.CLUSTER_IP, relworld.NODE_PORT
        self.flows = {
            "ClusterIP TCP": NewFlows(pc, cip, 80, "tcp", rate=rate),
            "ClusterIP UDP": NewFlows(pc, cip, 53, "udp", workers=1, rate=rate / 2),
            "NodePort TCP": NewFlows(out, NODE_IP, port, "tcp", rate=rate),
            "NodePort UDP": NewFlows(out, NODE_IP, port + 1, "udp", workers=1, rate=rate / 2),
        }
        self.sessions = Sessions()
        self.sessions.open(pc, cip, 80, tcp=tcp_sessions)
        self.sessions.open(pc, cip, 53, udp=udp_sessions)
        self.sessions.open(out, NODE_IP, port, tcp=tcp_sessions)
        self.sessions.open(out, NODE_IP, port + 1, udp=udp_sessions)
        self.began = time.monotonic()
        self.seconds = 0.0

    def start(self) -> Load:
        self.sessions.start()
        for f in self.flows.values():
            f.start()
        self.sessions.wait_answered()
        return self

    def stop(self) -> None:
        for f in self.flows.values():
            f.stop()
        self.sessions.stop()
        self.seconds = time.monotonic() - self.began

    def rows(self) -> list[tuple[str, object]]:
        rows: list[tuple[str, object]] = []
        for name, f in self.flows.items():
            extra = f", {f.retried} needed a retry" if name.endswith("UDP") else ""
            rows.append(
                (
                    f"new {name}",
                    f"{f.attempts} ({f.attempts / self.seconds:.0f}/s), "
                    f"{len(f.failures)} failed{extra}",
                )
            )
        s = self.sessions
        rows.append(
            (
                "long-lived sessions",
                f"{len(s.sessions)}, {s.exchanges} exchanges, "
                f"{len(s.broken)} broken, {s.lost} UDP datagrams lost",
            )
        )
        return rows

    def check(self) -> None:
        for name, f in self.flows.items():
            assert f.ok > 0, f"no {name} flow succeeded"
            assert not f.failures, f"{name}: {[x.what for x in f.failures[:10]]}"
        assert not self.sessions.broken, self.sessions.broken


def other(world: World, n: int) -> list[dict[str, Any]]:
    """A second Service whose endpoints change while the agent is down."""
    pods = (world.pods_a + world.pods_b)[: 1 + n % 4]
    return relworld.web(world, pods, name="other", cluster_ip=OTHER_IP, node_port=30090)


def assert_maps_as_fresh(lab: Lab, n: Node, what: str) -> dict[str, Any]:
    survivor, problems = mapstate.read(n.pin_dir)
    assert not problems, f"{what}: the survivor's maps are inconsistent: {problems}"
    fresh, fresh_problems = relworld.fresh_snapshot(
        lab, n.world, n.manifests, n.pin_dir, n.logs / "fresh.log"
    )
    assert not fresh_problems, fresh_problems
    diff = mapstate.differences(survivor, fresh)
    assert not diff, f"{what}: the survivor's maps differ from a fresh sync's: {diff}"
    return survivor


def test_kill_9_restarts_under_load_lose_nothing(
    node: tuple[Lab, Node], capsys: pytest.CaptureFixture[str]
) -> None:
    lab, n = node
    restarts = int(scaled(3, 20))
    rng = random.Random(18)
    n.start()
    n.synced()
    load = Load(
        n.world,
        rate=scaled(60, 150),
        tcp_sessions=int(scaled(6, 20)),
        udp_sessions=int(scaled(3, 10)),
    ).start()
    early = 0
    try:
        for i in range(restarts):
            n.kill()
            k8s_yaml.write(n.manifests / "other.yaml", *other(n.world, i))
            time.sleep(rng.uniform(0.2, 1.0))  # nobody home: the datapath alone
            n.start()
            if i % 2 == 1:  # killed again during its start
                time.sleep(rng.uniform(0.0, 1.5))
                if "synced:" not in n.proc.log_text():  # type: ignore[union-attr]
                    early += 1
                n.kill()
                n.start()
            n.synced()
            time.sleep(scaled(1.0, 3.0))
        bulk, written = kill_mid_change(n)
        time.sleep(1.0)
    finally:
        load.stop()
    survivor = assert_maps_as_fresh(lab, n, "after the last restart")
    rows = [
        ("kill -9", f"{restarts + restarts // 2} ({early} during a start, before its sync)"),
        (
            "kill -9 mid-change",
            f"{bulk} Services added at once, killed with "
            f"{' then '.join(map(str, written))} of them written",
        ),
        ("load", f"{load.seconds:.0f} s"),
        *load.rows(),
        ("start to synced", f"{min(n.sync_s):.1f}-{max(n.sync_s):.1f} s"),
        (
            "maps after the last restart",
            f"{len(survivor['frontends'])} frontends, equal to a fresh sync's, "
            "nothing half-written",
        ),
    ]
    report(capsys, "agent restart under load", rows)
    load.check()


def kill_mid_change(n: Node) -> tuple[int, list[int]]:
    """Add 500 Services at once and kill the agent when about a third of
    them are in the maps; it restarts and finishes the change.  Returns the
    count and how many were written at each kill (a kill that came too late
    is tried again with other Services)."""
    bulk = int(scaled(500, 2000))
    seen: list[int] = []
    maps = Maps.open_pinned(n.pin_dir)
    try:
        before = maps.lb4_services.count()
        for attempt in range(5):
            k8s_yaml.write(n.manifests / "bulk.yaml", *relworld.many(bulk, f"bulk{attempt}"))
            deadline = time.monotonic() + 120
            while (count := maps.lb4_services.count()) < before + bulk // 3:
                assert time.monotonic() < deadline, "the agent never applied the bulk change"
            n.kill()
            seen.append(count - before)
            n.start()
            n.synced()  # it finishes the change
            if seen[-1] < bulk:
                return bulk, seen
            (n.manifests / "bulk.yaml").unlink()  # landed too late: again
            while maps.lb4_services.count() > before:
                assert time.monotonic() < deadline + 120, "the bulk change never went"
                time.sleep(0.1)
    finally:
        maps.close()
    raise AssertionError(f"no kill landed in the middle of the change: {seen}")
