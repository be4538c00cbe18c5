"""Attaching and detaching the tc program (clsact ingress, direct action).

lbctl's filter is recognised by its priority and program name, so cleanup
removes only what lbctl attached and leaves other tc users alone.  The
process must itself be in the network namespace of the interfaces.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from lbctl.datapath.compiler import PROGRAM as PROGRAM_NAME

INGRESS_PARENT = "ffff:fff2"
INGRESS_PARENT_ID = 0xFFFFFFF2
FILTER_PRIO = 0x1CB  # lbctl's place in the ingress filter chain

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


def attach(link: Link, prog_fd: int) -> None:
    """Attach (or atomically replace) lbctl's program on the link's ingress."""
    ifname, idx = link.name, link.index
    with IPRoute() as ipr:
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise AttachError(f"interface {ifname}: cannot add clsact qdisc: {err}") from err
        try:
            ipr.tc(
                "replace-filter",
                "bpf",
                idx,
                ":1",
                fd=prog_fd,
                name=PROGRAM_NAME,
                parent=INGRESS_PARENT,
                classid=1,
                direct_action=True,
                prio=FILTER_PRIO,
            )
        except NetlinkError as err:
            raise AttachError(f"interface {ifname}: cannot attach tc program: {err}") from err


def attached_interfaces() -> list[str]:
    """Interfaces of this namespace that carry lbctl's filter."""
    with IPRoute() as ipr:
        return [
            str(link.get_attr("IFLA_IFNAME"))
            for link in ipr.get_links()
            if _has_filter(ipr, int(link["index"]))
        ]


def _has_filter(ipr: IPRoute, idx: int) -> bool:
    try:
        filters = ipr.get_filters(index=idx, parent=INGRESS_PARENT_ID)
    except NetlinkError:
        return False
    for f in filters:
        options = f.get_attr("TCA_OPTIONS")
        named = options is not None and options.get_attr("TCA_BPF_NAME") == PROGRAM_NAME
        if named and (f["info"] >> 16) == FILTER_PRIO:
            return True
    return False


def detach(ifnames: Iterable[str]) -> list[str]:
    """Remove lbctl's filter from the interfaces that have it; return them."""
    done = []
    with IPRoute() as ipr:
        for ifname in ifnames:
            found = ipr.link_lookup(ifname=ifname)
            if not found or not _has_filter(ipr, int(found[0])):
                continue
            try:
                ipr.tc(
                    "del-filter",
                    "bpf",
                    int(found[0]),
                    ":1",
                    parent=INGRESS_PARENT,
                    prio=FILTER_PRIO,
                )
            except NetlinkError as err:
                if err.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise
            done.append(ifname)
    return done
