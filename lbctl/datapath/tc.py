"""Attaching and detaching the tc program (clsact ingress, direct action).

lbctl's filter is recognised by its priority and program name, so cleanup
removes only what lbctl attached and leaves other tc users alone.  The
process must itself be in the network namespace of the interfaces.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

INGRESS_PARENT = "ffff:fff2"
INGRESS_PARENT_ID = 0xFFFFFFF2
FILTER_PRIO = 0x1CB  # lbctl's place in the ingress filter chain
PROGRAM_NAME = "lbctl_tc_ingress"


class AttachError(Exception):
    """Attaching failed; the message names the interface and the cause."""


def list_interfaces() -> list[str]:
    """Every non-loopback interface of this network namespace."""
    with IPRoute() as ipr:
        links = ipr.get_links()
    names = []
    for link in links:
        if link.get("flags", 0) & 0x8:  # IFF_LOOPBACK
            continue
        names.append(str(link.get_attr("IFLA_IFNAME")))
    return sorted(names)


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise AttachError(f"interface {ifname}: not found in this network namespace")
    return int(found[0])


def attach(ifname: str, prog_fd: int) -> None:
    """Attach (or atomically replace) lbctl's program on ifname's ingress."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
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
