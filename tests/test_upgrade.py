"""Upgrades in place with real agents and real traffic: no established flow is lost.

The world of tests/extlab.py: an outside client, node A with the agent, node
B over an underlay, pods on both.  Established TCP connections and UDP flows
go through a NodePort and a ClusterIP from the outside client (both
masqueraded, so the NAT table matters) and through the ClusterIP from a pod
(conntrack only).  Each must keep its pod and the address the pod sees
across:

- a change of each capacity flag, one agent after the other;
- a layout change: the real previous lbctl (commit 6e1a90b, the wave-1
  release, from `git archive`) pinned the maps; this version adopts them, and
  so does a build whose lbctl.h moved, added and widened fields;
- a `kill -9` in the middle of an upgrade, and the start that repairs it,
  whose maps then match a fresh agent's.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_proc import lbctl
from tests.netlab import Lab
from tests.upgradelab import (
    BASE,
    CLUSTER_IP,
    Flows,
    Node,
    fills,
    next_layout_tree,
    previous_tree,
    services,
)

pytestmark = pytest.mark.netns

# Each capacity flag, raised, three per agent start, and a map each sizes.
RAISED = [
    [("--max-services", 300, "lb4_services"), ("--max-backends", 300, "lb4_backends"),
     ("--max-slots", 1200, "lb_slots")],
    [("--conntrack-size", 5000, "ct4"), ("--nat-size", 3000, "nat4"),
     ("--affinity-size", 2000, "lb4_affinity")],
    [("--max-source-ranges", 300, "lb4_source_ranges"), ("--table-size", 257, "lb_tables"),
     ("--max-tables", 12, "lb_tables")],
]  # fmt: skip


@pytest.fixture
def previous(tmp_path: Path) -> Iterator[Path]:
    with previous_tree(tmp_path) as tree:
        yield tree


@pytest.fixture
def next_layout(tmp_path: Path) -> Iterator[Path]:
    with next_layout_tree(tmp_path) as tree:
        yield tree


@pytest.fixture
def node(tmp_path: Path, pin_dir: Path) -> Iterator[Node]:
    with Lab() as lab:
        n = Node(lab, tmp_path, pin_dir)
        try:
            yield n
        finally:
            n.stop_all()


# -- capacities -------------------------------------------------------------------------


def test_every_capacity_flag_changes_without_losing_a_flow(node: Node) -> None:
    """Before: the agent refused maps pinned with another size (and with --mode auto and
    no IPVS, exited, over and over); `lbctl cleanup` was the only way, dropping flows."""
    sizes = dict(BASE)
    node.start(sizes)
    flows = Flows(node.world)
    try:
        for group in RAISED:
            node.agents[-1].terminate()
            for flag, value, _ in group:
                sizes[flag] = value
            agent = node.start(sizes)
            log = agent.log_text()
            assert "pinned maps: migrated" in log, log
            for flag, _, map_name in group:
                copied = rf"map {map_name}: copied \(capacity \d+ -> \d+ \([^)]*{flag}"
                assert re.search(copied, log), (flag, log)
            flows.check(f"after {', '.join(f'{f} {v}' for f, v, _ in group)}")
        status = node.status()
        upgrade = status["agent"]["status"]["datapath"]["upgrade"]
        assert upgrade["action"] == "migrated"
        assert {m["name"] for m in upgrade["maps"]} == {"lb4_source_ranges", "lb_tables"}
        table = lbctl("status", "--bpffs", str(node.pin_dir), node=node.world.node_a, check=False)
        assert re.search(r"LAST UPGRADE +migrated at .*; lb_tables copied", table.stdout), table
        # Smaller than what the map holds: kept, said, and the agent serves on.
        node.agents[-1].terminate()
        agent = node.start({**sizes, "--conntrack-size": 4})
        assert "but --conntrack-size 4 makes room for 4: kept at 5000" in agent.log_text()
        flows.check("after --conntrack-size 4, which was kept at 5000")
        warnings = node.status()["verdict"]["warnings"]
        assert any("set --conntrack-size to at least" in w for w in warnings), warnings
    finally:
        flows.close()


NODE_CLIENT = r"""
import json, socket, sys
vip = sys.argv[1]
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(2)
udp.connect((vip, 53))
tcp = socket.create_connection((vip, 80), timeout=2)
for line in sys.stdin:
    udp.send(b"x")
    data, source = udp.recvfrom(4096)
    tcp.sendall(b"hi\n")
    print(json.dumps({
        "udp": data.decode().split()[0], "udp_source": "%s:%d" % source,
        "tcp": tcp.recv(4096).decode().split()[0], "tcp_peer": "%s:%d" % tcp.getpeername(),
    }), flush=True)
"""


VIP = CLUSTER_IP


class NodeProcess:
    """A long-lived process of node A in a test cgroup: a connected UDP socket and a
    TCP connection to the ClusterIP, both balanced by the socket hooks."""

    def __init__(self, node: Node, where: Path) -> None:
        def enter() -> None:  # in the child, before exec: only it moves
            (where / "cgroup.procs").write_text("0")

        self.proc = subprocess.Popen(
            ["nsenter", f"--net={node.world.node_a.path}", sys.executable, "-c", NODE_CLIENT, VIP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=enter,
        )

    def ask(self) -> dict[str, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("ask\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the node process died ({self.proc.poll()})"
        answer: dict[str, str] = json.loads(line)
        return answer

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def test_xdp_and_socket_hooks_move_to_the_new_maps(node: Node) -> None:
    from lbctl.datapath.ebpf.upgrade import rawmap, swap
    from tests.test_sock import CgroupMaker

    cgroups = CgroupMaker()
    client: NodeProcess | None = None
    try:
        where = cgroups.new()
        cgroups.check_ours(where)
        hooks = {"--xdp": "generic", "--external-interfaces": "ext0", "--cgroup": str(where)}
        node.start({**BASE, **hooks})
        flows = Flows(node.world)
        client = NodeProcess(node, where)
        before = client.ask()
        assert (
            before["udp_source"] == f"{CLUSTER_IP}:53" and before["tcp_peer"] == f"{CLUSTER_IP}:80"
        )
        old = set()  # the maps the upgrade replaces (sock4_rev, unchanged, stays)
        for name in ("ct4", "lb4_backends"):
            raw = rawmap.RawMap.open(str(node.pin_dir / name))
            old.add(raw.id)
            raw.close()
        node.agents[-1].terminate()
        agent = node.start({**BASE, "--conntrack-size": 5000, "--max-backends": 300, **hooks})
        # ingress and egress on each of the 5 interfaces
        assert "10 tc, 1 XDP and 4 socket hooks swapped" in agent.log_text(), agent.log_text()
        with node.world.node_a.entered():
            assert swap.users(old, node.pin_dir) == [], "a hook still runs on the old maps"
        flows.check("after the upgrade, XDP in front")
        after = client.ask()
        assert after == before, "the node process's flows kept their backends and addresses"
        assert node.dump()["counters"]["xdp_redirected"] > 0
        flows.close()
    finally:
        if client is not None:
            client.close()
        node.stop_all()  # the hooks go before their cgroup
        cgroups.remove()


# -- layouts ----------------------------------------------------------------------------


def test_maps_of_the_previous_release_are_adopted_without_losing_a_flow(
    node: Node, previous: Path
) -> None:
    node.start(BASE, tree=previous)
    flows = Flows(node.world)
    try:
        node.agents[-1].terminate()
        assert not (node.pin_dir / "lbctl_meta").exists(), "the previous release writes no record"
        agent = node.start(BASE)
        assert "no layout record" in agent.log_text()
        flows.check("after the previous release's agent was replaced by this one")
        assert (node.pin_dir / "lbctl_meta").exists(), "this version records the layout"
        assert node.dump()["flows"], "conntrack decodes with this version"
    finally:
        flows.close()


def test_a_layout_change_migrates_field_by_field_without_losing_a_flow(
    node: Node, previous: Path, next_layout: Path
) -> None:
    node.start(BASE, tree=previous)
    flows = Flows(node.world)
    try:
        node.agents[-1].terminate()
        upgraded = node.start(BASE, tree=next_layout)
        log = upgraded.log_text()
        assert "found the pinned maps (layout 1" in log, log
        assert re.search(r"map ct4: copied \([^)]*value layout struct ct4_entry changed\)", log)
        assert re.search(r"map nat4: copied \([^)]*value layout struct nat4_entry changed\)", log)
        assert "struct ct4_entry field zone: new, starts at 0" in log
        assert "struct lb_service field count: u16 -> u32, values kept" in log
        flows.check("after the move to a layout with other fields")
        # and back: a record-described layout, fields dropped and narrowed again
        node.agents[-1].terminate()
        back = node.start(BASE)
        log = back.log_text()
        assert re.search(r"map ct4: copied \([^)]*value layout struct ct4_entry changed\)", log)
        assert "struct ct4_entry field zone: dropped" in log
        flows.check("after the move back to this version's layout")
        table = lbctl("status", "--bpffs", str(node.pin_dir), node=node.world.node_a, check=False)
        copied = r"LAST UPGRADE +migrated at .*ct4 copied \([^)]*value layout"
        assert re.search(copied, table.stdout)
        conntrack = {(f["client"], f["protocol"]) for f in node.dump()["flows"]}
        assert len(conntrack) >= len(flows.flows) // 2, conntrack
    finally:
        flows.close()


# -- crashes ----------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["copied", "swapped"])
def test_a_kill_9_mid_upgrade_keeps_every_flow_and_the_next_start_repairs_it(
    node: Node, step: str
) -> None:
    node.start(BASE)
    flows = Flows(node.world)
    fresh_dir = Path(f"{node.pin_dir}-fresh")
    try:
        node.agents[-1].terminate()
        bigger = {**BASE, "--conntrack-size": 5000, "--nat-size": 3000}
        crashing = node.start(
            bigger,
            env={"LBCTL_TEST_UPGRADE_PAUSE": step},
            wait=f"upgrade paused at step {step}",
        )
        crashing.kill()
        flows.check(f"the agent killed at step {step}")
        # New flows while no agent runs: into the old maps, or (swapped) the new ones.
        later = Flows(node.world)
        flows.flows.update({f"later {k}": v for k, v in later.flows.items()})
        flows.first.update({f"later {k}": v for k, v in later.first.items()})
        repaired = node.start(bigger)
        assert "interrupted after its copy" in repaired.log_text()
        flows.check("after the start that finished the upgrade")
        assert not [p.name for p in node.pin_dir.iterdir() if p.name.startswith("upgrade_")]
        status = node.status()
        assert status["kernel"]["pinnedMaps"]["missing"] == []
        record = status["kernel"]["layout"]["record"]
        assert record is not None and record["lastUpgrade"]["action"] == "migrated"
        repaired_dump = node.dump()
        # A fresh agent on empty maps writes the same services and fills the
        # same maps (but those of flows and counters) as far.
        repaired.terminate()
        fresh = node.start(bigger, pin_dir=fresh_dir)
        fresh_dump = node.dump(fresh_dir)
        fresh.stop()
        assert services(fresh_dump) == services(repaired_dump)
        assert fills(fresh_dump) == fills(repaired_dump)
    finally:
        flows.close()
        shutil.rmtree(fresh_dir, ignore_errors=True)  # after the fresh agent's cleanup
