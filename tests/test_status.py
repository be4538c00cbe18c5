"""`lbctl status` against a real agent in a namespace topology, and without one.

The agent runs in the node namespace of tests/netlab.py with its health
server on the default 0.0.0.0:10256 there; `lbctl status` runs in the same
namespace under nsenter.  What it says is checked against the manifests the
agent was given and against the kernel, read independently with
`tc -j filter show`; its exit code against the agent's real state: healthy,
killed, not synced yet, its datapath removed under it.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from lbctl.datapath.ebpf.maps import MAP_TYPES
from tests import k8s_yaml
from tests.agent_proc import AgentProcess, lbctl
from tests.apiserver import FakeApiServer
from tests.netlab import Cluster, Lab, Netns, build_cluster

pytestmark = pytest.mark.netns

PROGRAMS = {"ingress": "lbctl_tc_ingress", "egress": "lbctl_tc_egress"}  # by tc hook
WEB_PORTS = [("http", "TCP", 80), ("dns", "UDP", 53)]
WEB_TARGETS = [("http", "TCP", 8080), ("dns", "UDP", 5353)]
# What the manifests below make: web (2 ports, 3 pods), api (1 port, pod0),
# empty (1 port, no slice); badport is rejected.  Frontends 2 + 1 + 1; distinct
# backends: the 3 pods on 8080/TCP and on 5353/UDP (api's pod0:8080/TCP is one
# of them); slots: 3 + 3 for web, 1 for api, none for empty.
COUNTS = {"services": 3, "frontends": 4, "backends": 6, "backendSlots": 7}


def publish(manifests: Path, cluster: Cluster) -> None:
    ips = [p.ip for p in cluster.pods]
    k8s_yaml.write(
        manifests / "web.yaml",
        k8s_yaml.service("web", "10.96.0.10", WEB_PORTS),
        k8s_yaml.endpoint_slice("web", ips, WEB_TARGETS),
    )
    k8s_yaml.write(
        manifests / "api.yaml",
        k8s_yaml.service("api", "10.96.0.11", [("http", "TCP", 80)]),
        k8s_yaml.endpoint_slice("api", ips[:1], [("http", "TCP", 8080)]),
    )
    k8s_yaml.write(
        manifests / "empty.yaml", k8s_yaml.service("empty", "10.96.0.12", [("https", "TCP", 443)])
    )
    k8s_yaml.write(
        manifests / "bad.yaml", k8s_yaml.service("badport", "10.96.0.13", [("http", "TCP", 70000)])
    )


def status(node: Netns, *args: str) -> subprocess.CompletedProcess[str]:
    return lbctl("status", *args, node=node, check=False)


def status_json(node: Netns, *args: str) -> tuple[int, dict[str, Any]]:
    out = status(node, "-o", "json", *args)
    return out.returncode, checked(json.loads(out.stdout))


SCHEMA = json.loads((Path(__file__).parents[1] / "docs" / "status-v1.schema.json").read_text())


def checked(report: dict[str, Any]) -> dict[str, Any]:
    """A report as the stable API (docs/status-api.md) promises it."""
    jsonschema.validate(report, SCHEMA)
    return report


def kernel_programs(node: Netns) -> dict[str, set[tuple[str, int]]]:
    """Interface -> (hook, id) of lbctl's tc programs, as `tc` reads them from the kernel."""
    links = json.loads(node.ip("-j", "link", "show").stdout)
    found: dict[str, set[tuple[str, int]]] = {}
    for link in links:
        name = link["ifname"]
        if name == "lo":
            continue
        found[name] = set()
        for hook, program in PROGRAMS.items():
            shown = node.run("tc", "-j", "filter", "show", "dev", name, hook).stdout
            found[name] |= {
                (f"tc {hook}", f["options"]["prog"]["id"])
                for f in json.loads(shown or "[]")
                if f.get("options", {}).get("bpf_name") == program
            }
    return found


def reported_programs(report: dict[str, Any]) -> dict[str, set[tuple[str, int]]]:
    return {
        i["name"]: {(p["hook"], p["id"]) for p in i["programs"] if p["owner"] == "lbctl"}
        for i in report["kernel"]["interfaces"]
    }


def header(table: str) -> dict[str, str]:
    """The KEY  value lines that open the table output."""
    block = table.split("\n\n", 1)[0]
    return dict(
        re.match(r"([A-Z][A-Z ]*?)\s{2,}(.*)", line).groups() for line in block.splitlines()
    )  # type: ignore[union-attr]


def program_rows(table: str) -> list[list[str]]:
    block = next(b for b in table.split("\n\n") if b.startswith("INTERFACE"))
    return [line.split() for line in block.splitlines()[1:]]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Lab() as lab:
        yield build_cluster(lab, pods=3)


def test_status_of_a_running_agent_then_of_a_killed_one(
    cluster: Cluster, tmp_path: Path, pin_dir: Path
) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    publish(manifests, cluster)
    node = cluster.node
    with AgentProcess(node, manifests, pin_dir, tmp_path / "agent.log") as agent:
        agent.wait_for_log("synced:")
        code, report = status_json(node)
        assert code == 0, report["verdict"]
        assert report["verdict"] == {
            "exitCode": 0,
            "state": "healthy",
            "problems": [],
            "warnings": [],
        }
        doc = report["agent"]["status"]
        assert report["agent"]["reachable"] and doc["healthy"] and doc["synced"]
        assert doc["mode"] == "ebpf"
        assert doc["modeReason"].startswith("chosen by the default (no --mode")
        assert doc["source"] == {"kind": "manifests", "location": str(manifests), "complete": True}
        assert doc["counts"] == COUNTS
        assert doc["lastSync"]["what"] == "first sync" and doc["lastSync"]["result"] == "ok"
        assert doc["lastChange"] is None
        assert doc["errors"]["rejected"] == [
            {
                "where": str(manifests / "bad.yaml"),
                "reason": "Service test/badport: spec.ports[0].port: 70000 is out of range "
                "(1-65535)",
            }
        ]
        # attachments: exactly what the kernel holds, on every interface of the node
        kernel = kernel_programs(node)
        assert set(kernel) == {"lxcclient", "lxcpod0", "lxcpod1", "lxcpod2"}
        assert all(
            {hook for hook, _ in ids} == {"tc ingress", "tc egress"} for ids in kernel.values()
        ), kernel
        assert reported_programs(report) == kernel
        assert doc["datapath"]["attached"] == sorted(kernel)
        maps = report["kernel"]["pinnedMaps"]
        assert maps["directory"] == str(pin_dir) and maps["missing"] == []
        assert maps["fill"]["lb4_services"]["entries"] == COUNTS["frontends"]
        assert maps["fill"]["lb4_backends"]["entries"] == COUNTS["backends"]

        # a change is reported as the last change, with the counts after it
        k8s_yaml.write(
            manifests / "api.yaml",
            k8s_yaml.service("api", "10.96.0.11", [("http", "TCP", 80)]),
            k8s_yaml.endpoint_slice("api", [p.ip for p in cluster.pods], [("http", "TCP", 8080)]),
        )
        agent.wait_for_log("applied 1 frontend updates")
        code, report = status_json(node)
        doc = report["agent"]["status"]
        assert code == 0 and doc["lastChange"]["what"] == "1 frontend updates, 0 removals"
        assert doc["counts"] == {**COUNTS, "backendSlots": COUNTS["backendSlots"] + 2}

        table = status(node)
        assert table.returncode == 0 and table.stderr == ""
        fields = header(table.stdout)
        assert (
            fields["AGENT"]
            == f"up at 127.0.0.1:10256 (pid {doc['pid']}, lbctl {doc['version']}), healthy"
        )
        assert fields["MODE"].startswith("ebpf, chosen by the default")
        assert fields["COUNTS"] == "3 services, 4 frontends, 6 backends (9 backend slots)"
        assert fields["PINNED MAPS"].startswith(
            f"{pin_dir}: {len(MAP_TYPES)} of {len(MAP_TYPES)} maps"
        )
        rows = program_rows(table.stdout)
        assert {(r[0], r[1] + " " + r[2], r[3], int(r[4]), r[5]) for r in rows} == {
            (name, hook, PROGRAMS[hook.split()[1]], prog_id, "lbctl")
            for name, ids in kernel.items()
            for hook, prog_id in ids
        }
        assert "rejected  " + str(manifests / "bad.yaml") in table.stdout
        assert table.stdout.rstrip().endswith("STATUS  healthy (exit 0)")

        as_yaml = status(node, "-o", "yaml")
        assert as_yaml.returncode == 0
        parsed = checked(yaml.safe_load(as_yaml.stdout))
        assert parsed["agent"]["status"]["counts"] == doc["counts"]
        assert reported_programs(parsed) == kernel

        # Killed: the agent is down, the datapath stays and is still shown.
        agent.kill()
        down = status(node, "--bpffs", str(pin_dir), "-o", "json")
        assert down.returncode == 3
        report = checked(json.loads(down.stdout))
        assert report["agent"]["reachable"] is False and report["agent"]["status"] is None
        assert report["verdict"]["state"] == "agent down"
        assert report["verdict"]["problems"] == [
            "agent: not reachable at 127.0.0.1:10256: Connection refused"
        ]
        assert reported_programs(report) == kernel_programs(node) == kernel
        assert report["kernel"]["pinnedMaps"]["fill"]["lb4_services"]["entries"] == 4
        assert down.stderr.startswith("lbctl status: agent: not reachable at 127.0.0.1:10256")
        assert "start the agent (`lbctl run`) in this network namespace" in down.stderr

        # Down and cleaned up: nothing attached, nothing pinned; still exit 3.
        lbctl("cleanup", "--bpffs", str(pin_dir), node=node)
        gone = status(node, "--bpffs", str(pin_dir))
        assert gone.returncode == 3
        assert header(gone.stdout)["PINNED MAPS"] == f"{pin_dir}: 0 of {len(MAP_TYPES)} maps"
        assert all(r[1:] == ["-", "(no", "program)", "-", "-"] for r in program_rows(gone.stdout))
        assert f"datapath: no lbctl maps are pinned under {pin_dir}" in gone.stderr
        assert kernel_programs(node) == {name: set() for name in kernel}


def test_status_follows_the_agent_from_unsynced_to_healthy_to_a_removed_datapath(
    cluster: Cluster, tmp_path: Path, pin_dir: Path
) -> None:
    node = cluster.node
    sock = node.open_socket()
    sock.bind(("127.0.0.1", 0))
    server = FakeApiServer(sock).start()
    node.on_delete(server.stop)
    server.create(k8s_yaml.service("web", "10.96.0.10", WEB_PORTS))
    server.create(k8s_yaml.endpoint_slice("web", [p.ip for p in cluster.pods], WEB_TARGETS))
    server.set_down(True)
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    args = ("--kubeconfig", str(kubeconfig), "--hostname-override", "node-a")
    args += ("--interfaces", "lxcclient,lxcpod0,lxcpod1,lxcpod2,nosuch0")
    with AgentProcess(node, None, pin_dir, tmp_path / "agent.log", *args) as agent:
        agent.wait_for_log("healthz server listening")
        code, report = status_json(node)
        doc = report["agent"]["status"]
        assert code == 4, report["verdict"]
        assert report["verdict"]["state"] == "agent unhealthy"
        assert report["verdict"]["problems"][0].startswith(
            "agent: unhealthy, its first sync is not done"
        )
        assert doc["synced"] is False and doc["lastSync"] is None
        assert doc["source"] == {"kind": "kubernetes", "location": server.url, "complete": False}
        assert doc["node"] == "node-a"

        server.set_down(False)
        agent.wait_for_log("synced:")
        code, report = status_json(node)
        doc = report["agent"]["status"]
        assert code == 0, report["verdict"]
        assert doc["counts"] == {"services": 1, "frontends": 2, "backends": 6, "backendSlots": 6}
        assert doc["source"]["complete"] is True
        attached = {name for name, ids in kernel_programs(node).items() if ids}
        assert attached == {"lxcclient", "lxcpod0", "lxcpod1", "lxcpod2"}
        missing = "interface nosuch0: not found in this network namespace"
        assert [e["message"] for e in doc["errors"]["recent"]] == [missing]
        table = status(node)
        assert table.returncode == 0
        assert re.search(rf"^  recent    \S+Z  {missing}$", table.stdout, re.M), table.stdout

        # lbctl's egress program removed by hand: healthy, with a warning until the
        # agent's periodic sync (30 s here) puts it back
        node.run("tc", "filter", "del", "dev", "lxcclient", "egress")
        code, report = status_json(node)
        assert code == 0, report["verdict"]
        [warning] = report["verdict"]["warnings"]
        assert warning.startswith(
            "interface lxcclient: the agent attached its egress program but the kernel shows none"
        )

        # The datapath removed under a running agent: the kernel is what counts.
        lbctl("cleanup", "--force", "--bpffs", str(pin_dir), node=node)
        code, report = status_json(node)
        assert code == 5, report["verdict"]
        assert report["agent"]["status"]["healthy"] is True
        assert report["verdict"]["state"] == "datapath absent"
        assert report["verdict"]["problems"] == [
            f"datapath: no lbctl maps are pinned under {pin_dir} (no --bpffs given; used the "
            "agent's, as its /statusz at 127.0.0.1:10256 says)",
            "datapath: lbctl's tc program is attached to no interface here",
        ]
        assert report["verdict"]["warnings"] == [
            f"interface {name}: the agent attached its program but the kernel shows none"
            for name in sorted(attached)
        ]


def test_status_without_an_agent(tmp_path: Path) -> None:
    node = Netns.create("stnode")
    try:
        node.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        out = status(node, "--bpffs", "/sys/fs/bpf/lbctl-status-test-none", "-o", "yaml")
        assert out.returncode == 3
        report = checked(yaml.safe_load(out.stdout))
        assert report["verdict"]["state"] == "agent down"
        assert {i["name"]: i["programs"] for i in report["kernel"]["interfaces"]} == {
            "eth0": [],
            "eth1": [],
        }
        assert report["kernel"]["pinnedMaps"]["present"] == []
        assert out.stderr.splitlines()[0] == (
            "lbctl status: agent: not reachable at 127.0.0.1:10256: Connection refused; start "
            "the agent (`lbctl run`) in this network namespace, or point --address at its "
            "--healthz-bind-address if it is not 127.0.0.1:10256"
        )
        bad = status(node, "--address", "nohost")
        assert bad.returncode == 2 and "--address 'nohost': 'nohost' is not host:port" in bad.stderr
    finally:
        node.delete()
