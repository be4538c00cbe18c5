"""`make demo` works and leaves nothing behind: no process, namespace, pin or file.

The demo runs as `make demo` runs it (scripts/demo.sh), under names of the
test's own (LBCTL_DEMO_NAME, LBCTL_DEMO_PIN) and a temporary directory of
its own (TMPDIR), in a cgroup the test creates: every process it starts,
and theirs, is in that cgroup whatever becomes of its parent, so a server
left running after "cleaning up" (its PID lost, orphaned in a deleted
namespace) is found there.  What is found is stopped by PID afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lbctl.datapath.ebpf import cgroup
from tests.conftest import BPFFS, PIN_PREFIX, remove_pins
from tests.test_deploy import remove_cgroup

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [
    "== building the cluster: a node, a client pod, three backend pods",
    "== starting: lbctl run --manifests examples/ (in the node namespace; socket hooks off: "
    "the demo leaves the host's cgroups alone)",
    "== 30 requests from the client pod to http://10.96.0.10/ (random backend choice)",
    "== which pod answered, out of 30",
    "== lbctl maps dump services",
    "== lbctl maps dump conntrack --service demo/web (the newest 5 flows)",
    "== lbctl maps dump counters",
    "== lbctl trace --src 10.244.0.10:40000 --dst 10.96.0.10:80 (in the node namespace)",
    "== lbctl status (in the node namespace)",
    "== cleaning up",
]


def processes(cg: Path) -> list[int]:
    return [int(pid) for pid in (cg / "cgroup.procs").read_text().split()]


def namespaces(name: str) -> list[str]:
    run = Path("/run/netns")
    return sorted(p.name for p in run.glob(f"{name}-*")) if run.exists() else []


@pytest.mark.netns
def test_make_demo_balances_and_leaves_nothing_behind(tmp_path: Path) -> None:
    name = f"lbt{os.getpid()}demo"
    pin = BPFFS / f"{PIN_PREFIX}demo"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    cg = cgroup.cgroup2_mount() / f"lbctl-test-{os.getpid()}-demo"
    cg.mkdir()
    env = {**os.environ, "LBCTL_DEMO_NAME": name, "LBCTL_DEMO_PIN": str(pin), "TMPDIR": str(tmp)}

    def into_cgroup() -> None:  # in the child, before the demo starts
        (cg / "cgroup.procs").write_text(str(os.getpid()))

    try:
        demo = subprocess.run(
            ["bash", str(ROOT / "scripts" / "demo.sh")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            preexec_fn=into_cgroup,
        )
        assert demo.returncode == 0, f"{demo.stdout}\n{demo.stderr}"
        out = demo.stdout
        # what it prints: the same sections, the requests all answered by the three pods
        assert [line for line in out.splitlines() if line.startswith("== ")] == SECTIONS, out
        assert out.rstrip().endswith("== cleaning up"), out
        assert "request failed" not in out, out
        counts = re.findall(r"^   (\d+) hello from (pod\d) \(", out, re.M)
        assert sum(int(n) for n, _ in counts) == 30, out
        assert {pod for _, pod in counts} <= {"pod0", "pod1", "pod2"} and len(counts) >= 2, out

        # nothing left: processes (a moment for those exiting), namespaces, pins, files
        deadline = time.monotonic() + 10
        while processes(cg) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in processes(cg)}
        assert not left, f"the demo left processes running: {left}"
        assert namespaces(name) == []
        assert not pin.exists(), sorted(p.name for p in pin.iterdir())
        assert list(tmp.iterdir()) == []
    finally:
        for pid in processes(cg):  # only what the demo started
            os.kill(pid, signal.SIGKILL)
        for ns in namespaces(name):
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)
        remove_pins(pin)
        remove_cgroup(cg)
