"""Compile and load the BPF program in a short-lived child process.

bcc embeds clang and LLVM: compiling in the agent would leave it ~140 MB
bigger for the rest of its life.  The child (`python -m
lbctl.datapath.compiler`) compiles with bcc, loads the program, creates or
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

from lbctl.datapath.maps import MAP_TYPES
from lbctl.datapath.settings import BpfSettings

PROGRAM = "lbctl_tc_ingress"
_NAMES = ["program", *MAP_TYPES]
_MAX_LOG = 8000  # the end of what the compiler printed is what explains a failure
PR_SET_PDEATHSIG = 1


class CompileError(Exception):
    """bcc could not compile or load the program; the message says what it printed."""


@dataclasses.dataclass
class Loaded:
    prog_fd: int
    map_fds: dict[str, int]
    log: str  # what the compiler printed (warnings)

    def close(self) -> None:
        for fd in [self.prog_fd, *self.map_fds.values()]:
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
                    "lbctl.datapath.compiler",
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
            message, fds, _, _ = socket.recv_fds(self._sock, 1 << 16, len(_NAMES))
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
        if message != b"ok" or len(fds) != len(_NAMES):
            for fd in fds:
                os.close(fd)
            reason = message.decode(errors="replace") or f"it exited with {self._proc.returncode}"
            raise CompileError(f"{reason}\n{printed}".strip())
        named = dict(zip(_NAMES, fds, strict=True))
        prog_fd = named.pop("program")
        return Loaded(prog_fd, named, printed)


def _child(sock_fd: int, request: str) -> int:
    # Die with the agent: an orphan must not pin maps for a restarted one.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    sock = socket.socket(fileno=sock_fd)
    try:
        from bcc import BPF

        from lbctl.datapath.settings import bpf_program_text

        raw = json.loads(request)
        settings = BpfSettings(**{**raw, "pin_dir": Path(raw["pin_dir"])})
        bpf = BPF(text=bpf_program_text().encode(), cflags=settings.cflags())
        prog = bpf.load_func(PROGRAM.encode(), BPF.SCHED_CLS)
        fds = [prog.fd] + [bpf[name.encode()].map_fd for name in MAP_TYPES]
        socket.send_fds(sock, [b"ok"], fds)
        return 0
    except Exception as err:  # everything goes back to the agent as text
        sock.sendall(f"{type(err).__name__}: {err}".encode())
        return 1
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1]), sys.argv[2]))
