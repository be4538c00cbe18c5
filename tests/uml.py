"""Run a pytest session inside a User-Mode Linux kernel, which has IPVS.

This machine's kernel has no IPVS, so the IPVS datapath's tests run in
Debian's linux.uml (6.1, with IPVS as modules) booted with the host's file
system as its root (hostfs): the worktree, its venv and the Debian tools are
the same inside.  The init script mounts what a system needs, loads the
modules, runs the inner pytest session with the worktree's venv, writes its
JUnit report and exit code to a host directory and powers off.  UML runs as
an ordinary process here; it is killed (by its PID) if it outlives the
timeout.  Network namespaces, IPVS and nftables changes all happen inside
the UML kernel, never in the host's namespace.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

UML = "/usr/bin/linux.uml"
REPO = Path(__file__).resolve().parents[1]
MODULES = (
    "ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_sh ip_vs_mh veth dummy "
    "nf_conntrack nf_nat nf_tables nft_ct nft_masq nft_reject nf_reject_ipv4"
)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def available() -> str | None:
    """Why UML tests cannot run here, or None."""
    if not Path(UML).exists():
        return f"{UML} is missing: run `make deps` (Debian package user-mode-linux)"
    release = _uml_release()
    if release and not Path(f"/lib/modules/{release}").exists():
        return f"/lib/modules/{release} is missing: run `make deps` (it links UML's modules)"
    return None


def _uml_release() -> str | None:
    found = sorted(Path("/usr/lib/uml/modules").glob("*"))
    return found[-1].name if found else None


@dataclasses.dataclass
class CaseResult:
    name: str
    outcome: str  # passed, failed, error, skipped, xfailed
    message: str = ""


@dataclasses.dataclass
class UmlRun:
    returncode: int | None  # the inner pytest's exit code; None: it never finished
    cases: dict[str, CaseResult]
    console: str  # the kernel's console and the init script's output
    seconds: float


def run_pytest(workdir: Path, tests: list[str], timeout: float = 240.0) -> UmlRun:
    """Boot UML, run `pytest tests...` inside it, power off; the per-test results."""
    import time

    workdir.mkdir(parents=True, exist_ok=True)
    report = workdir / "junit.xml"
    rc_file = workdir / "rc"
    out = workdir / "inner.log"
    python = Path(sys.executable)
    inner = " ".join(shlex.quote(t) for t in tests)
    init = workdir / "init.sh"
    init.write_text(
        "#!/bin/sh\n"
        f"export PATH={PATH} HOME=/root LBCTL_IN_UML=1\n"
        "mount -t proc proc /proc\n"
        "mount -t sysfs sys /sys\n"
        "mount -t tmpfs tmpfs /run\n"
        "mount -t tmpfs tmpfs /dev/shm 2>/dev/null\n"
        "mkdir -p /run/netns\n"
        "mount -t bpf bpf /sys/fs/bpf\n"
        "ip link set lo up\n"
        f'for m in {MODULES}; do modprobe $m || echo "modprobe $m failed"; done\n'
        f"cd {shlex.quote(str(REPO))}\n"
        f"{shlex.quote(str(python))} -m pytest -q -p no:cacheprovider -p no:randomly "
        f"--basetemp={shlex.quote(str(workdir / 'inner'))} "
        f"--junitxml={shlex.quote(str(report))} {inner} >{shlex.quote(str(out))} 2>&1\n"
        f"echo $? >{shlex.quote(str(rc_file))}\n"
        "sync\n"
        "poweroff -f\n"
    )
    init.chmod(0o755)
    console = workdir / "console.log"
    started = time.monotonic()
    with console.open("wb") as sink:
        proc = subprocess.Popen(
            [
                UML,
                "mem=1G",
                "rootfstype=hostfs",
                "rootflags=/",
                "rw",
                f"init={init}",
                "con=null",
                "con0=fd:0,fd:1",
            ],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its helper threads are processes: one group to kill
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    seconds = time.monotonic() - started
    text = console.read_text(errors="replace")
    if out.exists():
        text += "\n--- inner pytest ---\n" + out.read_text(errors="replace")
    rc = int(rc_file.read_text()) if rc_file.exists() and rc_file.read_text().strip() else None
    return UmlRun(rc, _cases(report), text, seconds)


def _cases(report: Path) -> dict[str, CaseResult]:
    if not report.exists():
        return {}
    cases = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "?")
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                if tag == "skipped" and node.get("type") == "pytest.xfail":
                    outcome = "xfailed"
                message = (node.get("message") or "") + "\n" + (node.text or "")
                break
        cases[name] = CaseResult(name, outcome, message.strip())
    return cases


def in_uml() -> bool:
    return os.environ.get("LBCTL_IN_UML") == "1"


def which(tool: str) -> str:
    found = shutil.which(tool)
    assert found, f"{tool} not found"
    return found
