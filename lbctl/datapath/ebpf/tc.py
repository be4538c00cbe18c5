"""Attaching and detaching the tc programs (clsact, direct action).

Every interface lbctl serves carries two filters: lbctl_tc_ingress on its
ingress hook (balancing, NAT) and lbctl_tc_egress on its egress hook (the
replies of the node's own stack).  lbctl's filters are recognised by their
hook, priority and program name, so cleanup removes only what lbctl attached
and leaves other tc users alone.  The process must itself be in the network
namespace of the interfaces.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from lbctl.datapath.ebpf.compiler import EGRESS_PROGRAM
from lbctl.datapath.ebpf.compiler import PROGRAM as PROGRAM_NAME

INGRESS_PARENT = "ffff:fff2"
INGRESS_PARENT_ID = 0xFFFFFFF2
EGRESS_PARENT = "ffff:fff3"
EGRESS_PARENT_ID = 0xFFFFFFF3
FILTER_PRIO = 0x1CB  # lbctl's place in the ingress and egress filter chains


@dataclasses.dataclass(frozen=True)
class Hook:
    name: str  # "ingress", "egress"
    parent: str
    parent_id: int
    program: str


INGRESS = Hook("ingress", INGRESS_PARENT, INGRESS_PARENT_ID, PROGRAM_NAME)
EGRESS = Hook("egress", EGRESS_PARENT, EGRESS_PARENT_ID, EGRESS_PROGRAM)
# Egress first: alone it translates nothing that ingress did not start.
HOOKS = (EGRESS, INGRESS)

ARPHRD_ETHER = 1
IFF_LOOPBACK = 0x8


class AttachError(Exception):
    """Attaching failed; the message names the interface and the cause."""


@dataclasses.dataclass(frozen=True)
class Link:
    name: str
    index: int
    ethernet: bool


def all_links() -> list[Link]:
    with IPRoute() as ipr:
        raw = ipr.get_links()
    return [
        Link(str(m.get_attr("IFLA_IFNAME")), int(m["index"]), m["ifi_type"] == ARPHRD_ETHER)
        for m in raw
        if not m.get("flags", 0) & IFF_LOOPBACK
    ]


def list_interfaces() -> list[Link]:
    """Every non-loopback Ethernet interface of this network namespace.

    The program parses Ethernet frames; L3 devices (IPIP, WireGuard) are
    left out rather than misread.
    """
    return sorted((link for link in all_links() if link.ethernet), key=lambda x: x.name)


def find_interfaces(names: Iterable[str]) -> tuple[list[Link], list[str]]:
    """The named interfaces, and an error for each that cannot carry the program."""
    by_name = {link.name: link for link in all_links()}
    found, errors = [], []
    for name in names:
        link = by_name.get(name)
        if link is None:
            errors.append(f"interface {name}: not found in this network namespace")
        elif not link.ethernet:
            errors.append(
                f"interface {name}: not an Ethernet device; lbctl's tc program parses "
                "Ethernet frames, leave it out of --interfaces"
            )
        else:
            found.append(link)
    return found, errors


def attach(link: Link, prog_fds: dict[str, int]) -> None:
    """Attach (or atomically replace) lbctl's programs on the link's hooks:
    `prog_fds` maps a hook's program name to its descriptor."""
    ifname, idx = link.name, link.index
    with IPRoute() as ipr:
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise AttachError(f"interface {ifname}: cannot add clsact qdisc: {err}") from err
        for hook in HOOKS:
            try:
                ipr.tc(
                    "replace-filter",
                    "bpf",
                    idx,
                    ":1",
                    fd=prog_fds[hook.program],
                    name=hook.program,
                    parent=hook.parent,
                    classid=1,
                    direct_action=True,
                    prio=FILTER_PRIO,
                )
            except NetlinkError as err:
                raise AttachError(
                    f"interface {ifname}: cannot attach tc {hook.name} program: {err}"
                ) from err


def attached_interfaces(hook: Hook = INGRESS) -> list[str]:
    """Interfaces of this namespace that carry lbctl's filter on `hook`."""
    with IPRoute() as ipr:
        return [
            str(link.get_attr("IFLA_IFNAME"))
            for link in ipr.get_links()
            if _has_filter(ipr, int(link["index"]), hook)
        ]


def _has_filter(ipr: IPRoute, idx: int, hook: Hook) -> bool:
    try:
        filters = ipr.get_filters(index=idx, parent=hook.parent_id)
    except NetlinkError:
        return False
    for f in filters:
        options = f.get_attr("TCA_OPTIONS")
        named = options is not None and options.get_attr("TCA_BPF_NAME") == hook.program
        if named and (f["info"] >> 16) == FILTER_PRIO:
            return True
    return False


def detach(ifnames: Iterable[str]) -> list[str]:
    """Remove lbctl's filters from the interfaces that have any; return them."""
    done = []
    with IPRoute() as ipr:
        for ifname in ifnames:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                continue
            removed = False
            for hook in (INGRESS, EGRESS):  # balancing stops first
                if not _has_filter(ipr, int(found[0]), hook):
                    continue
                try:
                    ipr.tc(
                        "del-filter",
                        "bpf",
                        int(found[0]),
                        ":1",
                        parent=hook.parent,
                        prio=FILTER_PRIO,
                    )
                except NetlinkError as err:
                    if err.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                        raise
                removed = True
            if removed:
                done.append(ifname)
    return done
