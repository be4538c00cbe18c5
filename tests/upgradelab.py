"""Upgrades with real agents: node A of tests/extlab.py's world, flows to keep, lbctl trees.

Shared by tests/test_upgrade.py and bench/upgrade.py: the agents started one
after another on the same pinned maps, established flows of every kind
(NodePort and ClusterIP, TCP and UDP, masqueraded or not) that must keep
their pod and peer, the previous release's lbctl from git, and this
version with another lbctl.h.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests import extlab, k8s_yaml
from tests.agent_proc import AgentProcess, lbctl
from tests.extlab import NODE_IP, World
from tests.netlab import Lab, NsLike, Reply, RequestError, TcpServer, TcpSession, UdpServer, _ns

PREVIOUS = "6e1a90b"  # the landed wave-1 lbctl: maps without a layout record (layout 1)
REPO = Path(__file__).resolve().parents[1]
CLUSTER_IP = "10.96.0.60"
NODE_PORT = 30090
HEALTH = "127.0.0.1:10256"  # in node A's namespace

BASE: dict[str, int | str] = {
    "--max-services": 256,
    "--max-backends": 256,
    "--max-slots": 1024,
    "--conntrack-size": 4096,
    "--nat-size": 2048,
    "--max-source-ranges": 256,
    "--affinity-size": 1024,
    "--table-size": 251,
    "--max-tables": 8,
}


class UdpFlow:
    """A connected UDP socket: one flow, the same source port each time."""

    def __init__(self, where: NsLike, ip: str, port: int) -> None:
        self.target = f"{ip}:{port}"
        self.sock = _ns(where).open_socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(2.0)
        self.sock.connect((ip, port))  # replies from anywhere else are not received

    def ask(self, text: str) -> Reply:
        for _ in range(3):  # a datagram may be lost; the flow is what matters
            self.sock.send(text.encode())
            try:
                return Reply.parse(self.sock.recv(65535).decode(), self.target)
            except TimeoutError:
                continue
        raise RequestError(f"UDP {self.target}: no answer to {text!r}")

    def close(self) -> None:
        self.sock.close()


class Flows:
    """Established flows of every kind, and the pod and peer each first reached."""

    def __init__(self, world: World, nodeport: int = 3, clusterip: int = 2) -> None:
        """`nodeport` flows of each protocol through the NodePort, `clusterip` of each
        protocol through the ClusterIP from the outside client and from a pod."""
        client, pod = world.client, world.pod_client
        self.flows: dict[str, TcpSession | UdpFlow] = {}
        for i in range(nodeport):
            self.flows[f"tcp nodeport {i}"] = TcpSession(client, NODE_IP, NODE_PORT)
            self.flows[f"udp nodeport {i}"] = UdpFlow(client, NODE_IP, NODE_PORT + 1)
        for i in range(clusterip):
            self.flows[f"tcp clusterip outside {i}"] = TcpSession(client, CLUSTER_IP, 80)
            self.flows[f"udp clusterip outside {i}"] = UdpFlow(client, CLUSTER_IP, 53)
            self.flows[f"tcp clusterip pod {i}"] = TcpSession(pod, CLUSTER_IP, 80)
            self.flows[f"udp clusterip pod {i}"] = UdpFlow(pod, CLUSTER_IP, 53)
        self.first = {name: flow.ask("first") for name, flow in self.flows.items()}
        masqueraded = [r for n, r in self.first.items() if "outside" in n or "nodeport" in n]
        assert {r.peer_ip for r in masqueraded} == {NODE_IP}, "the NAT table carries them"
        pods = {r.pod for r in self.first.values()}
        assert len(pods) > 1, f"the flows landed on one pod only ({pods}): nothing to tell apart"

    def lost(self, when: str) -> list[str]:
        """The flows that broke or moved to another pod or peer: none may."""
        out = []
        for name, flow in self.flows.items():
            try:
                reply = flow.ask(when)
            except RequestError as err:
                out.append(f"{when}: {name} is broken: {err}")
                continue
            first = self.first[name]
            if (reply.pod, reply.peer) != (first.pod, first.peer):
                out.append(
                    f"{when}: {name} moved from {first.pod} (seen as {first.peer}) to "
                    f"{reply.pod} (seen as {reply.peer}): its flow was lost"
                )
        return out

    def check(self, when: str) -> None:
        lost = self.lost(when)
        assert not lost, "\n".join(lost)

    def close(self) -> None:
        for flow in self.flows.values():
            flow.close()


class Node:
    """Node A of the world, its manifests and the agents started on it one after another."""

    def __init__(self, lab: Lab, tmp: Path, pin_dir: Path) -> None:
        self.world = extlab.build(lab, pods_a=2, pods_b=2)
        for p in self.world.pods_a + self.world.pods_b:
            TcpServer(p, 8080)
            UdpServer(p, 5353)
        self.tmp = tmp
        self.pin_dir = pin_dir
        self.manifests = tmp / "manifests"
        self.manifests.mkdir()
        self.agents: list[AgentProcess] = []
        w = self.world
        pods = w.pods_a + w.pods_b
        svc = k8s_yaml.service(
            "web", CLUSTER_IP, [("http", "TCP", 80), ("dns", "UDP", 53)], type="NodePort"
        )
        for port in svc["spec"]["ports"]:
            port["nodePort"] = NODE_PORT if port["protocol"] == "TCP" else NODE_PORT + 1
        targets = [("http", "TCP", 8080), ("dns", "UDP", 5353)]
        nodes = {p.ip: w.node_of(p) for p in pods}
        k8s_yaml.write(
            self.manifests / "web.yaml",
            svc,
            k8s_yaml.endpoint_slice("web", [p.ip for p in pods], targets, nodes=nodes),
        )

    def start(
        self,
        sizes: dict[str, int | str],
        tree: Path | None = None,
        env: dict[str, str] | None = None,
        pin_dir: Path | None = None,
        wait: str = "synced:",
    ) -> AgentProcess:
        flags = [str(x) for flag, value in sizes.items() for x in (flag, value)]
        n = len(self.agents)
        agent = AgentProcess(
            self.world.node_a,
            self.manifests,
            pin_dir or self.pin_dir,
            self.tmp / f"agent{n}.log",
            *extlab.agent_flags(),
            "--healthz-bind-address",
            HEALTH,
            *flags,
            tree=tree,
            env=env,
        )
        self.agents.append(agent.start())
        agent.wait_for_log(wait, timeout=120)
        return agent

    def status(self) -> dict[str, Any]:
        out = lbctl(
            "status",
            "-o",
            "json",
            "--bpffs",
            str(self.pin_dir),
            node=self.world.node_a,
            check=False,
        )
        assert out.returncode in (0, 3, 4, 5), out.stderr
        report: dict[str, Any] = json.loads(out.stdout)
        return report

    def dump(self, pin_dir: Path | None = None) -> dict[str, Any]:
        out = lbctl(
            "maps", "dump", "-o", "json", "--bpffs", str(pin_dir or self.pin_dir),
            node=self.world.node_a,
        )  # fmt: skip
        data: dict[str, Any] = json.loads(out.stdout)
        return data

    def stop_all(self) -> None:
        for agent in self.agents:
            agent.stop()  # each stops its process and removes its datapath


def services(dump: dict[str, Any]) -> list[dict[str, Any]]:
    """The frontends as the maps hold them, without the ids a fresh sync numbers anew."""
    out = []
    for fe in dump["frontends"]:
        fe = {k: v for k, v in fe.items() if k not in ("frontend_id", "table")}
        fe["backends"] = sorted(
            (b["address"], b["port"], b["state"]) for b in fe["backends"] if not b.get("missing")
        )
        out.append(fe)
    return out


def fills(dump: dict[str, Any]) -> dict[str, Any]:
    """Entries and capacity of each map, but those the traffic fills (flows, counters)."""
    traffic = {"ct4", "nat4", "lb4_affinity", "sock4_rev", "lb_conns", "lb_rr", "lb_fe_stats"}
    return {name: fill for name, fill in dump["maps"].items() if name not in traffic}


@contextlib.contextmanager
def previous_tree(where: Path) -> Iterator[Path]:
    """The previous release's lbctl package and BPF sources, from git; removed afterwards."""
    tree = where / f"lbctl-{PREVIOUS}"
    tree.mkdir()
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", PREVIOUS, "lbctl", "bpf"],
            capture_output=True,
            check=True,
            timeout=60,
        )
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        yield tree
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def _patched(text: str, pattern: str, replacement: str) -> str:
    out, n = re.subn(pattern, replacement, text, count=1, flags=re.S)
    assert n == 1, f"bpf/lbctl.h has no {pattern!r} any more: update the next layout"
    return out


@contextlib.contextmanager
def next_layout_tree(where: Path) -> Iterator[Path]:
    """This version with another lbctl.h: ct4_entry's fields all moved (one added in
    front), nat4_entry grown, lb_service.count widened to 32 bits."""
    tree = where / "lbctl-next"
    try:
        skip = shutil.ignore_patterns("__pycache__")
        shutil.copytree(REPO / "lbctl", tree / "lbctl", ignore=skip)
        shutil.copytree(REPO / "bpf", tree / "bpf")
        header = tree / "bpf" / "lbctl.h"
        text = header.read_text()
        text = _patched(text, r"struct ct4_entry \{", "struct ct4_entry {\n\t__u64 zone;")
        text = _patched(text, r"(struct nat4_entry \{.*?)\};", r"\1\t__u64 bytes;\n};")
        text = _patched(text, r"(struct lb_service \{.*?)__u16 count;", r"\1__u32 count;")
        header.write_text(text)
        yield tree
    finally:
        shutil.rmtree(tree, ignore_errors=True)
