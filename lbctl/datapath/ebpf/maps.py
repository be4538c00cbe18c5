"""The BPF maps of the datapath by name, with the lbctl.h types of each.

The one list of maps on the Python side: the agent opens them through the
descriptors bcc created, the CLI through their pins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from lbctl.datapath.ebpf.libbpf import BpfMap

# name -> (key type, value type), as declared in bpf/maps.h
MAP_TYPES: dict[str, tuple[str, str]] = {
    "lb4_services": ("struct lb4_key", "struct lb_service"),
    "lb_slots": ("struct lb_slot_key", "struct lb_slot"),
    "lb_members": ("struct lb_member_key", "struct lb_member"),
    "lb4_backends": ("__u32", "struct lb4_backend"),
    "lb_frontend_meta": ("__u32", "struct lb_frontend_meta"),
    "ct4": ("struct ct4_key", "struct ct4_entry"),
    "lb_stats": ("__u32", "__u64"),
    "nat4": ("struct ct4_key", "struct nat4_entry"),
    "lb4_config": ("__u32", "struct lb4_config"),
    "lb4_cluster_cidrs": ("struct lb4_cidr_key", "__u32"),
    "lb4_source_ranges": ("struct lb4_range_key", "__u32"),
    "sock4_rev": ("struct sock4_rev_key", "struct sock4_rev"),
    "lb_tables": ("__u32", "__u32"),
    "lb_rr": ("__u32", "__u64"),
    "lb4_affinity": ("struct lb4_affinity_key", "struct lb_affinity"),
    "lb_conns": ("__u32", "struct lb_conns"),
    "lb_conns_expired": ("__u32", "__u64"),
    "lb_fe_stats": ("__u32", "struct lb_fe_stats"),
    # the event stream (`lbctl monitor`): its switch, and the ring buffer of
    # struct lb_event records (no keys nor values; lbctl/cli/monitor.py reads it)
    "lb_monitor": ("__u32", "struct lb_monitor"),
    "lb_events": ("__u32", "struct lb_event"),
}

# What sizes each map: the BpfSettings field, and the `lbctl run` flag that
# sets it (named in "map full" and "pinned with another size" errors).
MAP_SIZES: dict[str, tuple[str, str]] = {
    "lb4_services": ("max_services", "--max-services"),
    "lb_frontend_meta": ("max_services", "--max-services"),
    "lb_slots": ("max_slots", "--max-slots"),
    "lb_members": ("max_slots", "--max-slots"),
    "lb4_backends": ("max_backends", "--max-backends"),
    "ct4": ("ct_size", "--conntrack-size"),
    "nat4": ("nat_size", "--nat-size"),
    "lb4_source_ranges": ("max_source_ranges", "--max-source-ranges"),
    "lb4_affinity": ("affinity_size", "--affinity-size"),
    "lb_rr": ("max_services", "--max-services"),
    "lb_conns": ("max_backends", "--max-backends"),
    "lb_conns_expired": ("max_backends", "--max-backends"),
    "lb_fe_stats": ("max_services", "--max-services"),
}
SIZE_FLAGS: dict[str, str] = {name: flag for name, (_, flag) in MAP_SIZES.items()}


@dataclasses.dataclass
class Maps:
    lb4_services: BpfMap
    lb_slots: BpfMap
    lb_members: BpfMap
    lb4_backends: BpfMap
    lb_frontend_meta: BpfMap
    ct4: BpfMap
    lb_stats: BpfMap
    nat4: BpfMap
    lb4_config: BpfMap
    lb4_cluster_cidrs: BpfMap
    lb4_source_ranges: BpfMap
    sock4_rev: BpfMap
    lb_tables: BpfMap
    lb_rr: BpfMap
    lb4_affinity: BpfMap
    lb_conns: BpfMap
    lb_conns_expired: BpfMap
    lb_fe_stats: BpfMap
    lb_monitor: BpfMap
    lb_events: BpfMap

    @classmethod
    def from_fds(cls, fd_of: Callable[[str], int], owns_fds: bool = False) -> Maps:
        """Maps from open descriptors; `owns_fds`: closing the maps closes them."""
        return cls(
            **{
                name: BpfMap(
                    fd_of(name), name, key, value, owns_fd=owns_fds, size_flag=SIZE_FLAGS.get(name)
                )
                for name, (key, value) in MAP_TYPES.items()
            }
        )

    @classmethod
    def open_pinned(cls, pin_dir: Path) -> Maps:
        opened: dict[str, BpfMap] = {}
        try:
            for name, (key, value) in MAP_TYPES.items():
                opened[name] = BpfMap.open_pinned(
                    str(pin_dir / name), key, value, size_flag=SIZE_FLAGS.get(name)
                )
        except OSError:
            for m in opened.values():
                m.close()
            raise
        return cls(**opened)

    def all(self) -> dict[str, BpfMap]:
        return {name: getattr(self, name) for name in MAP_TYPES}

    def close(self) -> None:
        for m in self.all().values():
            m.close()
