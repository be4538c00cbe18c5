"""Compile and load the BPF programs in a short-lived child process.

bcc embeds clang and LLVM: compiling in the agent would leave it ~140 MB
bigger for the rest of its life.  The child (`python -m
lbctl.datapath.ebpf.compiler`) compiles with bcc, loads the program, creates or
opens the pinned maps, and hands the descriptors back over a Unix socket
(SCM_RIGHTS) before it exits; the kernel objects live on through them.  It
also runs while the agent is busy listing the API, on another CPU.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lbctl.datapath.ebpf.maps import MAP_TYPES
from lbctl.datapath.ebpf.settings import BpfSettings

PROGRAM = "lbctl_tc_ingress"
EGRESS_PROGRAM = "lbctl_tc_egress"


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    name: str
    prog_type: int  # BPF_PROG_TYPE_*
    attach_type: int = -1  # expected attach type, for the types that need one
    required: bool = False  # without it the datapath cannot run at all


# BPF_PROG_TYPE_* and BPF_* attach types of the kernel's uapi.
SCHED_CLS, XDP, CGROUP_SOCK_ADDR = 3, 6, 18
INET4_CONNECT, UDP4_SENDMSG, UDP4_RECVMSG, INET4_GETPEERNAME = 10, 14, 19, 29

PROGRAMS = [
    ProgramSpec(PROGRAM, SCHED_CLS, required=True),
    ProgramSpec(EGRESS_PROGRAM, SCHED_CLS, required=True),
    ProgramSpec("lbctl_sock_connect4", CGROUP_SOCK_ADDR, INET4_CONNECT),
    ProgramSpec("lbctl_sock_sendmsg4", CGROUP_SOCK_ADDR, UDP4_SENDMSG),
    ProgramSpec("lbctl_sock_recvmsg4", CGROUP_SOCK_ADDR, UDP4_RECVMSG),
    ProgramSpec("lbctl_sock_getpeername4", CGROUP_SOCK_ADDR, INET4_GETPEERNAME),
    ProgramSpec("lbctl_xdp", XDP),
]
_MAX_FDS = len(PROGRAMS) + len(MAP_TYPES)
_MAX_LOG = 8000  # the end of what the compiler printed is what explains a failure
PR_SET_PDEATHSIG = 1


class CompileError(Exception):
    """bcc could not compile or load the program; the message says what it printed."""


@dataclasses.dataclass
class Loaded:
    prog_fds: dict[str, int]  # the programs that loaded, by name
    map_fds: dict[str, int]
    log: str  # what the compiler printed (warnings)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # optional program -> why

    @property
    def prog_fd(self) -> int:
        return self.prog_fds[PROGRAM]

    def close(self) -> None:
        for fd in [*self.prog_fds.values(), *self.map_fds.values()]:
            os.close(fd)


class Compilation:
    """A compile started in the background; `result()` waits for its descriptors."""

    def __init__(self, settings: BpfSettings) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = ours
        request = dataclasses.asdict(settings)
        request["pin_dir"] = str(settings.pin_dir)
        # A file, not a pipe: a compiler that prints much would block on a full pipe.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by result())
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "lbctl.datapath.ebpf.compiler",
                    str(theirs.fileno()),
                    json.dumps(request),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                pass_fds=[theirs.fileno()],
            )
        finally:
            theirs.close()

    def result(self, timeout: float = 120.0) -> Loaded:
        try:
            self._sock.settimeout(timeout)
            message, fds, _, _ = socket.recv_fds(self._sock, 1 << 16, _MAX_FDS)
        except OSError as err:
            self._proc.kill()
            message, fds = f"no answer from the compiler ({err})".encode(), []
        finally:
            self._sock.close()
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._stderr.seek(0)
        printed = self._stderr.read().decode(errors="replace").strip()[-_MAX_LOG:]
        self._stderr.close()
        answer = _answer(message)
        names = [*answer.get("programs", []), *MAP_TYPES] if answer else []
        if answer is None or len(fds) != len(names):
            for fd in fds:
                os.close(fd)
            reason = message.decode(errors="replace") or f"it exited with {self._proc.returncode}"
            raise CompileError(f"{reason}\n{printed}".strip())
        named = dict(zip(names, fds, strict=True))
        progs = {name: named.pop(name) for name in answer["programs"]}
        return Loaded(progs, named, printed, dict(answer.get("failed", {})))


def _answer(message: bytes) -> dict[str, Any] | None:
    try:
        answer = json.loads(message)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) and "programs" in answer else None


def _defined(bpf: Any, name: str) -> bool:
    from bcc import lib

    return bool(lib.bpf_function_start(bpf.module, name.encode()))


def _child(sock_fd: int, request: str) -> int:
    # Die with the agent: an orphan must not pin maps for a restarted one.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    sock = socket.socket(fileno=sock_fd)
    try:
        from bcc import BPF

        from lbctl.datapath.ebpf.settings import bpf_program_text

        raw = json.loads(request)
        settings = BpfSettings(**{**raw, "pin_dir": Path(raw["pin_dir"])})
        bpf = BPF(text=bpf_program_text().encode(), cflags=settings.cflags())
        loaded: dict[str, int] = {}
        failed: dict[str, str] = {}
        for spec in PROGRAMS:
            if not _defined(bpf, spec.name):
                continue  # not part of this build
            try:
                fn = bpf.load_func(spec.name.encode(), spec.prog_type, attach_type=spec.attach_type)
            except Exception as err:
                if spec.required:
                    raise
                failed[spec.name] = " ".join(str(err).split())[-_MAX_LOG:]
                continue
            loaded[spec.name] = fn.fd
        fds = [*loaded.values()] + [bpf[name.encode()].map_fd for name in MAP_TYPES]
        answer = {"programs": list(loaded), "failed": failed}
        socket.send_fds(sock, [json.dumps(answer).encode()], fds)
        return 0
    except Exception as err:  # everything goes back to the agent as text
        sock.sendall(f"{type(err).__name__}: {err}".encode())
        return 1
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1]), sys.argv[2]))
