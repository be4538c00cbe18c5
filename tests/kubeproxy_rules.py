"""Rule sets shaped as kube-proxy writes them, for benchmarks and migration tests.

Generated here from kube-proxy's documented layouts (no kube-proxy code):

- iptables mode: in ``nat``, PREROUTING/OUTPUT jump to KUBE-SERVICES, one rule per
  service port matching address, protocol and port, jumping to KUBE-SVC-<hash>,
  which marks off-cluster sources for masquerade and picks an endpoint chain
  KUBE-SEP-<hash> with ``-m statistic --mode random`` (probability 1/n, 1/(n-1),
  ...); KUBE-SEP marks hairpin traffic and DNATs.  The last KUBE-SERVICES rule sends
  local destinations to KUBE-NODEPORTS, whose rules go through KUBE-EXT-<hash>
  (mark for masquerade, then the service chain).  KUBE-POSTROUTING masquerades
  what carries mark 0x4000.  In ``filter``, KUBE-FORWARD drops conntrack-INVALID
  and accepts marked and established traffic; KUBE-SERVICES there would hold
  rejects for services without endpoints.
- nftables mode: one ``table ip kube-proxy`` whose ``services`` chain looks the
  packet up in the verdict map ``service-ips`` (address . protocol . port) and,
  for the node's addresses, ``service-nodeports`` (protocol . port); each service
  chain marks for masquerade and picks an endpoint chain with
  ``numgen random mod n vmap``; endpoint chains DNAT.  Filter chains check
  ``no-endpoint-services``, ``no-endpoint-nodeports``, ``firewall-ips`` and reject
  unknown ports of cluster IPs.

What matters for the figures is the work per packet: linear chain traversal in
the first, hashed verdict-map lookups in the second.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

MASQ_MARK = "0x4000"


@dataclass(frozen=True)
class ServicePort:
    """One port of one Service, with its endpoints, as kube-proxy sees it."""

    namespace: str
    name: str
    port_name: str
    cluster_ip: str
    port: int
    protocol: str = "tcp"  # "tcp" or "udp"
    node_port: int = 0  # 0: not a NodePort
    endpoints: Sequence[tuple[str, int]] = field(default_factory=tuple)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port_name}"


def _digest(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()


def _hash(prefix: str, text: str) -> str:
    return f"{prefix}-{_digest(text)[:16]}"


def _iptables_service(svc: ServicePort, cluster_cidr: str) -> tuple[list[str], list[str]]:
    """Chains and rules of one service port (its KUBE-SVC, KUBE-EXT and KUBE-SEP chains)."""
    proto = svc.protocol
    svc_chain = _hash("KUBE-SVC", svc.key + proto)
    chains = [svc_chain]
    rules = [
        f"-A {svc_chain} ! -s {cluster_cidr} -d {svc.cluster_ip}/32 -p {proto} -m comment "
        f'--comment "{svc.key} cluster IP" -m {proto} --dport {svc.port} -j KUBE-MARK-MASQ'
    ]
    if svc.node_port:
        ext_chain = _hash("KUBE-EXT", svc.key + proto)
        chains.append(ext_chain)
        rules += [
            f'-A {ext_chain} -m comment --comment "masquerade traffic for {svc.key} external '
            f'destinations" -j KUBE-MARK-MASQ',
            f"-A {ext_chain} -j {svc_chain}",
        ]
    count = len(svc.endpoints)
    for n, (ip, port) in enumerate(svc.endpoints):
        sep = _hash("KUBE-SEP", f"{svc.key}{proto}{ip}:{port}")
        chains.append(sep)
        left = count - n
        pick = f"-m statistic --mode random --probability {1 / left:.11f} " if left > 1 else ""
        rules += [
            f'-A {svc_chain} -m comment --comment "{svc.key} -> {ip}:{port}" {pick}-j {sep}',
            f'-A {sep} -s {ip}/32 -m comment --comment "{svc.key}" -j KUBE-MARK-MASQ',
            f'-A {sep} -p {proto} -m comment --comment "{svc.key}" -m {proto} -j DNAT '
            f"--to-destination {ip}:{port}",
        ]
    return chains, rules


def _iptables_entry(svc: ServicePort) -> list[str]:
    """The KUBE-SERVICES rule (and KUBE-NODEPORTS rule) leading to one service port."""
    proto = svc.protocol
    svc_chain = _hash("KUBE-SVC", svc.key + proto)
    rules = [
        f"-A KUBE-SERVICES -d {svc.cluster_ip}/32 -p {proto} -m comment --comment "
        f'"{svc.key} cluster IP" -m {proto} --dport {svc.port} -j {svc_chain}'
    ]
    if svc.node_port:
        ext_chain = _hash("KUBE-EXT", svc.key + proto)
        rules.append(
            f'-A KUBE-NODEPORTS -p {proto} -m comment --comment "{svc.key}" -m {proto} '
            f"--dport {svc.node_port} -j {ext_chain}"
        )
    return rules


def iptables_rules(services: Iterable[ServicePort], cluster_cidr: str) -> str:
    """`iptables-restore` input replacing the filter and nat tables with kube-proxy's."""
    chains: list[str] = []
    rules: list[str] = []
    entries: list[str] = []
    nodeports: list[str] = []
    for svc in services:
        svc_chains, svc_rules = _iptables_service(svc, cluster_cidr)
        chains += svc_chains
        rules += svc_rules
        for rule in _iptables_entry(svc):
            (nodeports if rule.startswith("-A KUBE-NODEPORTS") else entries).append(rule)
    filter_table = [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":KUBE-EXTERNAL-SERVICES - [0:0]",
        ":KUBE-FORWARD - [0:0]",
        ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-PROXY-FIREWALL - [0:0]",
        ":KUBE-SERVICES - [0:0]",
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer '
        'firewall" -j KUBE-PROXY-FIREWALL',
        '-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS',
        '-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible '
        'service portals" -j KUBE-EXTERNAL-SERVICES',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer '
        'firewall" -j KUBE-PROXY-FIREWALL',
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
        "-j KUBE-SERVICES",
        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible '
        'service portals" -j KUBE-EXTERNAL-SERVICES',
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
        "-j KUBE-SERVICES",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark '
        f"{MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack '
        "--ctstate RELATED,ESTABLISHED -j ACCEPT",
        "COMMIT",
    ]
    nat_table = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
        ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        ":KUBE-SERVICES - [0:0]",
        *(f":{chain} - [0:0]" for chain in chains),
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}",
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
        *entries,
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be '
        'the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
        *nodeports,
        *rules,
        "COMMIT",
    ]
    return "\n".join([*filter_table, *nat_table, ""])


def iptables_service_rewrite(svc: ServicePort, cluster_cidr: str) -> str:
    """`iptables-restore --noflush` input rewriting one service's chains (an endpoint change).

    The chains are declared again, which flushes them, then refilled; KUBE-SERVICES
    keeps its jump.  Chains of endpoints that left stay behind here, where kube-proxy
    would delete them; the figure is about rewriting the service.
    """
    chains, rules = _iptables_service(svc, cluster_cidr)
    return "\n".join(["*nat", *(f":{c} - [0:0]" for c in chains), *rules, "COMMIT", ""])


def _nft_chain(prefix: str, text: str) -> str:
    return f"{prefix}-{_digest(text)[:8]}-{text}"


NFT_TABLE = "ip kube-proxy"
VERDICT_KEY = "ipv4_addr . inet_proto . inet_service : verdict"
PORT_KEY = "inet_proto . inet_service : verdict"


def nftables_base(node_ips: Sequence[str]) -> str:
    """`nft -f` input replacing ``table ip kube-proxy`` with its fixed part and empty maps."""
    t = NFT_TABLE
    base_chains = {
        "filter-prerouting": (
            "filter hook prerouting priority dstnat - 10",
            ["ct state new jump firewall-check"],
        ),
        "filter-input": (
            "filter hook input priority -110",
            [
                "ct state new jump nodeport-endpoints-check",
                "ct state new jump service-endpoints-check",
            ],
        ),
        "filter-forward": (
            "filter hook forward priority -110",
            ["ct state new jump service-endpoints-check", "ct state new jump cluster-ips-check"],
        ),
        "filter-output": (
            "filter hook output priority -110",
            ["ct state new jump service-endpoints-check", "ct state new jump cluster-ips-check"],
        ),
        "nat-prerouting": ("nat hook prerouting priority dstnat", ["jump services"]),
        "nat-output": ("nat hook output priority -100", ["jump services"]),
        "nat-postrouting": ("nat hook postrouting priority srcnat", ["jump masquerading"]),
    }
    chains = {
        "firewall-check": ["ip daddr . meta l4proto . th dport vmap @firewall-ips"],
        "service-endpoints-check": [
            "ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
        ],
        "nodeport-endpoints-check": [
            "ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"
        ],
        "cluster-ips-check": ["ip daddr @cluster-ips reject"],
        "masquerading": [
            f"meta mark & {MASQ_MARK} == 0 return",
            f"meta mark set meta mark ^ {MASQ_MARK}",
            "masquerade fully-random",
        ],
        "mark-for-masquerade": [f"meta mark set meta mark | {MASQ_MARK}"],
        "services": [
            "ip daddr . meta l4proto . th dport vmap @service-ips",
            "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        ],
    }
    lines = [
        f"add table {t}",
        f"delete table {t}",
        f'add table {t} {{ comment "rules for kube-proxy" ; }}',
        f"add set {t} cluster-ips {{ type ipv4_addr ; }}",
        f"add set {t} nodeport-ips {{ type ipv4_addr ; }}",
        f"add map {t} service-ips {{ type {VERDICT_KEY} ; }}",
        f"add map {t} service-nodeports {{ type {PORT_KEY} ; }}",
        f"add map {t} no-endpoint-services {{ type {VERDICT_KEY} ; }}",
        f"add map {t} no-endpoint-nodeports {{ type {PORT_KEY} ; }}",
        f"add map {t} firewall-ips {{ type {VERDICT_KEY} ; }}",
    ]
    if node_ips:
        lines.append(f"add element {t} nodeport-ips {{ {', '.join(node_ips)} }}")
    lines += [f"add chain {t} {name}" for name in chains]
    for name, rules in chains.items():
        lines += [f"add rule {t} {name} {rule}" for rule in rules]
    for name, (hook, rules) in base_chains.items():
        lines.append(f"add chain {t} {name} {{ type {hook} ; policy accept ; }}")
        lines += [f"add rule {t} {name} {rule}" for rule in rules]
    return "\n".join([*lines, ""])


def nftables_services(
    services: Iterable[ServicePort], cluster_cidr: str, batch: int = 500
) -> Iterator[str]:
    """`nft -f` inputs adding service ports to the table, `batch` service ports each.

    One transaction with every chain of 10,000 services takes nft minutes (its cost
    grows faster than the number of chains); the same rules in batches take seconds.
    The rule set that results is the same.
    """
    lines: list[str] = []
    count = 0
    for svc in services:
        lines += _nft_service(svc, cluster_cidr)
        count += 1
        if count == batch:
            yield "\n".join([*lines, ""])
            lines, count = [], 0
    if lines:
        yield "\n".join([*lines, ""])


def _nft_service(svc: ServicePort, cluster_cidr: str) -> list[str]:
    t = NFT_TABLE
    proto = svc.protocol
    base = f"{svc.namespace}/{svc.name}/{proto}/{svc.port_name}"
    svc_chain = _nft_chain("service", base)
    endpoints = [
        (_nft_chain("endpoint", f"{base}__{ip}/{port}"), ip, port) for ip, port in svc.endpoints
    ]
    lines = [f"add chain {t} {svc_chain}", *(f"add chain {t} {chain}" for chain, _, _ in endpoints)]
    for chain, ip, port in endpoints:
        lines += [
            f"add rule {t} {chain} ip saddr {ip} jump mark-for-masquerade",
            f"add rule {t} {chain} meta l4proto {proto} dnat to {ip}:{port}",
        ]
    lines.append(
        f"add rule {t} {svc_chain} ip daddr {svc.cluster_ip} {proto} dport {svc.port} "
        f"ip saddr != {cluster_cidr} jump mark-for-masquerade"
    )
    if endpoints:
        picks = ", ".join(f"{n} : goto {chain}" for n, (chain, _, _) in enumerate(endpoints))
        lines.append(
            f"add rule {t} {svc_chain} numgen random mod {len(endpoints)} vmap {{ {picks} }}"
        )
    lines += [
        f"add element {t} cluster-ips {{ {svc.cluster_ip} }}",
        f"add element {t} service-ips "
        f"{{ {svc.cluster_ip} . {proto} . {svc.port} : goto {svc_chain} }}",
    ]
    if svc.node_port:
        ext_chain = _nft_chain("external", base)
        lines += [
            f"add chain {t} {ext_chain}",
            f"add rule {t} {ext_chain} jump mark-for-masquerade",
            f"add rule {t} {ext_chain} goto {svc_chain}",
            f"add element {t} service-nodeports {{ {proto} . {svc.node_port} : goto {ext_chain} }}",
        ]
    return lines


def nftables_rules(
    services: Iterable[ServicePort], cluster_cidr: str, node_ips: Sequence[str]
) -> str:
    """One `nft -f` input with the whole table (for small rule sets)."""
    return nftables_base(node_ips) + "".join(nftables_services(services, cluster_cidr))


# ------------------------------------------------------- what kube-proxy masquerades

FRONTEND_KINDS = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalIP")
CLIENTS = ("pod", "outside", "node", "hairpin")


def expected_flow(
    kind: str,
    client: str,
    *,
    etp_local: bool,
    itp_local: bool,
    masquerade_all: bool,
    detector: bool = True,
) -> tuple[str, bool]:
    """(which endpoints serve the new connection: "all" or "local", is it masqueraded).

    kube-proxy's iptables and nftables rules, restated from their documented
    behaviour (see docs/datapath.md) for a `kind` of FRONTEND_KINDS and a
    `client` of CLIENTS ("hairpin": a pod that is the only endpoint it can
    land on; "pod": a pod of the cluster CIDR that is no endpoint):

    - a ClusterIP: the local endpoints with internalTrafficPolicy Local, else
      all; masqueraded when masqueradeAll is on (its rule matches the
      ClusterIP only), else when the local traffic detector is on and the
      client is not a pod;
    - a NodePort, LoadBalancer IP or externalIP (internalTrafficPolicy does
      not apply): externalTrafficPolicy Cluster sends everyone to all
      endpoints, masqueraded; Local sends pods (when the detector knows them)
      to all endpoints unmasqueraded, the node itself to all endpoints
      masqueraded, and anyone else to the local endpoints unmasqueraded;
      masqueradeAll changes none of it;
    - hairpin is always masqueraded (the endpoint chain's own rule).
    """
    if kind not in FRONTEND_KINDS or client not in CLIENTS:
        raise ValueError(f"unknown frontend kind {kind!r} or client {client!r}")
    pod = client in ("pod", "hairpin") and detector
    if kind == "ClusterIP":
        endpoints = "local" if itp_local else "all"
        masq = masquerade_all or (detector and not pod)
    elif not etp_local:
        endpoints, masq = "all", True
    elif pod:
        endpoints, masq = "all", False
    elif client == "node":
        endpoints, masq = "all", True
    else:
        endpoints, masq = "local", False
    return endpoints, masq or client == "hairpin"
