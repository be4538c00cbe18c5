"""`lbctl cleanup --kube-proxy`: remove what kube-proxy left on a node, and nothing else.

A node moving from kube-proxy to lbctl still holds kube-proxy's rules, and
they keep translating packets lbctl does not see any more.  What counts as
kube-proxy's, in the network namespace the command runs in:

- iptables, with both backends (iptables-legacy and iptables-nft) and both
  families (iptables and ip6tables), in the nat, filter and mangle tables:
  the chains kube-proxy creates (`KUBE_PROXY_CHAINS` by table, and in nat
  the per-service chains by their prefixes), and the rules of other chains
  that jump to them.  kubelet's own KUBE-* chains (`KUBELET_CHAINS`) and any
  KUBE-* chain not known to be kube-proxy's stay, and are named in the report.
  Each table changes in one `iptables-restore --noflush` transaction of
  `-D` (the jumps), `-F` and `-X` (the chains), so a rule that changed since
  it was read makes the whole transaction fail rather than remove something else.
- nftables: the tables `ip kube-proxy` and `ip6 kube-proxy`, which kube-proxy's
  nftables mode owns whole.
- IPVS: the virtual services on the addresses of the `kube-ipvs0` dummy link
  (kube-proxy binds every ClusterIP, external IP and load-balancer IP there)
  and, when that link exists, those on the node's other addresses whose port
  is in the NodePort range; then the `kube-ipvs0` link itself.  A kernel
  without IPVS has no virtual services; that is reported, not an error.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import itertools
import shlex
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lbctl.datapath.ipvs import owned
from lbctl.datapath.ipvs.owned import IPVS_PROC, NODE_PORT_RANGE, VirtualService
from lbctl.words import counted

TABLES = ("nat", "filter", "mangle")
# The fixed chains kube-proxy has created, by table, in its iptables and
# IPVS modes over the releases (older names included: a node may have run one).
KUBE_PROXY_CHAINS: dict[str, frozenset[str]] = {
    "nat": frozenset(
        {
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
            "KUBE-PROXY-CANARY",
            "KUBE-NODE-PORT",
            "KUBE-LOAD-BALANCER",
            "KUBE-FIRE-WALL",
        }
    ),
    "filter": frozenset(
        {
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-FORWARD",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
            "KUBE-PROXY-CANARY",
            "KUBE-NODE-PORT",
            "KUBE-SOURCE-RANGES-FIREWALL",
            "KUBE-IPVS-FILTER",
            "KUBE-IPVS-OUT-FILTER",
        }
    ),
    "mangle": frozenset({"KUBE-PROXY-CANARY"}),
}
# Per-service chains (nat): service, local service, endpoint, firewall,
# external-traffic-policy-local (older releases) and external.
SERVICE_CHAIN_PREFIXES = (
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-XLB-",
    "KUBE-EXT-",
)
# kubelet's chains: a node without kube-proxy still has kubelet.
KUBELET_CHAINS = frozenset(
    {"KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT", "KUBE-MARK-DROP"}
)
IPTABLES_TOOLS = ("iptables-legacy", "iptables-nft", "ip6tables-legacy", "ip6tables-nft")
NFT_TABLES = ("ip kube-proxy", "ip6 kube-proxy")
IPVS_LINK = "kube-ipvs0"
# iptables-legacy's tables of this namespace, by family; no file: no legacy tables
LEGACY_TABLES = {
    "iptables": Path("/proc/net/ip_tables_names"),
    "ip6tables": Path("/proc/net/ip6_tables_names"),
}
_RETRIES = 3  # re-read and try again when a table changed between reading and writing


def parse_node_port_range(text: str) -> tuple[int, int]:
    """`--node-port-range MIN-MAX`, as kube-apiserver's --service-node-port-range."""
    low, sep, high = text.strip().partition("-")
    if not (sep and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high) <= 65535):
        raise ValueError(
            f"{text!r} is not a port range; write it as kube-apiserver's "
            "--service-node-port-range, e.g. 30000-32767"
        )
    return int(low), int(high)


class CleanupError(RuntimeError):
    """One part of the cleanup failed; the message names what, why and the fix."""


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


# -- iptables ------------------------------------------------------------------------


@dataclasses.dataclass
class Table:
    """One table of an iptables-save dump: its chains and their rules, in order."""

    name: str
    chains: list[str] = dataclasses.field(default_factory=list)  # user chains, not built-ins
    rules: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (chain, "-A ...")


def parse_save(text: str) -> dict[str, Table]:
    """The tables of `iptables-save` output."""
    tables: dict[str, Table] = {}
    table: Table | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            table = tables.setdefault(line[1:].strip(), Table(line[1:].strip()))
        elif table is None or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            if policy == "-":  # built-in chains have a policy
                table.chains.append(name)
        elif line.startswith("-A "):
            table.rules.append((line.split()[1], line))
    return tables


def jump_target(rule: str) -> str | None:
    """The chain or target a rule jumps or goes to (-j/--jump, -g/--goto)."""
    words = shlex.split(rule)
    for flag, target in itertools.pairwise(words):
        if flag in ("-j", "--jump", "-g", "--goto"):
            return target
    return None


def is_kube_proxy_chain(table: str, chain: str) -> bool:
    if chain in KUBE_PROXY_CHAINS.get(table, frozenset()):
        return True
    return table == "nat" and chain.startswith(SERVICE_CHAIN_PREFIXES)


@dataclasses.dataclass
class TablePlan:
    """What goes from one table, and the KUBE-* chains that stay."""

    table: str
    chains: list[str]  # kube-proxy's chains, to flush and delete
    jumps: list[tuple[str, str]]  # rules of other chains jumping to them
    kept: list[str]  # KUBE-* chains that are not kube-proxy's

    def restore_input(self) -> str:
        lines = [f"*{self.table}"]
        lines += ["-D" + rule[2:] for _, rule in self.jumps]  # "-A CHAIN spec" -> "-D CHAIN spec"
        lines += [f"-F {chain}" for chain in self.chains]
        lines += [f"-X {chain}" for chain in self.chains]
        return "\n".join([*lines, "COMMIT", ""])


def plan_table(table: Table) -> TablePlan:
    doomed = [c for c in table.chains if is_kube_proxy_chain(table.name, c)]
    gone = set(doomed)
    jumps = [(c, r) for c, r in table.rules if c not in gone and jump_target(r) in gone]
    kept = [c for c in table.chains if c.startswith("KUBE-") and c not in gone]
    return TablePlan(table.name, doomed, jumps, kept)


@dataclasses.dataclass
class TableResult:
    tool: str
    table: str
    chains: list[str]
    jumps: list[tuple[str, str]]  # (chain, rule)
    kept: list[str]


def _save(tool: str) -> dict[str, Table]:
    out = _run([f"{tool}-save"])
    if out.returncode != 0:
        raise CleanupError(
            f"{tool}: {tool}-save failed ({out.stderr.strip() or f'exit {out.returncode}'}); "
            f"check that the {tool} backend works here, e.g. `{tool}-save` by hand"
        )
    return parse_save(out.stdout)


def clean_iptables(tool: str) -> list[TableResult]:
    """Remove kube-proxy's chains and the jumps to them from one iptables backend.

    Only tables that exist are read and changed: saving creates none.
    """
    done: dict[str, TableResult] = {}
    for attempt in range(_RETRIES):
        tables = _save(tool)
        plans = [plan_table(tables[name]) for name in TABLES if name in tables]
        for plan in plans:
            if plan.table not in done:
                done[plan.table] = TableResult(tool, plan.table, [], [], plan.kept)
        work = [plan for plan in plans if plan.chains or plan.jumps]
        if not work:
            break
        out = _run(
            [f"{tool}-restore", "--wait", "5", "--noflush"],
            "".join(p.restore_input() for p in work),
        )
        if out.returncode == 0:
            for plan in work:
                result = done[plan.table]
                result.chains += plan.chains
                result.jumps += plan.jumps
            break
        if attempt == _RETRIES - 1:
            raise CleanupError(
                f"{tool}: {tool}-restore refused to remove kube-proxy's chains "
                f"({out.stderr.strip() or f'exit {out.returncode}'}); the tables changed "
                f"while lbctl read them {_RETRIES} times: stop kube-proxy first (delete its "
                "DaemonSet or its static pod) and run `lbctl cleanup --kube-proxy` again"
            )
    return [done[name] for name in TABLES if name in done]


# -- nftables ------------------------------------------------------------------------


def clean_nftables() -> tuple[list[str], list[str]]:
    """Delete kube-proxy's nftables tables; return (deleted, absent)."""
    listing = _run(["nft", "list", "tables"])
    if listing.returncode != 0:
        raise CleanupError(
            f"nftables: `nft list tables` failed ({listing.stderr.strip()}); check that nft "
            "works here"
        )
    present = {line.removeprefix("table ").strip() for line in listing.stdout.splitlines()}
    deleted, absent = [], []
    for table in NFT_TABLES:
        if table not in present:
            absent.append(table)
            continue
        out = _run(["nft", "delete", "table", *table.split()])
        if out.returncode != 0:
            raise CleanupError(
                f"nftables: cannot delete table {table} ({out.stderr.strip()}); stop "
                f"kube-proxy first and run `lbctl cleanup --kube-proxy` again"
            )
        deleted.append(table)
    return deleted, absent


# -- IPVS ----------------------------------------------------------------------------


def kube_proxy_services(
    services: Iterable[VirtualService],
    link_addresses: set[str] | None,
    node_addresses: set[str],
    node_port_range: tuple[int, int] = NODE_PORT_RANGE,
) -> list[VirtualService]:
    """The virtual services kube-proxy's IPVS mode made: those `owned.why` gives
    to kube-ipvs0, whose addresses `link_addresses` are (None: no such link)."""
    return [
        s
        for s in services
        if owned.why(s, link_addresses, node_addresses, node_port_range) is not None
    ]


@dataclasses.dataclass
class IpvsResult:
    available: bool
    removed: list[VirtualService]
    kept: list[VirtualService]
    link: str  # what happened to kube-ipvs0


def _ipvs_unavailable(err: Exception) -> bool:
    """The kernel has no IPVS: its generic netlink family does not exist."""
    return getattr(err, "code", None) in (errno.ENOENT, errno.EPROTONOSUPPORT)


def _address(text: object) -> str:
    return str(ipaddress.ip_address(str(text))) if text else ""


def _read_services(ipvs: Any) -> list[VirtualService]:
    from pyroute2 import IPVSService

    found = []
    for msg in ipvs.service("dump"):
        svc = IPVSService.from_message(msg)
        found.append(
            VirtualService(
                int(svc.get("protocol") or 0),
                _address(svc.get("addr")),
                int(svc.get("port") or 0),
                int(svc.get("fwmark") or 0),
            )
        )
    return found


def _addresses(ipr: Any, index: int | None = None) -> set[str]:
    kwargs = {"index": index} if index is not None else {}
    return {
        _address(a.get_attr("IFA_ADDRESS"))
        for a in ipr.get_addr(**kwargs)
        if a.get_attr("IFA_ADDRESS")
    }


def clean_ipvs(node_port_range: tuple[int, int] = NODE_PORT_RANGE) -> IpvsResult:
    """Remove kube-proxy's IPVS virtual services, then the kube-ipvs0 link."""
    from pyroute2 import IPVS, IPRoute, IPVSService
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=IPVS_LINK)
        link = ipr.get_links(found[0])[0] if found else None
        link_addresses = _addresses(ipr, found[0]) if found else None
        node_addresses = _addresses(ipr) - (link_addresses or set())
    result = IpvsResult(True, [], [], "")
    if not IPVS_PROC.exists():  # ip_vs is not loaded: opening its family would load it
        result.available = False
        result.link = _remove_link(link, len(link_addresses or ()))
        return result
    try:
        ipvs = IPVS()
    except (NetlinkError, OSError) as err:
        if not _ipvs_unavailable(err):
            raise CleanupError(f"IPVS: cannot open its netlink family ({err})") from err
        result.available = False
    else:
        try:
            services = _read_services(ipvs)
            doomed = kube_proxy_services(services, link_addresses, node_addresses, node_port_range)
            for svc in doomed:
                ipvs.service(
                    "del",
                    service=IPVSService(addr=svc.address, port=svc.port, protocol=svc.protocol),
                )
                result.removed.append(svc)
            result.kept = [s for s in services if s not in doomed]
        except NetlinkError as err:
            if not _ipvs_unavailable(err):
                raise CleanupError(
                    f"IPVS: removing kube-proxy's virtual services failed ({err}); "
                    "kube-ipvs0 is kept so a second run can still tell them apart"
                ) from err
            result.available = False
        finally:
            ipvs.close()
    result.link = _remove_link(link, len(link_addresses or ()))
    return result


def _remove_link(link: Any, addresses: int) -> str:
    from pyroute2 import IPRoute

    if link is None:
        return "absent"
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    if kind != "dummy":
        return f"kept: it is a {kind or 'device'} link, not kube-proxy's dummy"
    with IPRoute() as ipr:
        ipr.link("del", index=link["index"])
    return f"deleted (a dummy link with {addresses} addresses)"


# -- all of it -----------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    lines: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)


def _removed(result: TableResult) -> str:
    """ "removed N chains (names) and M rules jumping to them from CHAINS"."""
    fixed = [c for c in result.chains if not c.startswith(SERVICE_CHAIN_PREFIXES)]
    kinds = sorted({c.split("-")[1] for c in result.chains if c not in fixed})
    names = fixed + [
        f"{counted(len(result.chains) - len(fixed), 'per-service chain')} "
        f"{', '.join(f'KUBE-{k}-*' for k in kinds)}"
    ] * bool(kinds)
    text = f"removed {counted(len(result.chains), 'chain')} ({', '.join(names)})"
    if result.jumps:
        sources = sorted({chain for chain, _ in result.jumps})
        text += (
            f" and {counted(len(result.jumps), 'rule')} jumping to them from {', '.join(sources)}"
        )
    return text


def cleanup(node_port_range: tuple[int, int] = NODE_PORT_RANGE) -> Report:
    """Remove kube-proxy's leftovers from this network namespace; say what went."""
    report = Report()
    for tool in IPTABLES_TOOLS:
        if shutil.which(f"{tool}-save") is None:
            report.lines.append(f"{tool}: not installed, skipped")
            continue
        command, backend = tool.split("-")
        names = LEGACY_TABLES[command]
        if backend == "legacy" and (not names.exists() or not names.read_text().strip()):
            report.lines.append(f"{tool}: no tables")  # and reading would not create any
            continue
        try:
            results = clean_iptables(tool)
        except CleanupError as err:
            report.errors.append(str(err))
            continue
        if not results:
            report.lines.append(f"{tool}: no tables")
        elif not any(r.chains or r.jumps for r in results):
            report.lines.append(f"{tool}: nothing of kube-proxy's")
        for r in results:
            if r.chains or r.jumps:
                report.lines.append(f"{tool} {r.table}: {_removed(r)}")
            kubelet = [c for c in r.kept if c in KUBELET_CHAINS]
            unknown = [c for c in r.kept if c not in KUBELET_CHAINS]
            if kubelet:
                report.lines.append(f"{tool} {r.table}: kept {', '.join(kubelet)} (kubelet's)")
            if unknown:
                report.lines.append(
                    f"{tool} {r.table}: kept {', '.join(unknown)} (not known to be kube-proxy's)"
                )
    if shutil.which("nft") is None:
        report.lines.append("nftables: nft not installed, skipped")
    else:
        try:
            deleted, absent = clean_nftables()
            for table in deleted:
                report.lines.append(f"nftables: deleted table {table}")
            if absent:
                report.lines.append(f"nftables: no table {' or '.join(absent)}")
        except CleanupError as err:
            report.errors.append(str(err))
    try:
        ipvs = clean_ipvs(node_port_range)
    except (CleanupError, OSError) as err:
        report.errors.append(str(err))
    else:
        if not ipvs.available:
            report.lines.append(
                "IPVS: not in this kernel (ip_vs is not loaded), so no virtual services"
            )
        else:
            removed = ", ".join(map(str, ipvs.removed)) or "none"
            report.lines.append(
                f"IPVS: removed {counted(len(ipvs.removed), 'virtual service')}: {removed}"
            )
            if ipvs.kept:
                report.lines.append(
                    f"IPVS: kept {counted(len(ipvs.kept), 'virtual service')} that are not "
                    "kube-proxy's: " + ", ".join(map(str, ipvs.kept))
                )
        report.lines.append(f"{IPVS_LINK}: {ipvs.link}")
    return report
