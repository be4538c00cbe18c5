"""Swapping every attached lbctl program for the new build's, each in one step.

An upgrade that moves the datapath to new maps must leave no hook running
an old program, or that hook would go on reading maps nobody updates.  So
the new programs take over wherever lbctl's programs run now, whatever the
agent's options say: each hook's program is replaced by the program of the
same name, atomically per hook —

- tc (clsact ingress and egress): `tc filter replace` of lbctl's filter
  (same parent, priority and handle), found by its program name;
- XDP: a replace naming the program expected there (XDP_FLAGS_REPLACE),
  in the mode it runs in;
- socket hooks: `bpf_link_update` of the links pinned under the bpffs
  directory.

A hook whose program the new build lacks (not built, failed to load) is
detached instead.  Afterwards every tc and XDP program of the namespace is
checked: one that still uses an old map is reported, with its hook.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from lbctl.datapath.ebpf import cgroup, layout, libbpf, tc, xdp
from lbctl.datapath.ebpf.compiler import PROGRAMS, SCHED_CLS

ffi = layout.ffi
TCA_BPF_ID = 11  # <linux/pkt_cls.h>; pyroute2 0.9 does not decode it
TC_HOOKS = (("tc ingress", 0xFFFFFFF2), ("tc egress", 0xFFFFFFF3))  # clsact parents
TC_PROGRAMS = {spec.name for spec in PROGRAMS if spec.prog_type == SCHED_CLS}


@dataclasses.dataclass
class Swapped:
    """What the swap did, hook by hook ("lxc0 tc ingress", "xdp native ext0", ...)."""

    replaced: list[str] = dataclasses.field(default_factory=list)
    detached: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        kinds = {"tc": 0, "xdp": 0, "socket": 0}
        for hook in self.replaced:
            kinds[hook.split()[0]] += 1
        return (
            f"{kinds['tc']} tc, {kinds['xdp']} XDP and {kinds['socket']} socket hooks swapped"
            + (f", {len(self.detached)} detached" if self.detached else "")
        )


def filter_prog_id(options: Any) -> int | None:
    """TCA_BPF_ID from the raw attributes of a bpf filter's options."""
    raw = bytes(options.data[options.offset + 4 : options.offset + options.length])
    pos = 0
    while pos + 4 <= len(raw):
        length, kind = struct.unpack_from("=HH", raw, pos)
        if length < 4:
            break
        if kind & 0x3FFF == TCA_BPF_ID and length >= 8:
            return int(struct.unpack_from("=I", raw, pos + 4)[0])
        pos += (length + 3) & ~3
    return None


@dataclasses.dataclass(frozen=True)
class TcFilter:
    link: tc.Link
    hook: str  # "tc ingress", "tc egress"
    parent: int
    prio: int
    handle: int
    name: str  # the program name given at attach time
    prog_id: int | None


def tc_filters(ipr: IPRoute, link: tc.Link) -> Iterator[TcFilter]:
    """The bpf filters on the link's clsact hooks (lbctl's and others')."""
    for hook, parent in TC_HOOKS:
        try:
            found = ipr.get_filters(index=link.index, parent=parent)
        except NetlinkError:  # no clsact qdisc
            continue
        for f in found:
            options = f.get_attr("TCA_OPTIONS")
            if f.get_attr("TCA_KIND") != "bpf" or options is None:
                continue
            name = str(options.get_attr("TCA_BPF_NAME") or "")
            prio = int(f["info"]) >> 16
            yield TcFilter(
                link, hook, parent, prio, int(f["handle"]), name, filter_prog_id(options)
            )


def prog_map_ids(prog_id: int) -> set[int]:
    """The ids of the maps a loaded program uses."""
    try:
        fd = libbpf.prog_fd_by_id(prog_id)
    except OSError:
        return set()
    try:
        for room in (64, 1024):
            ids = ffi.new("uint32_t[]", room)
            info = ffi.new("struct lbctl_prog_info *")
            info.nr_map_ids = room
            info.map_ids = int(ffi.cast("uintptr_t", ids))
            size = ffi.new("uint32_t *", ffi.sizeof("struct lbctl_prog_info"))
            rc = libbpf._lib.bpf_obj_get_info_by_fd(fd, info, size)
            if rc < 0:
                return set()
            if info.nr_map_ids <= room:
                return {int(ids[i]) for i in range(info.nr_map_ids)}
        return set()
    finally:
        os.close(fd)


def _hook(f: TcFilter) -> str:
    return f"{f.hook} {f.link.name}"


def swap_tc(prog_fds: Mapping[str, int], done: Swapped) -> None:
    with IPRoute() as ipr:
        for link in tc.all_links():
            for f in list(tc_filters(ipr, link)):
                if f.name not in TC_PROGRAMS:
                    continue
                parent, prio = f"{f.parent >> 16:x}:{f.parent & 0xFFFF:x}", f.prio
                fd = prog_fds.get(f.name)
                try:
                    if fd is None:
                        ipr.tc(
                            "del-filter", "bpf", link.index, f.handle, parent=parent, prio=f.prio
                        )
                        done.detached.append(_hook(f))
                        continue
                    ipr.tc(
                        "replace-filter",
                        "bpf",
                        link.index,
                        f.handle,
                        fd=fd,
                        name=f.name,
                        parent=parent,
                        classid=1,
                        direct_action=True,
                        prio=prio,
                    )
                    done.replaced.append(_hook(f))
                except NetlinkError as err:
                    if err.code in (errno.ENODEV, errno.ENOENT):
                        continue  # the interface went meanwhile
                    done.errors.append(
                        f"interface {link.name}: cannot swap the {f.hook} program {f.name} "
                        f"for the new build: {err}; it runs on the old maps until the agent "
                        "attaches again"
                    )


def swap_xdp(prog_fds: Mapping[str, int], done: Swapped) -> None:
    fd = prog_fds.get(xdp.PROGRAM_NAME)
    with IPRoute() as ipr:
        links = [(link, xdp.programs(ipr, link.index)) for link in tc.all_links()]
    for link, programs in links:
        for prog in programs:
            if not prog.ours:
                continue
            hook = f"xdp {prog.mode} {link.name}"
            try:
                if fd is None:
                    xdp.detach([link.name])
                    done.detached.append(hook)
                else:
                    xdp.attach(link, fd, prog.mode)
                    done.replaced.append(hook)
            except tc.AttachError as err:
                done.errors.append(f"{err} (while swapping in the new build's XDP program)")


def swap_sockets(prog_fds: Mapping[str, int], pin_dir: Path, done: Swapped) -> None:
    if not pin_dir.is_dir():
        return
    for pin in sorted(pin_dir.glob(f"{cgroup.LINK_PREFIX}*")):
        hook = pin.name.removeprefix(cgroup.LINK_PREFIX)
        fd = libbpf.obj_get(str(pin))
        try:
            prog = prog_fds.get(f"lbctl_sock_{hook}")
            if prog is None:
                with contextlib.suppress(libbpf.BpfError):
                    libbpf.link_detach(fd)
                pin.unlink(missing_ok=True)
                done.detached.append(f"socket {hook}")
                continue
            libbpf.link_update(fd, prog)
            done.replaced.append(f"socket {hook}")
        except OSError as err:
            done.errors.append(
                f"socket hook {hook} ({pin}): cannot swap in the new build's program: {err}"
            )
        finally:
            os.close(fd)


def swap(prog_fds: Mapping[str, int], pin_dir: Path) -> Swapped:
    """Replace every attached lbctl program with the same-named one of `prog_fds`."""
    done = Swapped()
    swap_tc(prog_fds, done)
    swap_xdp(prog_fds, done)
    swap_sockets(prog_fds, pin_dir, done)
    return done


def users(map_ids: set[int], pin_dir: Path) -> list[str]:
    """Hooks of this namespace (tc, XDP, pinned socket links) whose program uses one of the maps."""
    found = []
    with IPRoute() as ipr:
        for link in tc.all_links():
            for f in tc_filters(ipr, link):
                if f.prog_id is not None and prog_map_ids(f.prog_id) & map_ids:
                    found.append(f"{_hook(f)} ({f.name or 'unnamed'}, id {f.prog_id})")
            for prog in xdp.programs(ipr, link.index):
                if prog_map_ids(prog.prog_id) & map_ids:
                    found.append(f"xdp {prog.mode} {link.name} ({prog.name}, id {prog.prog_id})")
    with contextlib.suppress(OSError):
        for attachment in cgroup.attached(pin_dir):
            if prog_map_ids(attachment.prog_id) & map_ids:
                found.append(f"socket {attachment.hook} ({attachment.program})")
    return found
