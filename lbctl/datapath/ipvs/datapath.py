"""IpvsDatapath: the fallback for kernels that cannot run lbctl's BPF programs.

The same plan and diffs as BpfDatapath, programmed into IPVS over generic
netlink (pyroute2):

- one virtual service per (address, port, protocol) of a frontend; when an
  externalTrafficPolicy Local frontend has its outside twin (scope
  external), the twin's backends (this node's) are the ones programmed:
  IPVS cannot tell outside clients from pods per service;
- real servers in masquerade (NAT) mode, weight = the backend's weight under
  wrr and mh, else 1; a backend that leaves the plan (removed, or
  terminating while others are ready) is set to weight 0 and deleted once
  IPVS shows no connection on it, so its connections drain;
- schedulers: random and rr -> rr, wrr -> wrr, lc -> lc, sh -> sh, maglev
  -> mh with source-port hashing; sessionAffinity ClientIP -> persistence
  with the Service's timeout;
- ClusterIPs, LoadBalancer IPs and externalIPs are addresses of the dummy
  link lbctl-ipvs0 (kube-proxy's kube-ipvs0), so the node accepts them;
- the rest (masquerade, hairpin, source ranges, rejects) is the nftables
  table of lbctl/datapath/ipvs/nftables.py.

A Python mirror of what was programmed makes a diff cost one netlink call
per changed real server, and the reference-counted contributions of each
virtual service to the table and the link (lbctl/datapath/ipvs/contributions.py)
one netlink call per link address that comes or goes and one nft
transaction of element changes: nothing is recomputed over every Service.
`reconcile` (the first sync and every sync period) dumps IPVS and repairs
whatever differs (an entry added or deleted by hand), touches only virtual
services on lbctl's addresses, and rewrites the table whole.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lbctl.datapath import NodeConfig
from lbctl.datapath.ebpf import tc
from lbctl.datapath.ipvs import nftables, owned
from lbctl.datapath.ipvs.contributions import (
    Contributions,
    TableSync,
    VsKey,
    deciding,
    vs_key,
)
from lbctl.datapath.ipvs.owned import IPVS_PROC, NODE_PORT_RANGE
from lbctl.plan.planner import (
    NODE_PORT,
    Frontend,
    FrontendKey,
    PlanDiff,
)
from lbctl.words import counted

log = logging.getLogger(__name__)

LINK = "lbctl-ipvs0"
SCHEDULERS = {"random": "rr", "rr": "rr", "wrr": "wrr", "lc": "lc", "sh": "sh", "maglev": "mh"}
WEIGHTED = ("wrr", "mh")
F_PERSISTENT = 0x1  # IP_VS_SVC_F_PERSISTENT
F_SCHED_MH_PORT = 0x10  # IP_VS_SVC_F_SCHED_MH_PORT: mh hashes the source port too
FWD_MASQ = 0  # IP_VS_CONN_F_MASQ
SYSCTLS = {
    # IPVS keeps conntrack entries, which nftables' masquerade needs
    "net/ipv4/vs/conntrack": "1",
    # a connection to a deleted real server ends instead of hanging
    "net/ipv4/vs/expire_nodest_conn": "1",
    # a persistence template of a weight-0 real server expires
    "net/ipv4/vs/expire_quiescent_template": "1",
    "net/ipv4/ip_forward": "1",
}


@dataclasses.dataclass(frozen=True)
class VirtualService:
    """What one IPVS virtual service should hold, as IPVS would report it."""

    scheduler: str
    flags: int
    timeout: int  # persistence, seconds; 0: none
    dests: Mapping[tuple[str, int], int]  # (address, port) -> weight


def wanted(fe: Frontend) -> VirtualService:
    sched = SCHEDULERS.get(fe.scheduler, "rr")
    flags = (F_PERSISTENT if fe.affinity_timeout else 0) | (F_SCHED_MH_PORT if sched == "mh" else 0)
    dests = {(str(b.address), b.port): (b.weight if sched in WEIGHTED else 1) for b in fe.backends}
    return VirtualService(sched, flags, fe.affinity_timeout, dests)


def table_content(
    frontends: Mapping[FrontendKey, Frontend], node: NodeConfig
) -> nftables.TableContent:
    """The nftables sets for these frontends (the plan's) and the node's settings."""
    return Contributions.of(frontends).content(node)


class IpvsDatapath:
    """IPVS virtual services, their VIPs on a dummy link, and one nftables table."""

    mode = "ipvs"

    def __init__(self, link: str = LINK) -> None:
        from pyroute2 import IPVS, IPRoute

        self.link = link
        self.ipvs = IPVS()
        self.ipr = IPRoute()
        self.frontends: dict[FrontendKey, Frontend] = {}
        self.programmed: dict[VsKey, VirtualService] = {}  # the mirror of IPVS
        self.draining: dict[VsKey, set[tuple[str, int]]] = {}  # weight 0 until idle
        self.addresses: set[str] = set()  # on the dummy link
        self.table = TableSync()  # each virtual service's table elements and link address
        self.nft = self.table.nft
        self._pending: list[str] = []  # problems found where nothing returns them
        self._link_index = self._ensure_link()

    # -- node ---------------------------------------------------------------------------

    def load(self) -> None:
        """Sysctls IPVS needs, in this network namespace."""
        for key, value in SYSCTLS.items():
            path = Path("/proc/sys") / key
            try:
                if path.read_text().strip() != value:
                    path.write_text(value)
            except OSError as err:
                log.warning("sysctl %s=%s: %s", key.replace("/", "."), value, err)

    def _ensure_link(self) -> int:
        from pyroute2.netlink.exceptions import NetlinkError

        found = self.ipr.link_lookup(ifname=self.link)
        if not found:
            try:
                self.ipr.link("add", ifname=self.link, kind="dummy")
            except NetlinkError as err:
                raise OSError(
                    err.code,
                    f"creating the dummy link {self.link} for the Services' addresses failed: "
                    f"{os.strerror(err.code)} (CONFIG_DUMMY; as a module: `modprobe dummy`)",
                ) from err
            found = self.ipr.link_lookup(ifname=self.link)
        index = int(found[0])
        self.ipr.link("set", index=index, state="up")
        self.addresses = {
            str(a.get_attr("IFA_ADDRESS")) for a in self.ipr.get_addr(index=index, family=2)
        }
        return index

    def configure(self, conf: NodeConfig) -> None:
        """The node's settings: the table is rewritten whole when they change it."""
        self._pending += self.table.configure(conf)  # reported by the next sync

    # -- hooks: IPVS needs none ---------------------------------------------------------

    def attach(self, links: Iterable[tc.Link]) -> list[str]:
        return []

    def forget_missing(self, present: Iterable[tc.Link]) -> None:
        return None

    def forget_detached(self) -> list[str]:
        return []  # no program is attached; drift in IPVS is repaired by reconcile

    def attach_xdp(self, links: Iterable[tc.Link], mode: str) -> list[str]:
        if mode == "off":
            return []
        return [f"XDP fast path (--xdp {mode}) is off: the IPVS datapath has no XDP program"]

    def attach_cgroup(self, path: str | None) -> list[str]:
        return []

    # -- frontends ----------------------------------------------------------------------

    def _desired(self, key: VsKey) -> Frontend | None:
        return deciding(self.frontends, key)

    def apply(self, change: PlanDiff) -> list[str]:
        """A diff, at a cost that follows the virtual services it touches: a netlink call
        per changed real server, a netlink call per link address that comes or goes, and
        one nft transaction of element changes when some element of the table changed."""
        touched: set[VsKey] = set()
        for key in change.removals:
            self.frontends.pop(key, None)
            touched.add(vs_key(key))
        for fe in change.upserts:
            self.frontends[fe.key] = fe
            touched.add(vs_key(fe.key))
        errors, self._pending = self._pending, []
        for vs in sorted(touched):
            errors += self._sync_service(vs)
        delta, table_errors = self.table.apply(self.frontends, touched)
        errors += self._link_addresses(delta.addresses_added, delta.addresses_removed)
        return errors + table_errors

    def reconcile(
        self, desired: Mapping[FrontendKey, Frontend], remove_stale: bool = True
    ) -> list[str]:
        """Make IPVS, the dummy link and the table match the plan, from what the kernel holds."""
        from pyroute2.netlink.exceptions import NetlinkError

        self.frontends = dict(desired)
        self.table.reset(self.frontends)
        try:
            self.programmed = self._read()
        except NetlinkError as err:
            return [f"IPVS: reading the virtual services failed: {os.strerror(err.code)}"]
        self._ensure_link()
        errors, self._pending = self._pending, []
        keys = {vs_key(k) for k in self.frontends}
        if remove_stale:
            ours = self.addresses | {str(a) for a in self._node_port_addresses()}
            keys |= {k for k in self.programmed if k[0] in ours}
        for key in sorted(keys):
            errors += self._sync_service(key)
        errors += self._sync_addresses(remove_stale)
        errors += self.table.rewrite()  # someone may have changed or deleted it
        return errors

    def _node_port_addresses(self) -> set[str]:
        return {str(k.address) for k, fe in self.frontends.items() if fe.kind == NODE_PORT}

    def _sync_service(self, key: VsKey) -> list[str]:
        """One virtual service to its frontend: a netlink call per difference."""
        from pyroute2.netlink.exceptions import NetlinkError

        fe = self._desired(key)
        have = self.programmed.get(key)
        target = str(fe.key) if fe is not None else f"{key[0]}:{key[1]}"
        try:
            if fe is None:
                if have is not None:
                    self._service("del", key)
                    self.programmed.pop(key, None)
                    self.draining.pop(key, None)
                return []
            want = wanted(fe)
            if have is None:
                self._service("add", key, want)
                have = VirtualService(want.scheduler, want.flags, want.timeout, {})
            elif (have.scheduler, have.flags, have.timeout) != (
                want.scheduler,
                want.flags,
                want.timeout,
            ):
                self._service("set", key, want)
            dests = dict(have.dests)
            draining = self.draining.setdefault(key, set())
            for dest, weight in want.dests.items():
                if dest not in dests:
                    self._dest("add", key, dest, weight)
                elif dests[dest] != weight:
                    self._dest("set", key, dest, weight)
                dests[dest] = weight
                draining.discard(dest)
            for dest in [d for d in dests if d not in want.dests]:
                if dests[dest] != 0:
                    self._dest("set", key, dest, 0)  # drain: no new connections
                    dests[dest] = 0
                draining.add(dest)
            self.programmed[key] = VirtualService(want.scheduler, want.flags, want.timeout, dests)
            if not draining:
                self.draining.pop(key, None)
        except NetlinkError as err:
            self.programmed.pop(key, None)  # unknown now: the next reconcile reads it back
            service = f"Service {fe.service}: " if fe is not None else ""
            return [f"{service}IPVS virtual service {target}: {os.strerror(err.code)}"]
        return []

    def collect_garbage(self) -> list[str]:
        """Delete drained real servers: weight 0 and no connection left."""
        from pyroute2.netlink.exceptions import NetlinkError

        for key, dests in list(self.draining.items()):
            try:
                current = {
                    (str(d.get("addr")), int(d["port"])): d
                    for d in map(_dest_fields, self.ipvs.dest("dump", _svc(key)))
                }
                for dest in list(dests):
                    entry = current.get(dest)
                    if entry is not None and _conns(entry) > 0:
                        continue
                    if entry is not None:
                        self._dest("del", key, dest)
                    dests.discard(dest)
                    held = self.programmed.get(key)
                    if held is not None:
                        rest = {d: w for d, w in held.dests.items() if d != dest}
                        self.programmed[key] = dataclasses.replace(held, dests=rest)
                    log.info("real server %s:%d of %s:%d drained, deleted", *dest, *key[:2])
            except NetlinkError as err:
                log.warning("IPVS %s:%d: draining: %s", key[0], key[1], os.strerror(err.code))
            if not dests:
                self.draining.pop(key, None)
        return []

    def _sync_addresses(self, remove_stale: bool) -> list[str]:
        """Every ClusterIP, LoadBalancer IP and externalIP on the dummy link."""
        want = set(self.table.held.addresses)
        return self._link_addresses(want - self.addresses, self.addresses - want, remove_stale)

    def _link_addresses(
        self, add: Iterable[str], remove: Iterable[str], remove_stale: bool = True
    ) -> list[str]:
        """Put these addresses on the dummy link and take those off: a netlink call each."""
        from pyroute2.netlink.exceptions import NetlinkError

        errors = []
        for address in sorted(set(add) - self.addresses):
            try:
                self.ipr.addr("add", index=self._link_index, address=address, prefixlen=32)
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    errors.append(f"address {address} on {self.link}: {os.strerror(err.code)}")
                    continue
            self.addresses.add(address)
        if remove_stale:
            for address in sorted(set(remove) & self.addresses):
                try:
                    self.ipr.addr("del", index=self._link_index, address=address, prefixlen=32)
                except NetlinkError as err:
                    if err.code != errno.EADDRNOTAVAIL:
                        errors.append(f"address {address} on {self.link}: {os.strerror(err.code)}")
                        continue
                self.addresses.discard(address)
        return errors

    # -- netlink ------------------------------------------------------------------------

    def _service(self, command: str, key: VsKey, vs: VirtualService | None = None) -> None:
        from pyroute2 import IPVSService

        fields: dict[str, Any] = {"addr": key[0], "port": key[1], "protocol": key[2]}
        if vs is not None:
            fields |= {
                "sched_name": vs.scheduler,
                "flags": {"flags": vs.flags, "mask": 0xFFFFFFFF},
                "timeout": vs.timeout,
            }
        self.ipvs.service(command, service=IPVSService(**fields))

    def _dest(self, command: str, key: VsKey, dest: tuple[str, int], weight: int = 0) -> None:
        from pyroute2 import IPVSDest

        real = IPVSDest(addr=dest[0], port=dest[1], weight=weight, fwd_method=FWD_MASQ)
        self.ipvs.dest(command, service=_svc(key), dest=real)

    def _read(self) -> dict[VsKey, VirtualService]:
        """IPVS's virtual services (IPv4, not firewall marks) and their real servers."""

        out = {}
        for msg in self.ipvs.service("dump"):
            svc = _service_fields(msg)
            if svc.get("fwmark") or svc.get("af") != socket.AF_INET:
                continue
            key = (str(svc.get("addr")), int(svc["port"]), int(svc["protocol"]))
            dests = {
                (str(d.get("addr")), int(d["port"])): int(d["weight"])
                for d in map(_dest_fields, self.ipvs.dest("dump", _svc(key)))
            }
            flags = int((svc.get("flags") or {}).get("flags", 0)) & 0xFFFF & ~0x2  # not HASHED
            out[key] = VirtualService(
                str(svc.get("sched_name")), flags, int(svc.get("timeout") or 0), dests
            )
        return out

    def describe(self) -> dict[str, Any]:
        return {"nftables": self.nft.state()}  # unavailable: what the node goes without, and why

    def close(self) -> None:
        """Release the sockets; IPVS, the link and the table stay, as the BPF maps do."""
        self.ipvs.close()
        self.ipr.close()


def _svc(key: VsKey) -> Any:
    from pyroute2 import IPVSService

    return IPVSService(addr=key[0], port=key[1], protocol=key[2])


def _fields(msg: Any, outer: str, prefix: str) -> dict[str, Any]:
    """The attributes of a service or dest message by short name (`addr`, `weight`).

    pyroute2's from_message keeps its defaults (weight 1, forward "route")
    beside the prefixed names it read, so the raw attributes are read instead."""
    nested = msg.get_attr(outer)
    attrs = nested["attrs"] if isinstance(nested, dict) else nested.get("attrs", [])
    return {name[len(prefix) :].lower(): value for name, value in attrs if name.startswith(prefix)}


def _service_fields(msg: Any) -> dict[str, Any]:
    return _fields(msg, "IPVS_CMD_ATTR_SERVICE", "IPVS_SVC_ATTR_")


def _dest_fields(msg: Any) -> dict[str, Any]:
    return _fields(msg, "IPVS_CMD_ATTR_DEST", "IPVS_DEST_ATTR_")


def _conns(dest: Mapping[str, Any]) -> int:
    return int(dest.get("active_conns") or 0) + int(dest.get("inact_conns") or 0)


# -- reading back and removing, for `lbctl maps dump` and `lbctl cleanup` ----------------

_PROTOCOLS = {socket.IPPROTO_TCP: "TCP", socket.IPPROTO_UDP: "UDP"}


def present() -> bool:
    """Whether this namespace holds lbctl's IPVS datapath (its link or its table)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=LINK):
            return True
    try:
        return nftables.read() is not None
    except nftables.NftError:
        return False


def _ours(sets: Mapping[str, list[str]] | None) -> set[VsKey]:
    """lbctl's virtual services: the frontends of its table (and, to the callers,
    anything on its link)."""
    names = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
    keys = set()
    for element in (sets or {}).get("frontends", []):
        address, proto, port = (part.strip() for part in element.split(" . "))
        keys.add((address, int(port), names.get(proto, 0)))
    return keys


def read_state() -> dict[str, Any]:
    """IPVS's virtual services (lbctl's), the dummy link's addresses and the table's sets."""
    from pyroute2 import IPVS, IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=LINK)
        link = (
            sorted(
                str(a.get_attr("IFA_ADDRESS"))
                for a in ipr.get_addr(index=found[0], family=socket.AF_INET)
            )
            if found
            else None
        )
    sets = nftables.read()
    ours = _ours(sets)
    services = []
    if IPVS_PROC.exists():
        ipvs = IPVS()
        try:
            for msg in ipvs.service("dump"):
                svc = _service_fields(msg)
                if svc.get("fwmark") or svc.get("af") != socket.AF_INET:
                    continue
                key = (str(svc.get("addr")), int(svc["port"]), int(svc["protocol"]))
                if key not in ours and key[0] not in (link or ()):
                    continue
                flags = int((svc.get("flags") or {}).get("flags", 0))
                reals = [_dest_fields(d) for d in ipvs.dest("dump", _svc(key))]
                services.append(
                    {
                        "address": key[0],
                        "port": key[1],
                        "protocol": _PROTOCOLS.get(key[2], str(key[2])),
                        "scheduler": str(svc.get("sched_name")),
                        "flags": [n for bit, n in _FLAG_NAMES.items() if flags & bit],
                        "persistence_timeout_s": int(svc.get("timeout") or 0)
                        if flags & F_PERSISTENT
                        else 0,
                        "kind": _kind(key, sets),
                        "backends": sorted(
                            (
                                {
                                    "address": str(d.get("addr")),
                                    "port": int(d["port"]),
                                    "weight": int(d["weight"]),
                                    "active_conns": int(d.get("active_conns") or 0),
                                    "inactive_conns": int(d.get("inact_conns") or 0),
                                    "forward": _FORWARD.get(int(d.get("fwd_method") or 0), "?"),
                                }
                                for d in reals
                            ),
                            key=lambda b: (ipaddress.IPv4Address(b["address"]), b["port"]),
                        ),
                    }
                )
        finally:
            ipvs.close()
    services.sort(key=lambda s: (ipaddress.IPv4Address(s["address"]), s["port"], s["protocol"]))
    return {
        "mode": "ipvs",
        "ipvs_loaded": IPVS_PROC.exists(),
        "virtual_services": services,
        "link": {"name": LINK, "addresses": link},
        "nftables": {"table": f"ip {nftables.TABLE}", "sets": sets},
    }


_FLAG_NAMES = {F_PERSISTENT: "persistent", F_SCHED_MH_PORT: "mh-port"}
_FORWARD = {0: "masq", 1: "local", 2: "tunnel", 3: "route", 4: "bypass"}


def _kind(key: VsKey, sets: Mapping[str, list[str]] | None) -> str:
    element = f"{key[0]} . {_PROTOCOLS.get(key[2], '?').lower()} . {key[1]}"
    held = sets or {}
    notes = [
        note
        for name, note in (
            ("no_endpoints", "reject"),
            ("no_local", "drop"),
            ("ranged", "source-ranges"),
        )
        if element in held.get(name, [])
    ]
    if element in held.get("clusterip", []):
        kind = "ClusterIP"
    elif element in held.get("external", []):
        kind = "external"
    else:
        kind = "external (Local)"
    return " ".join([kind, *notes])


def cleanup(node_port_range: tuple[int, int] | None = None) -> list[str]:
    """Remove lbctl's virtual services, its dummy link and its table; say what went and why.

    lbctl's virtual services are those its table lists (`frontends`), those on
    the addresses of lbctl-ipvs0 (ClusterIPs, LoadBalancer IPs, externalIPs)
    and, when the table is absent (a kernel that refuses it) while
    lbctl-ipvs0 shows that lbctl's IPVS mode ran here, those on this node's
    own addresses whose port is in the NodePort range: its NodePorts, which
    the table would have listed.  Any other virtual service stays (kube-proxy's
    IPVS cleanup flushes all of IPVS; this one does not)."""
    from pyroute2 import IPVS, IPRoute

    low, high = node_port_range or NODE_PORT_RANGE
    said = []
    sets = nftables.read()
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=LINK)
        addresses = (
            {str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(index=found[0], family=2)}
            if found
            else set()
        )
        node_addresses = {str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(family=2)}
    node_addresses -= addresses
    listed = _ours(sets)
    reasons = (
        f"listed in nftables table ip {nftables.TABLE}",
        f"on the addresses of {LINK}",
        f"on this node's addresses with a port in the NodePort range {low}-{high} (lbctl's "
        f"NodePorts: {LINK} shows lbctl's IPVS mode ran here, and the nftables table that "
        "would list them is absent)",
    )

    def why(key: VsKey) -> str | None:
        if key in listed:
            return reasons[0]
        rule = owned.why(
            owned.VirtualService(key[2], key[0], key[1]),
            addresses if found else None,
            node_addresses,
            (low, high),
        )
        if rule == owned.ON_LINK:
            return reasons[1]
        if rule == owned.NODE_PORT and sets is None:  # the table would have listed it
            return reasons[2]
        return None

    if IPVS_PROC.exists():  # never load ip_vs just to find nothing
        ipvs = IPVS()
        try:
            removed: dict[str, list[str]] = {}
            kept = []
            for svc in [_service_fields(msg) for msg in ipvs.service("dump")]:
                if svc.get("fwmark") or svc.get("af") != socket.AF_INET:
                    kept.append(str(owned.VirtualService(0, "", 0, int(svc.get("fwmark") or 0))))
                    continue
                key = (str(svc.get("addr")), int(svc["port"]), int(svc["protocol"]))
                name = str(owned.VirtualService(key[2], key[0], key[1]))
                reason = why(key)
                if reason is None:
                    kept.append(name)
                    continue
                ipvs.service("del", service=_svc(key))
                removed.setdefault(reason, []).append(name)
            for reason in reasons:
                if reason in removed:
                    gone = sorted(removed[reason])
                    said.append(
                        f"removed {counted(len(gone), 'IPVS virtual service')} {reason}: "
                        + ", ".join(gone)
                    )
            if not removed:
                said.append("removed IPVS virtual services: none")
            if kept:
                said.append(
                    f"kept {counted(len(kept), 'IPVS virtual service')} that are not lbctl's: "
                    + ", ".join(sorted(kept))
                )
        finally:
            ipvs.close()
    if found:
        with IPRoute() as ipr:
            ipr.link("del", index=found[0])
        said.append(f"removed link {LINK}")
    if sets is not None and nftables.remove():
        said.append(f"removed nftables table ip {nftables.TABLE}")
    return said
