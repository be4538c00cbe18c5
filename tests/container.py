"""The lbctl image, built by scripts/image.sh and run with podman as kubelet would.

Podman runs it here with runc and the cgroupfs manager under a cgroup parent
of the test's own, removed afterwards in every hierarchy (podman leaves the
parent and its `conmon` child behind).  Two settings differ from a node's,
for this VM and not for the image: crun refuses a host with cgroup v1 and
v2 side by side (runc does not), and this VM's root may not raise resource
limits (no CAP_SYS_RESOURCE in its bounding set), so the container's open
files and processes limits are set to what the test itself has instead of
podman's higher defaults.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CAP_SYS_RESOURCE = 24
_names = itertools.count()


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        ["podman", "--cgroup-manager", "cgroupfs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
    return out


def build(iidfile: Path) -> str:
    """Build deploy/Dockerfile with podman (layers cached); the image's id.

    Tagged for this checkout alone, so that suites of several checkouts on one
    machine never remove each other's image (scripts/image.sh drops the one
    it replaces)."""
    checkout = hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]
    env = {**os.environ, "IMAGE_TOOL": "podman", "IMAGE": f"localhost/lbctl-test:{checkout}"}
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "image.sh"), "--iidfile", str(iidfile)],
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
        env=env,
    )
    assert out.returncode == 0, f"make image failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return iidfile.read_text().strip()


def inspect(image: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(podman("image", "inspect", image).stdout)
    return data[0]


def can_grant(capability: int) -> bool:
    """Whether this process's bounding set holds the capability (a container can get it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return bool(int(line.split()[1], 16) >> capability & 1)
    return False


def _limits() -> list[str]:
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[0], 4096)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def cgroup_mounts() -> list[Path]:
    """Every cgroup (v1) and cgroup2 mount point of this host."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] in ("cgroup", "cgroup2"):
            found.append(Path(fields[1]))
    return found


class Container:
    """One container of the image; `remove` takes it and its cgroups away (idempotent)."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.name = f"lbctl-test-{os.getpid()}-{next(_names)}"
        self.parent = self.name  # its cgroup parent, below the root of every hierarchy
        self.started = False

    def run_args(self) -> list[str]:
        return [
            "--runtime",
            "runc",
            "--cgroup-parent",
            f"/{self.parent}",
            *_limits(),
        ]

    def start(self, *args: str, entrypoint: list[str] | None = None, image_args: list[str]) -> None:
        """`podman run -d` with `args`, the command (entrypoint) and its arguments."""
        self.started = True
        extra = ["--entrypoint", json.dumps(entrypoint)] if entrypoint is not None else []
        podman(
            "run",
            "-d",
            "--name",
            self.name,
            *self.run_args(),
            *args,
            *extra,
            self.image,
            *image_args,
        )

    def once(
        self, *args: str, entrypoint: list[str], image_args: list[str]
    ) -> subprocess.CompletedProcess[str]:
        """A command in a fresh container of the image, removed when it exits; no network."""
        self.started = True
        return podman(
            "run", "--rm", "--name", self.name, "--network", "none", *self.run_args(), *args,
            "--entrypoint", json.dumps(entrypoint), self.image, *image_args,
            check=False,
        )  # fmt: skip

    def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *command, check=False, timeout=60)

    def logs(self) -> str:
        out = podman("logs", self.name, check=False)
        return out.stdout + out.stderr

    def running(self) -> bool:
        out = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return out.stdout.strip() == "true"

    def stop(self, timeout: int = 20) -> int:
        """SIGTERM, as kubelet stops a pod; the command's exit code."""
        podman("stop", "-t", str(timeout), self.name, timeout=timeout + 30)
        out = podman("inspect", "--format", "{{.State.ExitCode}}", self.name)
        return int(out.stdout.strip())

    def remove(self) -> None:
        if not self.started:
            return
        podman("rm", "-f", "-t", "5", self.name, check=False, timeout=60)
        for mount in cgroup_mounts():
            _remove_tree(mount / self.parent)
        self.started = False


def _remove_tree(path: Path) -> None:
    """Remove an empty cgroup and its empty children, deepest first."""
    deadline = time.monotonic() + 10
    while path.exists():
        children = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        try:
            for child in children:
                child.rmdir()
            path.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
