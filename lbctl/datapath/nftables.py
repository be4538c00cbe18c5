"""The one nftables table of the IPVS datapath: what IPVS cannot do alone.

IPVS translates the destination of a new connection to a virtual service
and nothing else.  The rest kube-proxy's rules do lives in `table ip
lbctl_ipvs`, made of sets the agent fills and a few fixed rules that read
them, never a chain per Service:

- `no_local` (endpoints only on other nodes where the policy is Local:
  dropped, as kube-proxy does); `no_endpoints` lists the frontends without
  any endpoint, which IPVS itself rejects (a virtual service without real
  servers answers ICMP port unreachable, which a TCP client reads as
  "connection refused"), for `lbctl maps dump`;
- `ranged` / `allowed`: loadBalancerSourceRanges; a packet to a ranged
  frontend whose source matches no allowed range is dropped;
- masquerading: a new connection to a ClusterIP from outside the cluster
  CIDRs (`clusterip` and `cluster_cidrs`), to a NodePort, LoadBalancer IP or
  externalIP of externalTrafficPolicy Cluster (`external`), any connection
  of the node's own processes to a frontend, every one with
  --masquerade-all, and hairpin (a pod reaching itself through a frontend:
  `hairpin` holds each backend address twice) leaves with the node's
  address.  The first chains mark such packets with MASQ_MARK before IPVS
  sees them (input and output, ahead of IPVS's hooks); the postrouting NAT
  chain masquerades marked packets (IPVS keeps the mark and, with
  net.ipv4.vs.conntrack=1, the connection tracking entry NAT needs).

The whole table is written in one `nft -f` transaction (delete, then add
with every element), so a reader never sees it half made; the agent writes
it only when its content changes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import subprocess
from typing import Any

TABLE = "lbctl_ipvs"
MASQ_MARK = 0x00400000  # a bit of the packet mark kube-proxy (0x4000, 0x8000) does not use

Entry = tuple[str, str, int]  # address, protocol ("tcp", "udp"), port


class NftError(Exception):
    """nft refused the table; the message holds what it said."""


@dataclasses.dataclass(frozen=True)
class TableContent:
    """Every element of the table's sets; equal contents need no write."""

    cluster_cidrs: frozenset[str] = frozenset()
    masquerade_all: bool = False
    clusterip: frozenset[Entry] = frozenset()  # masqueraded from outside the cluster CIDRs
    external: frozenset[Entry] = frozenset()  # masqueraded from anyone
    frontends: frozenset[Entry] = frozenset()  # every frontend: the node's own connections
    reject: frozenset[Entry] = frozenset()
    drop: frozenset[Entry] = frozenset()
    ranged: frozenset[Entry] = frozenset()
    allowed: frozenset[tuple[str, str, int, str]] = frozenset()  # ..., source CIDR
    hairpin: frozenset[str] = frozenset()  # backend addresses


_ENTRY = "ipv4_addr . inet_proto . inet_service"


def _elements(items: frozenset[Entry]) -> str:
    return ", ".join(f"{a} . {p} . {port}" for a, p, port in sorted(items))


def _set(name: str, kind: str, elements: str, interval: bool = False) -> str:
    flags = "flags interval; " if interval else ""
    body = f"elements = {{ {elements} }}; " if elements else ""
    return f"  set {name} {{ type {kind}; {flags}{body}}}\n"


def render(content: TableContent, nat: bool = True) -> str:
    """The nft script that replaces the table with this content, in one transaction."""
    c = content
    mark = f"0x{MASQ_MARK:08x}"
    to_entry = "ip daddr . meta l4proto . th dport"
    allowed = ", ".join(
        f"{a} . {p} . {port} . {cidr}" for a, p, port, cidr in sorted(c.allowed, key=str)
    )
    hairpin = ", ".join(f"{a} . {a}" for a in sorted(c.hairpin, key=ipaddress.IPv4Address))
    masq_from_outside = (
        f"    ip saddr != @cluster_cidrs {to_entry} @clusterip meta mark set meta mark | {mark}\n"
        if c.cluster_cidrs
        else ""
    )
    mark_all = f"    {to_entry} @frontends meta mark set meta mark | {mark}\n"
    filters = (
        f"    {to_entry} @ranged {to_entry} . ip saddr != @allowed drop\n"
        f"    {to_entry} @no_local drop\n"
    )
    return (
        f"table ip {TABLE}\n"
        f"delete table ip {TABLE}\n"
        f"table ip {TABLE} {{\n"
        + _set("cluster_cidrs", "ipv4_addr", ", ".join(sorted(c.cluster_cidrs)), interval=True)
        + _set("clusterip", _ENTRY, _elements(c.clusterip))
        + _set("external", _ENTRY, _elements(c.external))
        + _set("frontends", _ENTRY, _elements(c.frontends))
        + _set("no_endpoints", _ENTRY, _elements(c.reject))
        + _set("no_local", _ENTRY, _elements(c.drop))
        + _set("ranged", _ENTRY, _elements(c.ranged))
        + _set("allowed", f"{_ENTRY} . ipv4_addr", allowed, interval=True)
        + _set("hairpin", "ipv4_addr . ipv4_addr", hairpin)
        # before IPVS (its LOCAL_IN hooks are at priority 98 and 99)
        + "  chain input {\n    type filter hook input priority filter; policy accept;\n"
        + filters
        + masq_from_outside
        + (
            mark_all
            if c.masquerade_all
            else f"    {to_entry} @external meta mark set meta mark | {mark}\n"
        )
        + "  }\n"
        # the node's own connections, before IPVS's LOCAL_OUT hook (priority -99)
        + "  chain output {\n    type filter hook output priority mangle; policy accept;\n"
        + filters
        + mark_all
        + "  }\n"
        + (
            "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n"
            f"    meta mark & {mark} == {mark} masquerade\n"
            "    ip saddr . ip daddr @hairpin masquerade\n"
            "  }\n"
            if nat
            else ""
        )
        + "}\n"
    )


def _nft(*args: str, script: str | None = None) -> str:
    try:
        done = subprocess.run(
            ["nft", *args], input=script, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NftError(f"nft {' '.join(args)}: {err}") from err
    if done.returncode != 0:
        raise NftError(f"nft {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def write(content: TableContent) -> str | None:
    """Replace the table atomically (one transaction: nothing changes if nft refuses).

    A kernel without nftables NAT (CONFIG_NFT_NAT: no `nat` chain type) gets
    the table without its masquerade chain; the returned text says so."""
    try:
        _nft("-f", "-", script=render(content))
    except NftError as err:
        if "Operation not supported" not in str(err):
            raise
        _nft("-f", "-", script=render(content, nat=False))
        return (
            f"nftables table {TABLE}: this kernel has no nftables NAT (CONFIG_NFT_NAT, "
            "module nft_chain_nat): nothing is masqueraded, hairpin and traffic from outside "
            "the cluster CIDRs may not reach their backends"
        )
    return None


def remove() -> bool:
    """Delete the table; False when there was none."""
    try:
        _nft("delete", "table", "ip", TABLE)
    except NftError as err:
        if "No such file" in str(err):
            return False
        raise
    return True


def read() -> dict[str, list[str]] | None:
    """The sets as the kernel holds them, each element as text; None: no table."""
    try:
        raw = _nft("-j", "list", "table", "ip", TABLE)
    except NftError as err:
        if "No such file" in str(err):
            return None
        raise
    sets: dict[str, list[str]] = {}
    for item in json.loads(raw).get("nftables", []):
        found = item.get("set")
        if found is not None:
            sets[found["name"]] = sorted(_text(e) for e in found.get("elem", []))
    return sets


def _text(element: Any) -> str:
    """One set element of nft's JSON as text: `10.96.0.1 . tcp . 80`."""
    if isinstance(element, dict):
        if "concat" in element:
            return " . ".join(_text(e) for e in element["concat"])
        if "prefix" in element:
            return f"{element['prefix']['addr']}/{element['prefix']['len']}"
        if "range" in element:
            low, high = element["range"]
            return f"{_text(low)}-{_text(high)}"
        if "elem" in element:
            return _text(element["elem"]["val"])
    return str(element)
