"""Attaching and detaching the XDP program (the fast path on external interfaces).

An interface holds one XDP program per mode, and native and generic cannot
be active at once.  lbctl's program is recognised by its name (`lbctl_xdp`,
read from the kernel's program info of the id the link reports), so lbctl
replaces and removes only its own and refuses to touch anyone else's.  A
restart replaces the program in one step (XDP_FLAGS_REPLACE, naming the
program it expects to find), so no packet meets an interface without it.
Like tc.py, the calling process must be in the interfaces' network namespace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
from collections.abc import Iterable, Iterator
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from lbctl.datapath.ebpf import libbpf, tc

PROGRAM_NAME = "lbctl_xdp"

# <linux/if_link.h>
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4

MODES = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
_MODE_FLAGS = {**MODES, "offload": XDP_FLAGS_HW_MODE}
# IFLA_XDP_ATTACHED as pyroute2 decodes it, for links that report one program
_ATTACHED = {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload"}
_PROG_IDS = {
    "IFLA_XDP_DRV_PROG_ID": "native",
    "IFLA_XDP_SKB_PROG_ID": "generic",
    "IFLA_XDP_HW_PROG_ID": "offload",
}
_IP_LINK_MODE = {"native": "xdpdrv", "generic": "xdpgeneric", "offload": "xdpoffload"}


class XdpError(tc.AttachError):
    """Attaching or detaching failed; the message names the interface, the cause, the fix."""


@dataclasses.dataclass(frozen=True)
class Program:
    """An XDP program attached to an interface."""

    mode: str  # native, generic or offload
    prog_id: int
    name: str  # "" when the kernel would not say

    @property
    def ours(self) -> bool:
        return self.name == PROGRAM_NAME


def _program_name(prog_id: int) -> str:
    try:
        fd = libbpf.prog_fd_by_id(prog_id)
    except OSError:
        return ""  # gone meanwhile, or not ours to read
    try:
        return libbpf.prog_info(fd).name
    except OSError:
        return ""
    finally:
        os.close(fd)


def _programs(link_msg: Any) -> list[Program]:
    """The XDP programs a link message reports, one per mode."""
    xdp = link_msg.get_attr("IFLA_XDP")
    if xdp is None:
        return []
    found: dict[str, int] = {}
    for attr, mode in _PROG_IDS.items():
        prog_id = xdp.get_attr(attr)
        if prog_id:
            found[mode] = int(prog_id)
    attached = _ATTACHED.get(str(xdp.get_attr("IFLA_XDP_ATTACHED")))
    prog_id = xdp.get_attr("IFLA_XDP_PROG_ID")
    if not found and attached and prog_id:
        found[attached] = int(prog_id)
    return [Program(mode, pid, _program_name(pid)) for mode, pid in sorted(found.items())]


def programs(ipr: IPRoute, index: int) -> list[Program]:
    """The XDP programs attached to the interface with this index."""
    return _programs(ipr.get_links(index)[0])


@contextlib.contextmanager
def _prog_fd(prog_id: int) -> Iterator[int]:
    fd = libbpf.prog_fd_by_id(prog_id)
    try:
        yield fd
    finally:
        os.close(fd)


def _set(ipr: IPRoute, index: int, fd: int, flags: int, expected_fd: int | None = None) -> None:
    attrs: list[tuple[str, int]] = [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]
    if expected_fd is not None:
        attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
    ipr.link("set", index=index, xdp={"attrs": attrs})


def _kernel_says(err: NetlinkError) -> str:
    text = str(err.args[1]) if len(err.args) > 1 else os.strerror(err.code)
    return text.rstrip(".")


def _attach_error(ifname: str, mode: str, err: NetlinkError) -> XdpError:
    said = _kernel_says(err)
    if mode == "native" and err.code in (errno.EOPNOTSUPP, errno.EINVAL, errno.ERANGE):
        return XdpError(
            f"interface {ifname}: the driver cannot run the XDP program in native mode "
            f"(the kernel says: {said}); use --xdp generic, or fix what the kernel names "
            "(e.g. a lower MTU, LRO off)"
        )
    if err.code == errno.EBUSY:
        return XdpError(
            f"interface {ifname}: an XDP program attached through a BPF link holds the "
            f"interface (the kernel says: {said}); detach it (bpftool link) or run "
            "lbctl without --xdp"
        )
    if err.code == errno.EEXIST:
        return XdpError(
            f"interface {ifname}: another XDP program was attached while lbctl attached "
            f"its own (the kernel says: {said}); lbctl leaves it alone: remove it or run "
            "lbctl without --xdp"
        )
    return XdpError(f"interface {ifname}: cannot attach the XDP program ({mode}): {said}")


def attach(link: tc.Link, prog_fd: int, mode: str) -> None:
    """Attach lbctl's XDP program to the link in `mode`, replacing lbctl's own.

    `mode` is "native" (the driver runs it, XDP_FLAGS_DRV_MODE) or "generic"
    (the kernel runs it on the skb, XDP_FLAGS_SKB_MODE).  A program lbctl
    attached before, in the same mode, is replaced atomically; one in the
    other mode is removed first (a mode change cannot be atomic).  Another
    program in the way is an error: lbctl never replaces what is not its own.
    """
    if mode not in MODES:
        raise XdpError(f"interface {link.name}: unknown XDP mode {mode!r}; use native or generic")
    flags = MODES[mode]
    with IPRoute(ext_ack=True) as ipr:
        try:
            present = programs(ipr, link.index)
        except NetlinkError as err:
            raise XdpError(f"interface {link.name}: cannot read its XDP state: {err}") from err
        for prog in present:
            if not prog.ours:
                raise XdpError(
                    f"interface {link.name}: another XDP program ({prog.name or 'unnamed'}, "
                    f"id {prog.prog_id}) is attached in {prog.mode} mode and lbctl does not "
                    f"replace it; remove it (ip link set dev {link.name} "
                    f"{_IP_LINK_MODE[prog.mode]} off) or run lbctl without --xdp"
                )
        same = [prog for prog in present if prog.mode == mode]
        try:
            for prog in present:
                if prog.mode != mode:
                    _detach_one(ipr, link.index, prog)
            if same:
                with _prog_fd(same[0].prog_id) as old_fd:
                    _set(ipr, link.index, prog_fd, flags | XDP_FLAGS_REPLACE, old_fd)
            else:
                _set(ipr, link.index, prog_fd, flags | XDP_FLAGS_UPDATE_IF_NOEXIST)
        except NetlinkError as err:
            raise _attach_error(link.name, mode, err) from err
        except OSError as err:  # the old program vanished between reading and replacing
            raise XdpError(
                f"interface {link.name}: its XDP program changed while lbctl replaced it "
                f"({err}); try again"
            ) from err


def _detach_one(ipr: IPRoute, index: int, prog: Program) -> None:
    """Remove prog, and only it: the kernel checks it is still the one attached."""
    try:
        with _prog_fd(prog.prog_id) as old_fd:
            _set(ipr, index, -1, _MODE_FLAGS[prog.mode] | XDP_FLAGS_REPLACE, old_fd)
    except OSError as err:
        if err.errno != errno.ENOENT:  # already gone: nothing to remove
            raise


def attached_interfaces() -> list[str]:
    """Interfaces of this namespace that carry lbctl's XDP program."""
    with IPRoute() as ipr:
        return sorted(
            str(msg.get_attr("IFLA_IFNAME"))
            for msg in ipr.get_links()
            if any(prog.ours for prog in _programs(msg))
        )


def detach(ifnames: Iterable[str]) -> list[str]:
    """Remove lbctl's XDP program from the named interfaces that have it; return them.

    Other XDP programs stay; a missing interface is skipped.
    """
    done = []
    with IPRoute(ext_ack=True) as ipr:
        for ifname in ifnames:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                continue
            index = int(found[0])
            try:
                ours = [prog for prog in programs(ipr, index) if prog.ours]
                for prog in ours:
                    _detach_one(ipr, index, prog)
            except NetlinkError as err:
                if err.code in (errno.ENODEV, errno.ENOENT):
                    continue  # the interface went meanwhile
                raise XdpError(
                    f"interface {ifname}: cannot remove lbctl's XDP program: {_kernel_says(err)}"
                ) from err
            except OSError as err:
                raise XdpError(
                    f"interface {ifname}: cannot remove lbctl's XDP program: {err}"
                ) from err
            if ours:
                done.append(ifname)
    return done
