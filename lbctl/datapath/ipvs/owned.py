"""Which IPVS virtual services belong to whom: the one rule of lbctl's and kube-proxy's.

lbctl's IPVS datapath and kube-proxy's IPVS mode work alike: each binds the
Services' own addresses (ClusterIPs, external IPs, load-balancer IPs) to a
dummy link of its own (lbctl-ipvs0, kube-ipvs0) and answers NodePorts on the
node's other addresses.  So a virtual service is the link owner's when it is
on one of the link's addresses, or, while that link exists, on one of the
node's other addresses with a port in the NodePort range.  Firewall-mark
services are never either's.  `lbctl cleanup` (lbctl/datapath/ipvs/datapath.py)
and `lbctl cleanup --kube-proxy` (lbctl/cli/cleanup.py) both decide by `why`.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

IPVS_PROC = Path("/proc/net/ip_vs")  # per network namespace, while ip_vs is loaded
NODE_PORT_RANGE = (30000, 32767)  # kube-apiserver's default --service-node-port-range

ON_LINK, NODE_PORT = "on the link's addresses", "a NodePort on the node's addresses"


@dataclasses.dataclass(frozen=True)
class VirtualService:
    """An IPVS virtual service, as `ipvsadm -Ln` would show it."""

    protocol: int  # IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP; 0 for a firewall-mark service
    address: str  # "" for a firewall-mark service
    port: int
    fwmark: int = 0

    def __str__(self) -> str:
        if self.fwmark:
            return f"fwmark {self.fwmark}"
        name = {socket.IPPROTO_TCP: "TCP", socket.IPPROTO_UDP: "UDP"}.get(
            self.protocol, f"proto {self.protocol}"
        )
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{name} {host}:{self.port}"


def why(
    service: VirtualService,
    link_addresses: set[str] | None,
    node_addresses: set[str],
    node_port_range: tuple[int, int] = NODE_PORT_RANGE,
) -> str | None:
    """ON_LINK or NODE_PORT when `service` is the link owner's, else None.

    `link_addresses`: the addresses of the owner's dummy link, None when there
    is no such link (then nothing is its owner's); `node_addresses`: the
    node's other addresses."""
    if link_addresses is None or service.fwmark:
        return None
    if service.address in link_addresses:
        return ON_LINK
    low, high = node_port_range
    if service.address in node_addresses and low <= service.port <= high:
        return NODE_PORT
    return None
