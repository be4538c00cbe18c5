"""status, trace, maps dump and cleanup find the agent's maps without --bpffs, all alike.

The real agent (`lbctl run`) runs in a test node namespace with a
non-default `--bpffs` (a per-test directory) and its health server on the
default port there; every command runs in that namespace as an operator
would, without `--bpffs`: first while the agent runs (they ask its
/statusz), then after a `kill -9` (the programs it left attached in the
namespace name their maps), and last with nothing left (the default, and a
message naming every place looked at).  `lbctl/cli/locate.py` is the one
resolver behind all four.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lbctl.datapath.ebpf.settings import DEFAULT_PIN_DIR
from tests import k8s_yaml
from tests.agent_proc import AgentProcess, lbctl
from tests.netlab import Cluster, Lab, build_cluster

pytestmark = pytest.mark.netns

VIP = "10.96.0.10"


def run(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return lbctl(*args, node=cluster.node, check=False)


def as_json(cluster: Cluster, *args: str) -> tuple[int, dict[str, object], str]:
    done = run(cluster, *args, "-o", "json")
    try:
        return done.returncode, json.loads(done.stdout), done.stderr
    except ValueError:
        raise AssertionError(f"lbctl {' '.join(args)}: {done.returncode} {done.stderr}") from None


def dumped_services(cluster: Cluster) -> list[str]:
    code, data, err = as_json(cluster, "maps", "dump", "services")
    assert code == 0, err
    return sorted({str(f["service"]) for f in data["frontends"]})  # type: ignore[attr-defined]


def traced(cluster: Cluster) -> dict[str, object]:
    code, t, err = as_json(
        cluster, "trace", "--src", f"{cluster.client.ip}:40000", "--dst", f"{VIP}:80"
    )
    assert code == 0, (t, err)
    return t


def kernel_tc_programs(cluster: Cluster) -> set[str]:
    """Interfaces of the node carrying a tc ingress BPF program, as `tc` reads them."""
    links = json.loads(cluster.node.ip("-j", "link", "show").stdout)
    carrying = set()
    for link in links:
        shown = cluster.node.run("tc", "-j", "filter", "show", "dev", link["ifname"], "ingress")
        if json.loads(shown.stdout or "[]"):
            carrying.add(link["ifname"])
    return carrying


def test_every_command_finds_the_agents_maps_up_and_down(tmp_path: Path, pin_dir: Path) -> None:
    assert pin_dir != DEFAULT_PIN_DIR
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    with Lab() as lab:
        cluster = build_cluster(lab, pods=2)
        k8s_yaml.write(
            manifests / "web.yaml",
            k8s_yaml.service("web", VIP, [("http", "TCP", 80)]),
            k8s_yaml.endpoint_slice("web", [p.ip for p in cluster.pods], [("http", "TCP", 8080)]),
        )
        agent = AgentProcess(cluster.node, manifests, pin_dir, tmp_path / "agent.log")
        try:
            agent.start().wait_for_log("synced:")
            attached = kernel_tc_programs(cluster)
            assert attached == {"lxcclient", "lxcpod0", "lxcpod1"}

            # -- the agent runs: each command asks it where its maps are
            assert dumped_services(cluster) == ["test/web"]
            t = traced(cluster)
            assert t["frontend"]["service"] == "test/web"  # type: ignore[index]
            code, report, err = as_json(cluster, "status")
            assert code == 0, (report, err)
            maps = report["kernel"]["pinnedMaps"]  # type: ignore[index]
            assert maps["directory"] == str(pin_dir) and maps["missing"] == []
            assert maps["foundBy"] == "the agent's, as its /statusz at 127.0.0.1:10256 says"
            refused = run(cluster, "cleanup")
            assert refused.returncode == 1
            assert f"the maps under {pin_dir} are in use by pid {agent.proc.pid}" in (  # type: ignore[union-attr]
                refused.stderr
            )
            assert kernel_tc_programs(cluster) == attached, "a refused cleanup detaches nothing"

            # -- killed: its programs stay attached and lead to their maps
            agent.kill()
            assert dumped_services(cluster) == ["test/web"]
            code, report, err = as_json(cluster, "status")
            assert code == 3, (report, err)
            maps = report["kernel"]["pinnedMaps"]  # type: ignore[index]
            assert maps["directory"] == str(pin_dir) and maps["missing"] == []
            assert maps["foundBy"] == (
                "the maps of lbctl's programs attached in this network namespace"
            )
            assert maps["looked"][0] == "no --bpffs given"
            assert maps["looked"][1].startswith("no agent answers at 127.0.0.1:10256")
            assert maps["fill"]["lb4_services"]["entries"] == 1
            table = run(cluster, "maps", "dump", "services")
            assert table.returncode == 0 and "test/web" in table.stdout, table.stderr
            assert traced(cluster)["frontend"]["service"] == "test/web"  # type: ignore[index]
            cleaned = run(cluster, "cleanup")
            assert cleaned.returncode == 0, cleaned.stderr
            assert f"(under {pin_dir})" in cleaned.stdout and "lb4_services" in cleaned.stdout
            assert not pin_dir.exists(), "cleanup removed the agent's pins"
            assert kernel_tc_programs(cluster) == set()
        finally:
            agent.stop()  # cleanup with --bpffs: nothing is left whatever failed

        # -- nothing left: the default, and every place looked at is named
        if (DEFAULT_PIN_DIR / "lb4_services").exists():
            pytest.skip(f"{DEFAULT_PIN_DIR} holds maps on this machine: the default is taken")
        looked = (
            f"no lbctl maps under {DEFAULT_PIN_DIR} (no --bpffs given; no agent answers at "
            "127.0.0.1:10256 (Connection refused); no lbctl program is attached in this "
            f"network namespace; used the default {DEFAULT_PIN_DIR})"
        )
        missing = run(cluster, "maps", "dump")
        assert missing.returncode == 1 and looked in missing.stderr, missing.stderr
        missing = run(cluster, "trace", "--src", "10.0.0.1", "--dst", f"{VIP}:80")
        assert missing.returncode == 1 and looked in missing.stderr, missing.stderr
        gone = run(cluster, "status")
        assert gone.returncode == 3
        assert (
            f"datapath: no lbctl maps are pinned under {DEFAULT_PIN_DIR} (no --bpffs given; "
            "no agent answers at 127.0.0.1:10256 (Connection refused); no lbctl program is "
            f"attached in this network namespace; used the default {DEFAULT_PIN_DIR})"
        ) in gone.stderr
        nothing = run(cluster, "cleanup")
        assert nothing.returncode == 0 and looked in nothing.stdout, nothing.stdout


def test_the_fallback_ignores_other_namespaces_datapaths(tmp_path: Path, pin_dir: Path) -> None:
    """A namespace without lbctl's programs does not take another namespace's maps,
    even while an agent elsewhere has them pinned and attached."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    with Lab() as lab:
        cluster = build_cluster(lab, pods=1)
        bare = lab.netns("bare")
        k8s_yaml.write(manifests / "web.yaml", k8s_yaml.service("web", VIP, [("http", "TCP", 80)]))
        with AgentProcess(cluster.node, manifests, pin_dir, tmp_path / "agent.log") as agent:
            agent.wait_for_log("synced:")
            done = lbctl("status", "-o", "json", node=bare, check=False)
            maps = json.loads(done.stdout)["kernel"]["pinnedMaps"]
            assert maps["directory"] == str(DEFAULT_PIN_DIR), maps
            assert maps["looked"][-1] == "no lbctl program is attached in this network namespace"
