"""The map lookups a packet's decision takes, on the pinned maps, decoded.

`lbctl trace` (lbctl/datapath/ebpf/trace/decide.py) follows the programs' decision with these:
each method is one lookup the programs make (bpf/flow.h, lb.h, sched.h,
nat.h), keyed as they key it, its value decoded into plain Python.  Nothing
here writes to a map.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

from lbctl.datapath.ebpf import layout
from lbctl.datapath.ebpf.inspect import backend_placement, backend_state
from lbctl.datapath.ebpf.maps import Maps
from lbctl.model import Protocol

_FORWARD_DIR = layout.const("CT_DIR_FORWARD")
_REVERSE_DIR = layout.const("CT_DIR_REVERSE")
_MASK64 = 0xFFFFFFFFFFFFFFFF


@dataclasses.dataclass(frozen=True)
class Packet:
    src: ipaddress.IPv4Address
    sport: int | None  # None: not given, a fresh port is assumed
    dst: ipaddress.IPv4Address
    dport: int
    protocol: Protocol

    def __str__(self) -> str:
        sport = f":{self.sport}" if self.sport is not None else ""
        return f"{self.protocol.name} {self.src}{sport} -> {self.dst}:{self.dport}"


@dataclasses.dataclass(frozen=True)
class Svc:
    """An lb4_services entry with its lb_frontend_meta."""

    scope: int
    frontend_id: int
    count: int
    flags: int
    sched: int
    table: int
    table_len: int
    affinity_s: int
    service: str
    port_name: str
    kind: str


@dataclasses.dataclass(frozen=True)
class Be:
    ident: int
    address: ipaddress.IPv4Address
    port: int
    flags: int
    pod_network_known: bool = True  # lb4_cluster_cidrs has entries

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.ident,
            "address": str(self.address),
            "port": self.port,
            "state": backend_state(self.flags),
            "placement": backend_placement(self.flags, self.pod_network_known),
        }

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Ct:
    created_ns: int
    last_seen_ns: int
    nat_addr: ipaddress.IPv4Address
    nat_port: int
    flags: int
    backend_id: int
    frontend_id: int
    snat_addr: ipaddress.IPv4Address | None
    snat_port: int


@dataclasses.dataclass(frozen=True)
class Config:
    snat_addr: ipaddress.IPv4Address | None
    flags: int


class MapView:
    """The lookups the programs make, on the maps, decoded.  Read only."""

    def __init__(self, maps: Maps) -> None:
        self.maps = maps
        self._pod_network_known: bool | None = None

    def config(self) -> Config | None:
        v = self.maps.lb4_config.lookup(layout.ffi.new("__u32 *", 0))
        if v is None:
            return None
        return Config(_addr(v.snat_addr) if v.snat_addr else None, int(v.flags))

    def in_cluster_cidrs(self, addr: ipaddress.IPv4Address) -> bool:
        key = layout.new("struct lb4_cidr_key", prefixlen=32, addr=layout.ip4(addr))
        return self.maps.lb4_cluster_cidrs.lookup(key) is not None

    def service(self, p: Packet, scope: int) -> Svc | None:
        key = layout.new(
            "struct lb4_key",
            addr=layout.ip4(p.dst),
            port=layout.port(p.dport),
            proto=p.protocol.number,
            scope=scope,
        )
        v = self.maps.lb4_services.lookup(key)
        if v is None:
            return None
        meta = self.maps.lb_frontend_meta.lookup(layout.ffi.new("__u32 *", v.frontend_id))
        name = f"{layout.c_string(meta.namespace)}/{layout.c_string(meta.name)}" if meta else "?"
        return Svc(
            scope,
            int(v.frontend_id),
            int(v.count),
            int(v.flags),
            int(v.sched),
            int(v.table),
            int(v.table_len),
            int(v.affinity_s),
            name,
            layout.c_string(meta.port_name) if meta else "",
            layout.c_string(meta.kind) if meta else "",
        )

    def source_allowed(self, p: Packet) -> bool:
        key = layout.new(
            "struct lb4_range_key",
            prefixlen=64 + 32,
            vip=layout.ip4(p.dst),
            port=layout.port(p.dport),
            proto=p.protocol.number,
            saddr=layout.ip4(p.src),
        )
        return self.maps.lb4_source_ranges.lookup(key) is not None

    def source_ranges(self, p: Packet) -> list[str]:
        """Every range of the frontend (for the explanation; the program does one lookup)."""
        out = []
        for k, _ in self.maps.lb4_source_ranges.items():
            if (k.vip, k.port, k.proto) == (
                layout.ip4(p.dst),
                layout.port(p.dport),
                p.protocol.number,
            ):
                out.append(f"{layout.ip4_str(k.saddr)}/{k.prefixlen - 64}")
        return sorted(out, key=ipaddress.IPv4Network)

    def conntrack(self, p: Packet) -> Ct | None:
        assert p.sport is not None
        key = layout.new(
            "struct ct4_key",
            saddr=layout.ip4(p.src),
            daddr=layout.ip4(p.dst),
            sport=layout.port(p.sport),
            dport=layout.port(p.dport),
            proto=p.protocol.number,
            dir=_FORWARD_DIR,
        )
        e = self.maps.ct4.lookup(key)
        if e is None:
            return None
        return Ct(
            int(e.created_ns),
            int(e.last_seen_ns),
            _addr(e.nat_addr),
            layout.port_num(e.nat_port),
            int(e.flags),
            int(e.backend_id),
            int(e.frontend_id),
            _addr(e.snat_addr) if e.snat_addr else None,
            layout.port_num(e.snat_port),
        )

    def reply_holder(self, p: Packet) -> tuple[ipaddress.IPv4Address, int] | None:
        """The frontend (VIP, port) of a balanced flow whose reverse entry holds the
        replies of p, a packet straight to a backend: the key p's replies have."""
        assert p.sport is not None
        key = layout.new(
            "struct ct4_key",
            saddr=layout.ip4(p.dst),
            daddr=layout.ip4(p.src),
            sport=layout.port(p.dport),
            dport=layout.port(p.sport),
            proto=p.protocol.number,
            dir=_REVERSE_DIR,
        )
        e = self.maps.ct4.lookup(key)
        if e is None:
            return None
        return _addr(e.nat_addr), layout.port_num(e.nat_port)

    def nat_client(self, ct: Ct, proto: int) -> tuple[str, int, str, int] | None:
        """The nat4 entry of the flow's binding: (client, client port, VIP, port)."""
        assert ct.snat_addr is not None
        key = layout.new(
            "struct ct4_key",
            saddr=layout.ip4(ct.nat_addr),
            daddr=layout.ip4(ct.snat_addr),
            sport=layout.port(ct.nat_port),
            dport=layout.port(ct.snat_port),
            proto=proto,
            dir=_REVERSE_DIR,
        )
        e = self.maps.nat4.lookup(key)
        if e is None:
            return None
        return (
            layout.ip4_str(e.client_addr),
            layout.port_num(e.client_port),
            layout.ip4_str(e.vip),
            layout.port_num(e.vport),
        )

    def member(self, frontend_id: int, backend_id: int) -> bool:
        key = layout.new("struct lb_member_key", frontend_id=frontend_id, backend_id=backend_id)
        return self.maps.lb_members.lookup(key) is not None

    def backend(self, ident: int) -> Be | None:
        v = self.maps.lb4_backends.lookup(layout.ffi.new("__u32 *", ident))
        if v is None:
            return None
        if self._pod_network_known is None:
            self._pod_network_known = len(self.maps.lb4_cluster_cidrs) > 0
        return Be(
            ident, _addr(v.addr), layout.port_num(v.port), int(v.flags), self._pod_network_known
        )

    def slot(self, frontend_id: int, n: int) -> int:
        v = self.maps.lb_slots.lookup(
            layout.new("struct lb_slot_key", frontend_id=frontend_id, slot=n)
        )
        return int(v.backend_id) if v is not None else 0

    def table_entry(self, index: int) -> int:
        if index >= self.maps.lb_tables.max_entries:
            return 0
        v = self.maps.lb_tables.lookup(layout.ffi.new("__u32 *", index))
        return int(v[0]) if v is not None else 0

    def turn(self, frontend_id: int) -> int:
        """lb_rr: the frontend's next turn (0 before its first rr/wrr flow)."""
        v = self.maps.lb_rr.lookup(layout.ffi.new("__u32 *", frontend_id))
        return int(v[0]) if v is not None else 0

    def open_flows(self, backend_id: int) -> int:
        """lb_open_flows() of bpf/sched.h (signed, as the program compares it)."""
        key = layout.ffi.new("__u32 *", backend_id)
        c = self.maps.lb_conns.lookup(key)
        if c is None:
            return 0
        n = (int(c.opened) - int(c.closed)) & _MASK64
        expired = self.maps.lb_conns_expired.lookup(key)
        if expired is not None:
            n = (n - int(expired[0])) & _MASK64
        return n - (1 << 64) if n >> 63 else n

    def affinity(self, frontend_id: int, client: ipaddress.IPv4Address) -> tuple[int, int] | None:
        """The client's lb4_affinity entry: (last_seen_ns, backend id)."""
        key = layout.new(
            "struct lb4_affinity_key", frontend_id=frontend_id, client=layout.ip4(client)
        )
        v = self.maps.lb4_affinity.lookup(key)
        return (int(v.last_seen_ns), int(v.backend_id)) if v is not None else None


def _addr(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(layout.ip4_str(value))
