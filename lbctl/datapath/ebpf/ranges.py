"""loadBalancerSourceRanges in the lb4_source_ranges LPM trie.

Entries are keyed by the frontend's (address, port, protocol) and a source
prefix; a frontend flagged LB_SVC_F_SOURCE_RANGES lets in only sources that
match one.  Ranges are written before the frontend that needs them and
removed after it, so the flag never meets a missing range.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping

from lbctl.datapath.ebpf import entries, layout
from lbctl.datapath.ebpf.maps import Maps
from lbctl.model import IPNetwork, Protocol
from lbctl.plan.planner import Frontend, FrontendKey

log = logging.getLogger(__name__)

Vip = tuple[ipaddress.IPv4Address, int, Protocol]
_PREFIX_BASE = 64  # the key's vip, port, proto and pad always match whole


def vip_of(key: FrontendKey) -> Vip:
    return (key.address, key.port, key.protocol)  # type: ignore[return-value]


def ranges_of(frontends: Iterable[Frontend]) -> dict[Vip, frozenset[ipaddress.IPv4Network]]:
    """The ranges each frontend address needs (IPv6 ranges cannot match IPv4)."""
    out: dict[Vip, frozenset[ipaddress.IPv4Network]] = {}
    for fe in frontends:
        if fe.source_ranges and isinstance(fe.key.address, ipaddress.IPv4Address):
            v4 = frozenset(r for r in fe.source_ranges if isinstance(r, ipaddress.IPv4Network))
            out[vip_of(fe.key)] = v4
    return out


def _key(vip: Vip, network: ipaddress.IPv4Network) -> object:
    key = layout.new("struct lb4_range_key")
    key.prefixlen = _PREFIX_BASE + network.prefixlen
    key.vip = layout.ip4(vip[0])
    key.port = layout.port(vip[1])
    key.proto = vip[2].number
    key.saddr = layout.ip4(network.network_address)
    return key


class SourceRangeTable:
    def __init__(self, maps: Maps) -> None:
        self.map = maps.lb4_source_ranges
        self.held: dict[Vip, frozenset[ipaddress.IPv4Network]] = {}

    def adopt(self) -> None:
        for key, _ in self.map.items():
            vip = (entries.ipv4(key.vip), layout.port_num(key.port), Protocol(key.proto))
            network = ipaddress.IPv4Network(
                (layout.ip4_str(key.saddr), key.prefixlen - _PREFIX_BASE)
            )
            self.held[vip] = self.held.get(vip, frozenset()) | {network}

    def set(self, vip: Vip, wanted: frozenset[ipaddress.IPv4Network]) -> None:
        """Add what is missing, then remove what is no longer wanted.

        A failed add removes what this call added and raises: the frontend
        that needs the ranges must then not be programmed.
        """
        have = self.held.get(vip, frozenset())
        added = []
        try:
            for network in sorted(wanted - have):
                self.map.update(_key(vip, network), layout.ffi.new("__u32 *", 1))
                added.append(network)
        except OSError:
            for network in added:
                self.map.delete(_key(vip, network))
            raise
        for network in have - wanted:
            self.map.delete(_key(vip, network))
        if wanted:
            self.held[vip] = wanted
        else:
            self.held.pop(vip, None)

    def remove_except(self, keep: Mapping[Vip, object]) -> None:
        """Remove the ranges of every frontend address not in `keep`."""
        for vip in [v for v in self.held if v not in keep]:
            self.set(vip, frozenset())


def describe(networks: Iterable[IPNetwork]) -> list[str]:
    return sorted(str(n) for n in networks)
