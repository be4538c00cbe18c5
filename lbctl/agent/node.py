"""The node's own addresses: where NodePorts answer and what masquerading uses.

A source like the API server, read from the kernel of the namespace lbctl
runs in.  The agent reads it again on every interface scan, so an address
added to the node reaches the NodePort frontends without a restart.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Iterable, Sequence

LOCALHOST = ipaddress.IPv4Address("127.0.0.1")


@dataclasses.dataclass(frozen=True)
class LocalAddress:
    interface: str
    address: ipaddress.IPv4Address


SERVICE_LINKS = ("lbctl-ipvs0", "kube-ipvs0")  # dummy links that hold Service addresses


def local_ipv4() -> list[LocalAddress]:
    """Every IPv4 address of this namespace except loopback ones, by interface index.

    The Services' own addresses on the IPVS datapath's dummy link are not the node's."""
    from pyroute2 import IPRoute  # here: reading the configuration needs no netlink

    with IPRoute() as ipr:
        names = {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
        raw = ipr.get_addr(family=socket.AF_INET)
    out = []
    for msg in sorted(raw, key=lambda m: int(m["index"])):
        address = ipaddress.IPv4Address(str(msg.get_attr("IFA_ADDRESS")))
        name = names.get(int(msg["index"]), "?")
        if not address.is_loopback and name not in SERVICE_LINKS:
            out.append(LocalAddress(name, address))
    return out


@dataclasses.dataclass(frozen=True)
class AddressPolicy:
    """kube-proxy's nodePortAddresses and localhostNodePorts, and the node IP."""

    node_port_cidrs: tuple[ipaddress.IPv4Network, ...] | None = None  # None: every address
    localhost_node_ports: bool = True
    interfaces: tuple[str, ...] | None = None  # None: every interface
    node_ip: ipaddress.IPv4Address | None = None  # None: chosen, see snat_address

    def node_port_addresses(
        self, local: Iterable[LocalAddress]
    ) -> tuple[ipaddress.IPv4Address, ...]:
        """The addresses NodePorts answer on, sorted.

        127.0.0.1 is one of them when localhost NodePorts are on and the CIDRs
        (if given) include it; only the node's own processes can reach it, through
        the socket hooks."""
        found = {
            a.address
            for a in local
            if (self.interfaces is None or a.interface in self.interfaces)
            and self._wanted(a.address)
        }
        if self.localhost_node_ports and self._wanted(LOCALHOST):
            found.add(LOCALHOST)
        return tuple(sorted(found))

    def _wanted(self, address: ipaddress.IPv4Address) -> bool:
        return self.node_port_cidrs is None or any(address in c for c in self.node_port_cidrs)

    def snat_address(
        self, local: Sequence[LocalAddress], api_addresses: Iterable[object] = ()
    ) -> ipaddress.IPv4Address | None:
        """The address masqueraded flows leave with: the configured node IP, else
        the Node object's first address that is this node's own, else the first
        address of the external interfaces."""
        if self.node_ip is not None:
            return self.node_ip
        own = {a.address for a in local}
        for address in api_addresses:
            if isinstance(address, ipaddress.IPv4Address) and address in own:
                return address
        for a in local:
            if self.interfaces is None or a.interface in self.interfaces:
                return a.address
        return None
