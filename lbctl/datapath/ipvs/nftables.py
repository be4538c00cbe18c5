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
  CIDRs (`clusterip` and `cluster_cidrs`; from anyone with
  --masquerade-all), to a NodePort, LoadBalancer IP or externalIP of
  externalTrafficPolicy Cluster (`external`), any connection of the node's
  own processes to a frontend, and hairpin (a pod reaching itself through a
  frontend: `hairpin` holds each backend address twice) leaves with the
  node's address.  Outside clients and pods of an externalTrafficPolicy
  Local frontend keep their address, with --masquerade-all too, as in
  kube-proxy, whose masqueradeAll rule matches the ClusterIP only.  The
  first chains mark such packets with MASQ_MARK before IPVS sees them:
  `prerouting` (at mangle priority, before routing and so before
  IPVS's LOCAL_IN hooks, as kube-proxy's IPVS mode marks in nat PREROUTING)
  and `output` (ahead of IPVS's LOCAL_OUT hook); the postrouting NAT chain
  masquerades marked packets (IPVS keeps the mark and, with
  net.ipv4.vs.conntrack=1, the connection tracking entry NAT needs).

The whole table is written in one `nft -f` transaction (delete, then add
with every element), so a reader never sees it half made, at the first
sync, at each periodic sync and when node settings change; in between a
plan diff changes only its elements (`add element` / `delete element`
lines, again one transaction, only when some element changed).
`TableWriter` keeps the mirror of what was written and reports each
distinct failure once.  A kernel that refuses nftables tables of family ip (built
without CONFIG_NF_TABLES_IPV4, as Debian's User-Mode Linux kernel is) makes
the table unavailable: the agent says so once and in `lbctl status`, and
tries again only at its periodic sync.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import subprocess
from typing import Any

log = logging.getLogger(__name__)

TABLE = "lbctl_ipvs"
MASQ_MARK = 0x00400000  # a bit of the packet mark kube-proxy (0x4000, 0x8000) does not use

Entry = tuple[str, str, int]  # address, protocol ("tcp", "udp"), port


class NftError(Exception):
    """nft refused the table; the message holds what it said."""


class FamilyRefused(NftError):
    """The kernel refuses every nftables table of family ip; the message says what that costs."""


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

# TableContent's element fields -> the nftables sets they fill
ELEMENT_SETS = {
    "clusterip": "clusterip",
    "external": "external",
    "frontends": "frontends",
    "reject": "no_endpoints",
    "drop": "no_local",
    "ranged": "ranged",
    "allowed": "allowed",
    "hairpin": "hairpin",
}


def element_text(field: str, value: Any) -> str:
    """One element of a set as nft writes it: `10.96.0.1 . tcp . 80`; hairpin's address twice."""
    if field == "hairpin":
        return f"{value} . {value}"
    return " . ".join(str(part) for part in value)


def _sort_key(field: str, value: Any) -> Any:
    return ipaddress.IPv4Address(value) if field == "hairpin" else str(value)


def _elements(field: str, values: frozenset[Any] | set[Any]) -> str:
    ordered = sorted(values, key=lambda v: _sort_key(field, v))
    return ", ".join(element_text(field, v) for v in ordered)


def _set(name: str, kind: str, elements: str, interval: bool = False) -> str:
    flags = "flags interval; " if interval else ""
    body = f"elements = {{ {elements} }}; " if elements else ""
    return f"  set {name} {{ type {kind}; {flags}{body}}}\n"


def render_delta(add: dict[str, set[Any]], delete: dict[str, set[Any]]) -> str:
    """The nft script that changes these elements, in one transaction: deletes, then adds."""
    lines = [
        f"delete element ip {TABLE} {ELEMENT_SETS[field]} {{ {_elements(field, values)} }}\n"
        for field, values in sorted(delete.items())
        if values
    ]
    lines += [
        f"add element ip {TABLE} {ELEMENT_SETS[field]} {{ {_elements(field, values)} }}\n"
        for field, values in sorted(add.items())
        if values
    ]
    return "".join(lines)


def render(content: TableContent, nat: bool = True) -> str:
    """The nft script that replaces the table with this content, in one transaction."""
    c = content
    mark = f"0x{MASQ_MARK:08x}"
    to_entry = "ip daddr . meta l4proto . th dport"
    # a ClusterIP: clients from outside the cluster CIDRs, everyone with masqueradeAll
    set_mark = f"meta mark set meta mark | {mark}"
    masq_clusterip = (
        f"    {to_entry} @clusterip {set_mark}\n"
        if c.masquerade_all
        else f"    ip saddr != @cluster_cidrs {to_entry} @clusterip {set_mark}\n"
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
        + _set("clusterip", _ENTRY, _elements("clusterip", c.clusterip))
        + _set("external", _ENTRY, _elements("external", c.external))
        + _set("frontends", _ENTRY, _elements("frontends", c.frontends))
        + _set("no_endpoints", _ENTRY, _elements("reject", c.reject))
        + _set("no_local", _ENTRY, _elements("drop", c.drop))
        + _set("ranged", _ENTRY, _elements("ranged", c.ranged))
        + _set("allowed", f"{_ENTRY} . ipv4_addr", _elements("allowed", c.allowed), interval=True)
        + _set("hairpin", "ipv4_addr . ipv4_addr", _elements("hairpin", c.hairpin))
        # before routing, so before IPVS (its LOCAL_IN hooks are at priority 98 and 99)
        + "  chain prerouting {\n    type filter hook prerouting priority mangle; policy accept;\n"
        + filters
        + masq_clusterip
        # externalTrafficPolicy Cluster; Local ones (not in the set) keep the client's address
        + f"    {to_entry} @external meta mark set meta mark | {mark}\n"
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


UNSUPPORTED = "Operation not supported"
LOST = (
    "masquerading of traffic from outside the cluster CIDRs and of hairpin, "
    "loadBalancerSourceRanges and the drops of externalTrafficPolicy Local are unavailable "
    "on this node"
)


def write(content: TableContent) -> str | None:
    """Replace the table atomically (one transaction: nothing changes if nft refuses).

    A kernel without nftables NAT (CONFIG_NFT_NAT: no `nat` chain type) gets
    the table without its masquerade chain; the returned text says so.  A
    kernel that refuses the family ip altogether raises FamilyRefused."""
    try:
        _nft("-f", "-", script=render(content))
    except NftError as err:
        if UNSUPPORTED not in str(err):
            raise
        try:
            _nft("-f", "-", script=render(content, nat=False))
        except NftError as err2:
            if UNSUPPORTED in str(err2) and not family_works():
                said = next(ln for ln in str(err2).splitlines() if UNSUPPORTED in ln)
                said = said[said.find("Error:") :] if "Error:" in said else said
                raise FamilyRefused(
                    f"nftables table ip {TABLE}: this kernel refuses nftables tables of family "
                    f"ip, even an empty one ({said}; the kernel lacks CONFIG_NF_TABLES_IPV4): "
                    f"{LOST}"
                ) from err2
            raise
        return (
            f"nftables table {TABLE}: this kernel has no nftables NAT (CONFIG_NFT_NAT, "
            "module nft_chain_nat): nothing is masqueraded, hairpin and traffic from outside "
            "the cluster CIDRs may not reach their backends"
        )
    return None


def family_works() -> bool:
    """Whether the kernel takes an empty table of family ip (made and deleted in one batch)."""
    probe = f"{TABLE}_probe"
    try:
        _nft("-f", "-", script=f"table ip {probe}\ndelete table ip {probe}\n")
    except NftError as err:
        return UNSUPPORTED not in str(err)
    return True


class TableWriter:
    """The table as last written; writes only changes and reports each failure once.

    `write` replaces the whole table when its content differs from the
    table as written (node settings, the first sync, the periodic resync);
    `update` changes only the given elements, in one transaction of `add
    element` / `delete element` lines (a change to one endpoint).  The mirror
    of the sets is kept current by both; when nft refuses, nothing changed in
    the kernel, the mirror is dropped and `update` writes nothing until the
    next `write(..., retry=True)` rewrites the table whole.

    After FamilyRefused it writes nothing on changes; `write(..., retry=True)`
    (the agent's periodic sync) tries again, quietly while the answer stays the
    same."""

    def __init__(self) -> None:
        self._sets: dict[str, set[Any]] | None = None  # by TableContent field; None: unknown
        self._node: tuple[frozenset[str], bool] = (frozenset(), False)
        self.unavailable: str | None = None  # the kernel refuses the family: why
        self.degraded: str | None = None  # written without its NAT chain: why
        self.error: str | None = None  # the last write's failure
        self._reported: set[str] = set()

    @property
    def written(self) -> TableContent | None:
        """The table's content as written and updated since; None: unknown or not written."""
        if self._sets is None:
            return None
        fields: dict[str, Any] = {f: frozenset(values) for f, values in self._sets.items()}
        return TableContent(cluster_cidrs=self._node[0], masquerade_all=self._node[1], **fields)

    def write(self, content: TableContent, retry: bool = False) -> list[str]:
        """Write when content differs from the table as written; the new problems to report."""
        if retry:
            self._sets = None  # someone may have changed or deleted it
        if (self.unavailable is not None and not retry) or (
            self._sets is not None and content == self.written
        ):
            return []
        if self.unavailable is not None and not family_works():
            return []  # still refused: one nft call per periodic sync, said once already
        was = self.degraded
        try:
            self.degraded = write(content)
        except FamilyRefused as err:
            self._sets, self.unavailable, self.error = None, str(err), str(err)
            return self._once(str(err))
        except NftError as err:
            self._sets = None
            self.error = f"nftables table {TABLE}: {err}"
            return self._once(self.error)
        if self.unavailable is not None:
            log.info("nftables table %s written: the kernel takes it now", TABLE)
        self._sets = {field: set(getattr(content, field)) for field in ELEMENT_SETS}
        self._node = (content.cluster_cidrs, content.masquerade_all)
        self.unavailable, self.error = None, None
        self._reported.clear()  # a failure that comes back is news again
        return [self.degraded] if self.degraded and self.degraded != was else []

    def update(self, add: dict[str, set[Any]], delete: dict[str, set[Any]]) -> list[str]:
        """Add and delete these elements (by TableContent field) in one nft transaction.

        Only what differs from the table as written is sent; nothing at all
        when nothing differs, when the kernel refuses the table, or after a
        failure (the next `write(..., retry=True)` rewrites it whole)."""
        if self._sets is None:
            return []
        sets = self._sets
        adding = {f: v - sets[f] for f, v in add.items() if v - sets[f]}
        deleting = {f: v & sets[f] for f, v in delete.items() if v & sets[f]}
        if not adding and not deleting:
            return []
        try:
            _nft("-f", "-", script=render_delta(adding, deleting))
        except NftError as err:
            self._sets = None  # nothing changed; the next periodic sync rewrites the table
            self.error = f"nftables table {TABLE}: {err}"
            return self._once(self.error)
        for field, values in deleting.items():
            sets[field] -= values
        for field, values in adding.items():
            sets[field] |= values
        self.error = None
        self._reported.clear()
        return []

    def _once(self, message: str) -> list[str]:
        if message in self._reported:
            return []
        self._reported.add(message)
        return [message]

    def state(self) -> dict[str, Any]:
        """For `lbctl status`."""
        return {
            "table": f"ip {TABLE}",
            "written": self.written is not None,
            "unavailable": self.unavailable,
            "degraded": self.degraded,
            "error": self.error,
        }


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
