"""Removing the eBPF datapath from a node: what `lbctl cleanup` does for it.

The programs outlive the agent (they keep the node's Services answering), so
taking lbctl off a node detaches them and unpins their maps: the socket hooks
on the cgroup, the tc programs (ingress, egress) and the XDP program on every
interface, the maps, the layout record, and what an interrupted upgrade left
(lbctl/datapath/ebpf/upgrade/run.py).  `refuse_while_in_use` stops it while
an agent still holds the maps, unless the operator forces it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


@dataclasses.dataclass
class Removed:
    """What `cleanup` detached and unpinned, by name."""

    tc: list[str]  # interfaces
    xdp: list[str]  # interfaces
    hooks: list[str]  # socket hooks
    pins: list[str]  # maps, staging directories, the layout record


def refuse_while_in_use(pin_dir: Path) -> None:
    """A running agent would go on programming maps no program reads any more,
    and lose every connection at its next start: stop it first."""
    from lbctl.datapath.ebpf import libbpf

    pin = pin_dir / "lb4_services"
    if not pin.exists():
        return
    fd = libbpf.obj_get(str(pin))
    try:
        holders = libbpf.map_holders(libbpf.map_info(fd).id)
    finally:
        os.close(fd)
    if holders:
        who = ", ".join(f"pid {pid} ({command[:60].strip()})" for pid, command in holders)
        raise RuntimeError(
            f"the maps under {pin_dir} are in use by {who}: stop the agent first (on a "
            "cluster, delete or re-target its DaemonSet; see README, rolling back), or pass "
            "--force to detach and remove them anyway"
        )


def cleanup(pin_dir: Path) -> Removed:
    """Detach every program lbctl attached in this namespace and unpin `pin_dir`'s maps."""
    from lbctl.datapath.ebpf import cgroup, tc, xdp
    from lbctl.datapath.ebpf.maps import MAP_TYPES
    from lbctl.datapath.ebpf.upgrade import pinsets, record

    hooks = cgroup.detach(pin_dir)
    links = tc.all_links()
    detached = tc.detach(link.name for link in links)
    fast = xdp.detach(link.name for link in links)
    removed = []
    for name in MAP_TYPES:
        pin = pin_dir / name
        if pin.exists():
            pin.unlink()
            removed.append(name)
    # the layout record and what an interrupted upgrade left (lbctl/datapath/ebpf/upgrade/run.py)
    for staging in pinsets.staging_dirs(pin_dir):
        pinsets.discard(staging)
        removed.append(staging.name)
    if (pin_dir / record.NAME).exists():
        (pin_dir / record.NAME).unlink()
        removed.append(record.NAME)
    if pin_dir.is_dir() and not any(pin_dir.iterdir()):
        pin_dir.rmdir()
    return Removed(detached, fast, hooks, removed)
