"""The node's settings in the eBPF datapath: lb4_config and the cluster CIDRs.

`NodeConfig` (lbctl/datapath/__init__.py) as the programs read it: written at
the first sync and whenever the node's address changes; the programs read it
on every new flow.  The pod network (the cluster CIDRs) and
the node's own addresses also say where each backend is (`Placement`).
"""

from __future__ import annotations

import ipaddress

from lbctl.datapath import NodeConfig
from lbctl.datapath.ebpf import layout
from lbctl.datapath.ebpf.maps import Maps

_CFG_F_MASQ_ALL = layout.const("LB_CFG_F_MASQ_ALL")
_CFG_F_DETECTOR = layout.const("LB_CFG_F_DETECTOR")
_CFG_F_NODE_CIDRS = layout.const("LB_CFG_F_NODE_CIDRS")
_BACKEND_F_MASQ_PODS = layout.const("LB_BACKEND_F_MASQ_PODS")
_BACKEND_F_HOST = layout.const("LB_BACKEND_F_HOST")
PLACEMENT_FLAGS = _BACKEND_F_MASQ_PODS | _BACKEND_F_HOST


class Placement:
    """Where a backend is, seen from this node, as lb4_backend.flags say it:

    - LB_BACKEND_F_HOST: an address of this node (a hostNetwork endpoint here);
    - LB_BACKEND_F_MASQ_PODS: outside the pod network (the cluster CIDRs, or
      this node's pod CIDRs when no cluster CIDR is known); nothing is outside
      when neither is known, since no client could be told to be a pod.

    Asked for every backend at every sync: integer tests only (an
    IPv4Address's own hash, or `in` a network, costs several times more)."""

    def __init__(
        self,
        pod_cidrs: tuple[ipaddress.IPv4Network, ...] = (),
        host: frozenset[ipaddress.IPv4Address] = frozenset(),
    ) -> None:
        self.pod_cidrs = pod_cidrs
        self.host = host
        self._host = {int(a) for a in host}
        self._nets = [(int(c.network_address), int(c.netmask)) for c in pod_cidrs]

    @classmethod
    def of(cls, conf: NodeConfig) -> Placement:
        return cls(conf.cluster_cidrs, conf.host_addresses)

    def same(self, other: Placement) -> bool:
        return (self.pod_cidrs, self.host) == (other.pod_cidrs, other.host)

    def flags(self, address: object) -> int:
        if not isinstance(address, ipaddress.IPv4Address):
            return 0
        ip = int(address)
        if ip in self._host:
            return _BACKEND_F_HOST
        for net, mask in self._nets:
            if ip & mask == net:
                return 0
        return _BACKEND_F_MASQ_PODS if self._nets else 0


def _cidr_key(network: ipaddress.IPv4Network) -> object:
    key = layout.new("struct lb4_cidr_key")
    key.prefixlen = network.prefixlen
    key.addr = layout.ip4(network.network_address)
    return key


def write(maps: Maps, conf: NodeConfig) -> None:
    """CIDRs first, then the settings that turn the detector on or off."""
    have = {
        ipaddress.IPv4Network((layout.ip4_str(k.addr), k.prefixlen))
        for k, _ in maps.lb4_cluster_cidrs.items()
    }
    wanted = set(conf.cluster_cidrs)
    for network in sorted(wanted - have):
        maps.lb4_cluster_cidrs.update(_cidr_key(network), layout.ffi.new("__u32 *", 1))
    value = layout.new("struct lb4_config")
    value.snat_addr = layout.ip4(conf.snat_address) if conf.snat_address else 0
    value.nat_port_min, value.nat_port_max = conf.nat_ports
    value.flags = (
        (_CFG_F_MASQ_ALL if conf.masquerade_all else 0)
        | (_CFG_F_DETECTOR if wanted else 0)
        | (_CFG_F_NODE_CIDRS if wanted and conf.node_cidrs else 0)
    )
    value.netns_cookie = conf.netns_cookie
    maps.lb4_config.update(layout.ffi.new("__u32 *", 0), value)
    for network in have - wanted:
        maps.lb4_cluster_cidrs.delete(_cidr_key(network))


def read(maps: Maps) -> dict[str, object]:
    """lb4_config and the CIDRs as plain data, for `lbctl maps dump`."""
    value = maps.lb4_config.lookup(layout.ffi.new("__u32 *", 0))
    cidrs = sorted(
        str(ipaddress.IPv4Network((layout.ip4_str(k.addr), k.prefixlen)))
        for k, _ in maps.lb4_cluster_cidrs.items()
    )
    if value is None:
        return {"cluster_cidrs": cidrs}
    return {
        "snat_address": layout.ip4_str(value.snat_addr) if value.snat_addr else None,
        "nat_ports": [value.nat_port_min, value.nat_port_max],
        "masquerade_all": bool(value.flags & _CFG_F_MASQ_ALL),
        "cluster_cidrs": cidrs,
        "cluster_cidrs_from": cidrs_from(int(value.flags)) if cidrs else None,
        "netns_cookie": int(value.netns_cookie),
    }


def cidrs_from(flags: int) -> str:
    """Where lb4_cluster_cidrs came from, as lb4_config.flags say."""
    return "the Node's spec.podCIDRs" if flags & _CFG_F_NODE_CIDRS else "clusterCIDR"
