"""`lbctl run --mode` on THIS machine's kernel: all BPF features, no IPVS.

Real agent processes in a test network namespace (nsenter, as
tests/agent_proc.py does).  Where a missing feature has to be simulated, the
agent runs under `capsh --drop=cap_bpf,cap_sys_admin,cap_perfmon`: the kernel
then really refuses its bpf() calls (EPERM), as on a locked-down node.  The
IPVS side is never simulated: this kernel has no IPVS at all
(/work/shared/ENVIRONMENT.md), so every path that needs it must fail clearly.
The same choices in a kernel that has IPVS are tested in User-Mode Linux
(tests/ipvs_inner.py: auto falls back to IPVS there, and under capsh names
the EPERM).
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbctl.datapath.ebpf import probe
from tests import k8s_yaml
from tests.agent_proc import LBCTL, AgentProcess, lbctl
from tests.netlab import Lab, Netns

pytestmark = pytest.mark.netns

DROP = "--drop=cap_bpf,cap_sys_admin,cap_perfmon"
NO_IPVS = (
    "IPVS: the kernel has no generic netlink family IPVS (CONFIG_IP_VS; "
    "as a module: `modprobe ip_vs`)"
)
EPERM = (
    "bpf() system call: bpf(BPF_MAP_CREATE) returned EPERM (not permitted: the agent needs "
    "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, or CAP_SYS_ADMIN)"
)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Netns]:
    with Lab() as lab:
        ns = lab.netns("modes")
        (tmp_path / "m").mkdir()
        k8s_yaml.write(
            tmp_path / "m" / "a.yaml", k8s_yaml.service("a", "10.96.1.1", [("http", "TCP", 80)])
        )
        yield ns


def run_to_exit(
    node: Netns, tmp: Path, pin_dir: Path, mode: str, capsh: bool, drop: str = DROP
) -> subprocess.CompletedProcess[str]:
    """`lbctl run --mode MODE` that is expected to exit by itself (bounded by a timeout);
    capsh: under `capsh DROP`, without those capabilities."""
    run = [LBCTL, "run", "--mode", mode, "--manifests", str(tmp / "m")]
    run += ["--cgroup", "", "--bpffs", str(pin_dir)]
    if capsh:
        run = ["capsh", drop, "--", "-c", "exec " + shlex.join(run)]
    return subprocess.run(
        ["nsenter", f"--net={node.path}", *run],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_auto_on_this_kernel_picks_ebpf_and_says_why(
    node: Netns, tmp_path: Path, pin_dir: Path
) -> None:
    agent = AgentProcess(node, tmp_path / "m", pin_dir, tmp_path / "agent.log", "--mode", "auto")
    with agent:
        agent.wait_for_log("synced:", timeout=90)
        out = lbctl("status", "-o", "json", node=node, check=False)
        doc = json.loads(out.stdout)["agent"]["status"]
    assert doc["mode"] == "ebpf", agent.log_text()
    reason = doc["modeReason"]
    checked = [
        "bpf() system call",
        *(f"map type {name}" for name, *_ in probe.MAP_TYPES),
        "program type sched_cls",
        f"{len(probe.HELPERS)} helpers of the tc program",
        "clsact qdisc and cls_bpf filter",
    ]
    assert reason == (
        "chosen by --mode auto: BPF features probed, all present: "
        + ", ".join(checked)
        + ", the programs loaded"
    ), reason
    assert f"datapath ebpf, {reason}" in agent.log_text()
    # the attach probe's veth pair is gone again
    assert probe.PROBE_LINK not in node.ip("link", "show").stdout


def test_auto_without_bpf_and_without_ipvs_exits_naming_both(
    node: Netns, tmp_path: Path, pin_dir: Path
) -> None:
    done = run_to_exit(node, tmp_path, pin_dir, "auto", capsh=True)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"lbctl run: no datapath can run: the eBPF datapath cannot run (BPF feature missing: "
        f"{EPERM}), and the IPVS fallback (chosen by --mode auto) is unavailable: {NO_IPVS}"
    ), done.stderr
    assert not pin_dir.exists(), "nothing pinned by an agent that did not start"


def test_auto_without_cap_net_admin_names_it_and_does_not_pick_ebpf(
    node: Netns, tmp_path: Path, pin_dir: Path
) -> None:
    # CAP_SYS_ADMIN stays, so bpf() and the program loads succeed; only making the
    # probe veth (and attaching anything) is refused with EPERM by the kernel.
    done = run_to_exit(node, tmp_path, pin_dir, "auto", capsh=True, drop="--drop=cap_net_admin")
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    refused = (
        f"attaching: creating the probe veth {probe.PROBE_LINK} was not permitted (EPERM): "
        "this process lacks CAP_NET_ADMIN, which the agent needs to add clsact qdiscs and "
        "cls_bpf filters (grant it, as deploy/daemonset.yaml does)"
    )
    assert last == (
        f"lbctl run: no datapath can run: the eBPF datapath cannot run (BPF feature missing: "
        f"{refused}), and the IPVS fallback (chosen by --mode auto) is unavailable: {NO_IPVS}"
    ), done.stderr
    assert "datapath ebpf" not in done.stderr, "auto must not claim the eBPF datapath works"
    assert probe.PROBE_LINK not in node.ip("link", "show").stdout


def test_ebpf_without_bpf_capabilities_fails_with_the_fix(
    node: Netns, tmp_path: Path, pin_dir: Path
) -> None:
    done = run_to_exit(node, tmp_path, pin_dir, "ebpf", capsh=True)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (
        "lbctl run: no datapath can run: the eBPF datapath cannot run on this kernel: "
        f"BPF feature missing: {EPERM}; fix that, or run with --mode auto (or ipvs) to fall "
        "back to IPVS"
    ), done.stderr
    assert "IPVS:" not in done.stderr, "ebpf never probes IPVS"


def test_ipvs_on_a_kernel_without_ipvs_fails_clearly(
    node: Netns, tmp_path: Path, pin_dir: Path
) -> None:
    done = run_to_exit(node, tmp_path, pin_dir, "ipvs", capsh=False)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (
        f"lbctl run: no datapath can run: the IPVS datapath (chosen by --mode ipvs) is "
        f"unavailable: {NO_IPVS}; use a kernel with IPVS, or run with --mode auto (or ebpf)"
    ), done.stderr
    # it made nothing in the namespace: no dummy link, no nftables table
    assert "lbctl-ipvs0" not in node.ip("link", "show").stdout
    assert "lbctl_ipvs" not in node.run("nft", "list", "tables").stdout
