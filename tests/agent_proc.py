"""The real agent (`lbctl run`) as a process inside a test's node namespace.

It is started with `nsenter --net=...` rather than `ip netns exec`, which
remounts /sys and would hide bpffs from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.netlab import Netns

LBCTL = str(Path(sys.executable).parent / "lbctl")


def lbctl(
    *args: str, node: Netns | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run an lbctl command, in the node's namespace when one is given."""
    prefix = ["nsenter", f"--net={node.path}"] if node else []
    return subprocess.run(
        [*prefix, LBCTL, *args], capture_output=True, text=True, timeout=60, check=check
    )


class AgentProcess:
    """`lbctl run` in the node's namespace; `manifests` None: the source is in `extra`.

    `tree`: run the lbctl package of that source tree (e.g. an older commit's,
    tests/test_upgrade.py) instead of this one; `env`: more environment variables.
    """

    def __init__(
        self,
        node: Netns,
        manifests: Path | None,
        pin_dir: Path,
        log: Path,
        *extra: str,
        tree: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.node = node
        self.manifests = manifests
        self.pin_dir = pin_dir
        self.log = log
        self.extra = extra
        self.tree = tree
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        args = ["run", "--bpffs", str(self.pin_dir)]
        if self.manifests is not None:
            args += ["--manifests", str(self.manifests)]
        if "--cgroup" not in self.extra:
            # never the host's root cgroup: a test passes a cgroup of its own
            args += ["--cgroup", ""]
        command = [LBCTL] if self.tree is None else [sys.executable, "-m", "lbctl"]
        env = {**os.environ, **self.env}
        if self.tree is not None:
            env["PYTHONPATH"] = str(self.tree)  # ahead of this checkout's package
            env["PYTHONSAFEPATH"] = "1"  # and the working directory's (the compiler's too)
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net={self.node.path}", *command, *args, *self.extra],
                stdout=sink,
                stderr=sink,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        return self

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}):\n{self.log_text()}")
            time.sleep(0.05)
        raise AssertionError(f"agent never logged {text!r}:\n{self.log_text()}")

    def dump(self) -> dict[str, Any]:
        out = lbctl("maps", "dump", "-o", "json", "--bpffs", str(self.pin_dir))
        data: dict[str, Any] = json.loads(out.stdout)
        return data

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: nothing is cleaned up."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def terminate(self) -> None:
        """SIGTERM, as a rolling update does: the datapath stays for the next agent."""
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        """Stop the agent we started (by its PID), then remove its datapath."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        lbctl("cleanup", "--bpffs", str(self.pin_dir), node=self.node, check=False)

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
