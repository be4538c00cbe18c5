"""The socket hooks on a cgroup: attach, replace, detach and list them.

Processes in the node's network namespace (kubelet, hostNetwork pods) are
balanced at the socket by the cgroup programs of bpf/lbctl_sock.c.  They run
for every process of the cgroup they are attached to and of its descendants,
so the agent attaches them to a cgroup v2 directory (normally the root of
the cgroup2 mount); the programs themselves leave alone every socket outside
the node's network namespace (lb4_config.netns_cookie, see `netns_cookie`).

Each hook is a BPF link pinned in the agent's bpffs directory as
`link_sock_<hook>`, so it outlives the agent like the maps do.  A restarted
agent swaps the new program into the pinned link (`bpf_link_update`): the
hook is never empty and never runs two versions at once.  `detach` unpins
and detaches them (`lbctl cleanup`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import os
import socket
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

from lbctl.datapath import DatapathError
from lbctl.datapath.ebpf import libbpf
from lbctl.datapath.ebpf.compiler import CGROUP_SOCK_ADDR, PROGRAMS

CGROUP2_SUPER_MAGIC = 0x63677270
CGROUP_SUPER_MAGIC = 0x27E0EB  # cgroup v1
SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>, Linux 5.14
MOUNTS = Path("/proc/self/mounts")
LINK_PREFIX = "link_sock_"  # pins of the socket hooks' links under the bpffs directory


class CgroupError(DatapathError):
    """A socket hook could not be attached, replaced or detached; says what and the fix."""


@dataclasses.dataclass(frozen=True)
class SockHook:
    program: str  # the function in bpf/lbctl_sock.c, e.g. lbctl_sock_connect4
    attach_type: int  # BPF_CGROUP_*

    @property
    def name(self) -> str:
        """connect4, sendmsg4, recvmsg4, getpeername4."""
        return self.program.removeprefix("lbctl_sock_")

    def pin(self, pin_dir: Path) -> Path:
        return pin_dir / f"{LINK_PREFIX}{self.name}"


# The cgroup socket programs the compiler loads, with their attach types.
SOCK_HOOKS: tuple[SockHook, ...] = tuple(
    SockHook(spec.name, spec.attach_type) for spec in PROGRAMS if spec.prog_type == CGROUP_SOCK_ADDR
)


@dataclasses.dataclass(frozen=True)
class Attachment:
    """One pinned socket hook, as the kernel reports it."""

    hook: str  # connect4, ...
    pin: Path
    link_id: int
    prog_id: int
    program: str  # the attached program's name as the kernel knows it (15 characters)
    cgroup_id: int  # the cgroup's inode number; 0 once the cgroup was removed
    attach_type: int
    replaced: bool = False  # `attach` swapped the program of an existing link


# -- where cgroups are -----------------------------------------------------------


def _unescape(field: str) -> str:
    """Mount points in /proc/self/mounts escape space, tab, newline and backslash."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def cgroup2_mount(mounts: Path = MOUNTS) -> Path:
    """Where the cgroup v2 hierarchy is mounted.

    /sys/fs/cgroup on a unified host; /sys/fs/cgroup/unified on a hybrid one.
    """
    try:
        text = mounts.read_text()
    except OSError as err:
        raise CgroupError(f"cannot read {mounts} to find the cgroup2 mount: {err}") from err
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(_unescape(fields[1]))
    raise CgroupError(
        f"no cgroup2 file system is mounted (none in {mounts}); the socket hooks need "
        "cgroup v2: mount it (`mount -t cgroup2 none /sys/fs/cgroup/unified` on a "
        'cgroup v1 host) or turn the socket hooks off (`--cgroup ""`)'
    )


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def _fs_type(path: Path) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = _Statfs()
    if libc.statfs(str(path).encode(), ctypes.byref(buf)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))
    return int(buf.f_type) & 0xFFFFFFFF


def check_cgroup2(cgroup: Path) -> None:
    """Raise CgroupError unless `cgroup` is a directory of the cgroup v2 hierarchy."""
    if not cgroup.exists():
        raise CgroupError(
            f"cgroup {cgroup} does not exist; give a directory of the cgroup2 mount{_mount_hint()}"
        )
    try:
        fs_type = _fs_type(cgroup)
    except OSError as err:
        raise CgroupError(
            f"cgroup {cgroup}: {err.strerror}; give a directory of the cgroup2 mount{_mount_hint()}"
        ) from err
    if not cgroup.is_dir() or fs_type != CGROUP2_SUPER_MAGIC:
        what = "a cgroup v1 hierarchy" if fs_type == CGROUP_SUPER_MAGIC else "not a cgroup"
        raise CgroupError(
            f"{cgroup} is not a cgroup2 directory ({what}, file system type {fs_type:#x}); "
            f"the socket hooks attach only to cgroup v2: give a directory of the cgroup2 "
            f"mount{_mount_hint()}"
        )


UNIFIED = "unified"  # where a hybrid host mounts cgroup2, below its v1 controllers' tmpfs
TMPFS_MAGIC = 0x01021994


def find_cgroup2(path: Path) -> Path:
    """The cgroup2 directory the socket hooks attach to, found from `path`.

    `path` itself when it is a cgroup2 directory (the host's /sys/fs/cgroup on a
    unified host, or any cgroup below it).  On a host with the hybrid layout,
    /sys/fs/cgroup is a tmpfs holding the cgroup v1 controllers and cgroup2 is
    mounted at its `unified`: given that tmpfs (e.g. the host's /sys/fs/cgroup
    mounted into a container), the `unified` below it.  Anything else is a
    CgroupError that says what is there and what to give instead.
    """
    if not path.exists():
        raise CgroupError(
            f"cgroup {path} does not exist; give the mount point of the host's cgroup2 "
            f'hierarchy (or of /sys/fs/cgroup), or turn the socket hooks off (cgroupPath: "", '
            f'--cgroup ""){_mount_hint()}'
        )
    try:
        fs_type = _fs_type(path)
    except OSError as err:
        raise CgroupError(f"cgroup {path}: {err.strerror}{_mount_hint()}") from err
    if fs_type == CGROUP2_SUPER_MAGIC and path.is_dir():
        return path
    unified = path / UNIFIED
    if fs_type == TMPFS_MAGIC and unified.is_dir() and _fs_type(unified) == CGROUP2_SUPER_MAGIC:
        return unified
    what = {
        CGROUP_SUPER_MAGIC: "a cgroup v1 hierarchy",
        TMPFS_MAGIC: f"a tmpfs with no cgroup2 mounted at {unified}",
    }.get(fs_type, "not a cgroup")
    raise CgroupError(
        f"{path} is not a cgroup2 directory ({what}, file system type {fs_type:#x}); the "
        "socket hooks attach only to cgroup v2: give the mount point of the host's cgroup2 "
        "hierarchy, or the host's /sys/fs/cgroup when cgroup2 is mounted at its unified "
        '(the hybrid layout), or turn the socket hooks off (cgroupPath: "", --cgroup "")'
        f"{_mount_hint()}"
    )


def _mount_hint() -> str:
    try:
        return f" ({cgroup2_mount()})"
    except CgroupError:
        return " (none is mounted: `mount -t cgroup2 none /sys/fs/cgroup/unified`)"


def cgroup_id(cgroup: Path) -> int:
    """The cgroup's id, as BPF link info reports it: its inode number on cgroup2."""
    return os.stat(cgroup).st_ino


def netns_cookie() -> int:
    """The cookie of the calling thread's network namespace (SO_NETNS_COOKIE).

    The socket programs compare it with bpf_get_netns_cookie(); write it to
    lb4_config.netns_cookie from the node's namespace.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError as err:
            raise CgroupError(
                f"cannot read the network namespace cookie (SO_NETNS_COOKIE): {err.strerror}; "
                "the socket hooks need Linux 5.14 or later"
            ) from err
    cookie: int = struct.unpack("=Q", raw)[0]
    return cookie


# -- attaching -------------------------------------------------------------------


@contextlib.contextmanager
def _opened_dir(cgroup: Path) -> Iterator[int]:
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_link(pin: Path) -> int | None:
    """The pinned link's descriptor, or None when nothing is pinned there."""
    if not pin.exists():
        return None
    return libbpf.obj_get(str(pin))


def _describe(hook: SockHook, pin: Path, link_fd: int, replaced: bool = False) -> Attachment:
    link = libbpf.link_info(link_fd)
    name = ""
    with contextlib.suppress(OSError):
        prog_fd = libbpf.prog_fd_by_id(link.prog_id)
        try:
            name = libbpf.prog_info(prog_fd).name
        finally:
            os.close(prog_fd)
    return Attachment(
        hook=hook.name,
        pin=pin,
        link_id=link.id,
        prog_id=link.prog_id,
        program=name,
        cgroup_id=link.cgroup_id,
        attach_type=link.attach_type,
        replaced=replaced,
    )


def _unpin(link_fd: int, pin: Path) -> None:
    """Detach a pinned link and remove its pin."""
    with contextlib.suppress(libbpf.BpfError):  # its cgroup is gone: detached already
        libbpf.link_detach(link_fd)
    pin.unlink(missing_ok=True)


def _fail(what: str, hook: SockHook, cgroup: Path, err: OSError) -> CgroupError:
    fix = {
        errno.EPERM: "run as root (CAP_BPF and CAP_NET_ADMIN are needed)",
        errno.EACCES: "run as root (CAP_BPF and CAP_NET_ADMIN are needed)",
        errno.EINVAL: "the program was not loaded for this hook, or the kernel lacks it",
        errno.ENOENT: "is the bpffs directory still mounted?",
    }.get(err.errno or 0, "")
    tail = f"; {fix}" if fix else ""
    return CgroupError(f"{what} socket hook {hook.name} on cgroup {cgroup}: {err}{tail}")


def attach(cgroup: Path, prog_fds: Mapping[str, int], pin_dir: Path) -> list[Attachment]:
    """Attach the loaded socket programs to `cgroup`, pinning each link under `pin_dir`.

    `prog_fds` maps program names to descriptors (Loaded.prog_fds); the
    programs it lacks (not built, or failed to load) have their old links,
    if any, detached rather than left running an older build.  A hook already
    pinned on this cgroup gets the new program swapped in atomically; one
    pinned on another cgroup (or on a removed one) moves: the new link is
    made before the old one goes.  Every hook is tried; failures are raised
    together at the end as one CgroupError.
    """
    check_cgroup2(cgroup)
    if not pin_dir.is_dir():
        raise CgroupError(
            f"bpffs directory {pin_dir} for the socket hooks' links does not exist; "
            "the maps are pinned there first (is bpffs mounted at /sys/fs/bpf?)"
        )
    done: list[Attachment] = []
    errors: list[str] = []
    with _opened_dir(cgroup) as cgroup_fd:
        target = os.fstat(cgroup_fd).st_ino
        for hook in SOCK_HOOKS:
            try:
                attached = _attach_one(hook, cgroup, cgroup_fd, target, prog_fds, pin_dir)
            except CgroupError as err:
                errors.append(str(err))
                continue
            if attached is not None:
                done.append(attached)
    if errors:
        raise CgroupError("; ".join(errors))
    return done


def _attach_one(
    hook: SockHook,
    cgroup: Path,
    cgroup_fd: int,
    target: int,
    prog_fds: Mapping[str, int],
    pin_dir: Path,
) -> Attachment | None:
    pin = hook.pin(pin_dir)
    prog_fd = prog_fds.get(hook.program)
    try:
        old = _open_link(pin)
    except OSError as err:
        raise _fail("opening the pinned link of the", hook, cgroup, err) from err
    try:
        if prog_fd is None:
            if old is not None:
                _unpin(old, pin)  # this build has no such program: no old one runs on
            return None
        if old is not None:
            info = libbpf.link_info(old)
            if info.cgroup_id == target and info.attach_type == hook.attach_type:
                try:
                    libbpf.link_update(old, prog_fd)
                except OSError as err:
                    raise _fail("replacing the program of the", hook, cgroup, err) from err
                return _describe(hook, pin, old, replaced=True)
        try:
            new = libbpf.link_create(prog_fd, cgroup_fd, hook.attach_type)
        except OSError as err:
            raise _fail("attaching the", hook, cgroup, err) from err
        try:
            if old is not None:
                _unpin(old, pin)  # pinned on another cgroup: it moves here
            try:
                libbpf.obj_pin(new, str(pin))
            except OSError as err:  # closing `new` below detaches it again
                raise _fail("pinning the link of the", hook, cgroup, err) from err
            return _describe(hook, pin, new)
        finally:
            os.close(new)
    finally:
        if old is not None:
            os.close(old)


def detach(pin_dir: Path) -> list[str]:
    """Detach every socket hook pinned under `pin_dir` and remove the pins.

    Returns the hooks detached.  For `lbctl cleanup`: it needs no cgroup, the
    pins say where the hooks are.
    """
    detached = []
    if not pin_dir.is_dir():
        return []
    for pin in sorted(pin_dir.glob(f"{LINK_PREFIX}*")):
        try:
            fd = libbpf.obj_get(str(pin))
        except OSError as err:
            raise CgroupError(f"opening the pinned socket hook {pin}: {err}") from err
        try:
            _unpin(fd, pin)
        finally:
            os.close(fd)
        detached.append(pin.name.removeprefix(LINK_PREFIX))
    return detached


def attached(pin_dir: Path) -> list[Attachment]:
    """The socket hooks pinned under `pin_dir`: which program runs on which cgroup."""
    out = []
    by_name = {hook.name: hook for hook in SOCK_HOOKS}
    if not pin_dir.is_dir():
        return []
    for pin in sorted(pin_dir.glob(f"{LINK_PREFIX}*")):
        name = pin.name.removeprefix(LINK_PREFIX)
        hook = by_name.get(name, SockHook(f"lbctl_sock_{name}", -1))
        fd = libbpf.obj_get(str(pin))
        try:
            out.append(_describe(hook, pin, fd))
        finally:
            os.close(fd)
    return out


def cgroup_programs(cgroup: Path, effective: bool = False) -> dict[str, list[int]]:
    """Ids of the programs attached to `cgroup` for each socket hook (lbctl's or not).

    `effective`: the programs that run for its processes, inherited ones included.
    """
    check_cgroup2(cgroup)
    out: dict[str, list[int]] = {}
    with _opened_dir(cgroup) as fd:
        for hook in SOCK_HOOKS:
            try:
                out[hook.name] = libbpf.prog_query(fd, hook.attach_type, effective)
            except OSError as err:
                raise _fail("querying the", hook, cgroup, err) from err
    return out
