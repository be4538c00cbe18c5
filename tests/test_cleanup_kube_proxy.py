"""`lbctl cleanup --kube-proxy` on a kube-proxy-shaped node, inside a test namespace.

A node namespace gets kube-proxy's iptables rule set (tests/kubeproxy_rules.py)
in both iptables backends and both families, its nftables tables, a
kube-ipvs0 dummy link, and next to them rules, chains, tables and links that
belong to others (kubelet, a CNI, the admin).  A reference namespace gets
only the others' part.  After the cleanup, every iptables table of the node
must read as the reference's, rule for rule: kube-proxy's are gone, nothing
else is.  IPVS itself is not in this kernel; the command must say so.
Nothing here touches the host's namespace: lbctl runs under nsenter.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbctl.cli.cleanup import jump_target, kube_proxy_services
from lbctl.datapath.ipvs.owned import VirtualService
from tests.agent_proc import lbctl
from tests.kubeproxy_rules import ServicePort, iptables_rules, nftables_base, nftables_services
from tests.netlab import Netns

pytestmark = pytest.mark.netns

CLUSTER_CIDR = "10.244.0.0/16"
SERVICES = [
    ServicePort("default", "web", "http", "10.96.0.10", 80, "tcp", 30080, (("10.244.0.20", 8080),)),
    ServicePort(
        "default",
        "web2",
        "http",
        "10.96.0.11",
        80,
        "tcp",
        30081,
        (("10.244.0.21", 8080), ("10.244.0.22", 8080)),
    ),
    ServicePort("kube-system", "dns", "dns", "10.96.0.53", 53, "udp", 0, (("10.244.0.30", 53),)),
    ServicePort("default", "empty", "https", "10.96.0.99", 443, "tcp", 0, ()),
]
IPV4_TOOLS = ("iptables-legacy", "iptables-nft")
TOOLS = (*IPV4_TOOLS, "ip6tables-legacy", "ip6tables-nft")

# kube-proxy's canaries, which iptables_rules() leaves out, and its IPv6 rules.
CANARIES = """*mangle
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*nat
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:KUBE-PROXY-CANARY - [0:0]
COMMIT
"""
KUBE_PROXY_V6 = """*nat
:KUBE-SERVICES - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SVC-6WEBWEBWEBWEBWEB - [0:0]
:KUBE-SEP-6WEBPODPODPODPOD - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MASQUERADE --random-fully
-A KUBE-SERVICES -d fd00:96::10/128 -p tcp -m tcp --dport 80 -j KUBE-SVC-6WEBWEBWEBWEBWEB
-A KUBE-SVC-6WEBWEBWEBWEBWEB -j KUBE-SEP-6WEBPODPODPODPOD
-A KUBE-SEP-6WEBPODPODPODPOD -p tcp -m tcp -j DNAT --to-destination [fd00:244::20]:8080
COMMIT
*filter
:KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A OUTPUT -m conntrack --ctstate NEW -j KUBE-SERVICES
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
"""


def others(v6: bool) -> str:
    """Rules that are not kube-proxy's, in the chains kube-proxy also uses and beside them.

    kubelet's KUBE-FIREWALL and KUBE-KUBELET-CANARY; a CNI's hostport chain and
    masquerade rule; an admin's chains, a rule appended and one inserted in
    FORWARD around kube-proxy's, and a comment that merely names a KUBE chain.
    """
    net, pod, local = (
        ("fd00:50::/64", "[fd00:244::40]:443", "::1/128")
        if v6
        else ("192.168.50.0/24", "10.244.0.40:443", "127.0.0.0/8")
    )
    return f"""*filter
:KUBE-FIREWALL - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:ADMIN-INPUT - [0:0]
-A INPUT -j KUBE-FIREWALL
-A OUTPUT -j KUBE-FIREWALL
-A INPUT -j ADMIN-INPUT
-A KUBE-FIREWALL ! -s {local} -d {local} -m comment --comment "block localnet" -j DROP
-A FORWARD -s {net} -j ACCEPT
-I FORWARD 1 -i eth9 -j ADMIN-INPUT
-A ADMIN-INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A ADMIN-INPUT -m comment --comment "not a jump: -j KUBE-SERVICES" -j RETURN
COMMIT
*nat
:KUBE-KUBELET-CANARY - [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A POSTROUTING -s {net} -j MASQUERADE
-A CNI-HOSTPORT-DNAT -p tcp -m tcp --dport 8443 -j DNAT --to-destination {pod}
COMMIT
*mangle
:KUBE-KUBELET-CANARY - [0:0]
:ADMIN-MARKS - [0:0]
-A PREROUTING -j ADMIN-MARKS
-A ADMIN-MARKS -p udp -m udp --dport 4789 -j MARK --set-xmark 0x100/0x100
COMMIT
"""


KUBE_PROXY_V6_NFT = """add table ip6 kube-proxy
add chain ip6 kube-proxy services
add chain ip6 kube-proxy nat-prerouting { type nat hook prerouting priority dstnat ; }
add rule ip6 kube-proxy nat-prerouting jump services
"""
OTHER_NFT = """add table inet filter
add chain inet filter input { type filter hook input priority 0 ; policy accept ; }
add rule inet filter input tcp dport 22 accept
add table ip lab-nat
add chain ip lab-nat post { type nat hook postrouting priority srcnat ; }
add rule ip lab-nat post ip saddr 192.168.60.0/24 masquerade
"""


def feed(ns: Netns, args: list[str], text: str) -> None:
    """Run a restore command in the namespace with `text` on its standard input."""
    done = subprocess.run(
        ["ip", "netns", "exec", ns.name, *args],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr}\n{text}"


def build_kube_proxy(ns: Netns) -> None:
    for tool in IPV4_TOOLS:
        feed(ns, [f"{tool}-restore"], iptables_rules(SERVICES, CLUSTER_CIDR))
        feed(ns, [f"{tool}-restore", "--noflush"], CANARIES)
    for tool in TOOLS[2:]:
        feed(ns, [f"{tool}-restore", "--noflush"], KUBE_PROXY_V6 + CANARIES)
    feed(ns, ["nft", "-f", "-"], nftables_base(["192.168.1.10"]))
    for batch in nftables_services(SERVICES, CLUSTER_CIDR):
        feed(ns, ["nft", "-f", "-"], batch)
    feed(ns, ["nft", "-f", "-"], KUBE_PROXY_V6_NFT)


def build_others(ns: Netns) -> None:
    for tool in TOOLS:
        feed(ns, [f"{tool}-restore", "--noflush"], others(v6=tool.startswith("ip6")))
    feed(ns, ["nft", "-f", "-"], OTHER_NFT)
    ns.ip("link", "add", "keep0", "type", "bridge")


def saved(ns: Netns, tool: str) -> dict[str, dict[str, list[str]]]:
    """Each table's user chains and every chain's rules, in order; counters and
    built-in chain declarations left out (iptables-nft declares built-ins only when used)."""
    text = ns.run(f"{tool}-save").stdout
    tables: dict[str, dict[str, list[str]]] = {}
    chains: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            chains = tables.setdefault(line[1:], {})
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            if policy == "-":
                chains.setdefault(name, [])
        elif line.startswith("-A "):
            chains.setdefault(line.split()[1], []).append(line)
    return tables


def section(text: str, table: str) -> str:
    """The lines of every part of an iptables-restore input that writes `table`."""
    return "".join(m.group(1) for m in re.finditer(rf"^\*{table}\n(.*?)^COMMIT", text, re.S | re.M))


def declared(text: str, table: str) -> set[str]:
    """User chains an iptables-restore input declares in one table."""
    return set(re.findall(r"^:(\S+) - ", section(text, table), re.M))


def nft_tables(ns: Netns) -> set[str]:
    return {
        line.removeprefix("table ")
        for line in ns.run("nft", "list", "tables").stdout.split("\n")
        if line
    }


@contextlib.contextmanager
def namespace(prefix: str) -> Iterator[Netns]:
    ns = Netns.create(prefix)
    try:
        yield ns
    finally:
        ns.delete()


@pytest.fixture
def node() -> Iterator[Netns]:
    with namespace("kpnode") as ns:
        yield ns


@pytest.fixture
def reference() -> Iterator[Netns]:
    """A namespace with only the others' rules: what the node must look like afterwards."""
    with namespace("kpref") as ns:
        yield ns


def test_removes_kube_proxys_rules_and_nothing_else(node: Netns, reference: Netns) -> None:
    build_kube_proxy(node)
    build_others(node)
    build_others(reference)
    tables_before = nft_tables(node)
    assert {"ip kube-proxy", "ip6 kube-proxy", "inet filter", "ip lab-nat"} <= tables_before
    inet_filter = node.run("nft", "list", "table", "inet", "filter").stdout
    for tool in TOOLS:  # the node really has kube-proxy's rules before
        assert "KUBE-SERVICES" in saved(node, tool)["nat"], tool
    assert saved(node, "iptables-nft") != saved(reference, "iptables-nft")

    out = lbctl("cleanup", "--kube-proxy", node=node, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""

    for tool in TOOLS:
        assert saved(node, tool) == saved(reference, tool), tool
    assert nft_tables(node) == tables_before - {"ip kube-proxy", "ip6 kube-proxy"}
    assert node.run("nft", "list", "table", "inet", "filter").stdout == inet_filter
    assert "keep0" in node.ip("-o", "link", "show").stdout

    # What it says it removed is what the rule sets held.
    lines = out.stdout.splitlines()
    kube_v4 = iptables_rules(SERVICES, CLUSTER_CIDR)
    for tool in TOOLS:
        source = kube_v4 if tool in IPV4_TOOLS else KUBE_PROXY_V6
        for table in ("nat", "filter", "mangle"):
            chains = declared(source + CANARIES, table)
            jumps = len(re.findall(r"^-A [A-Z]+ .*-j KUBE-", section(source, table), re.M))
            line = next(x for x in lines if x.startswith(f"{tool} {table}: removed"))
            assert re.search(rf"removed {len(chains)} chains? \(", line), line
            assert f" and {jumps} rule" in line if jumps else "jumping" not in line, line
        kept = next(x for x in lines if x.startswith(f"{tool} filter: kept"))
        assert kept == f"{tool} filter: kept KUBE-FIREWALL, KUBE-KUBELET-CANARY (kubelet's)"
    assert "nftables: deleted table ip kube-proxy" in lines
    assert "nftables: deleted table ip6 kube-proxy" in lines
    if Path("/proc/net/ip_vs").exists():  # a kernel with IPVS (User-Mode Linux, later)
        assert any(x.startswith("IPVS: removed") for x in lines), out.stdout
    else:
        assert "IPVS: not in this kernel (ip_vs is not loaded), so no virtual services" in lines
    assert "kube-ipvs0: absent" in lines

    # A second run finds nothing and changes nothing.
    again = lbctl("cleanup", "--kube-proxy", node=node, check=False)
    assert again.returncode == 0, again.stderr
    for tool in TOOLS:
        assert f"{tool}: nothing of kube-proxy's" in again.stdout.splitlines()
        assert saved(node, tool) == saved(reference, tool), tool
    assert "nftables: no table ip kube-proxy or ip6 kube-proxy" in again.stdout
    assert "kube-ipvs0: absent" in again.stdout


def add_kube_ipvs0(node: Netns, kind: str) -> None:
    node.ip("link", "add", "kube-ipvs0", "type", kind)
    for service in SERVICES:
        node.ip("address", "add", f"{service.cluster_ip}/32", "dev", "kube-ipvs0")


def test_the_kube_ipvs0_dummy_goes(node: Netns) -> None:
    if node.ip("link", "add", "probe0", "type", "dummy", check=False).returncode != 0:
        pytest.skip("this kernel has no dummy links (CONFIG_DUMMY); runs in User-Mode Linux")
    node.ip("link", "del", "probe0")
    add_kube_ipvs0(node, "dummy")
    out = lbctl("cleanup", "--kube-proxy", node=node)
    assert f"kube-ipvs0: deleted (a dummy link with {len(SERVICES)} addresses)" in out.stdout
    assert "kube-ipvs0" not in node.ip("-o", "link", "show").stdout


def test_a_kube_ipvs0_that_is_no_dummy_stays(node: Netns) -> None:
    add_kube_ipvs0(node, "bridge")
    out = lbctl("cleanup", "--kube-proxy", node=node)
    assert "kube-ipvs0: kept: it is a bridge link, not kube-proxy's dummy" in out.stdout
    assert "kube-ipvs0" in node.ip("-o", "link", "show").stdout


def test_a_bad_node_port_range_is_a_usage_error(node: Netns) -> None:
    args = ("cleanup", "--kube-proxy", "--node-port-range", "32767-30000")
    out = lbctl(*args, node=node, check=False)
    assert out.returncode == 2
    assert "write it as kube-apiserver's --service-node-port-range, e.g. 30000-32767" in out.stderr


# -- which rules and IPVS services are kube-proxy's (pure rules, no kernel needed) ---------


def test_a_jump_is_read_from_the_target_not_from_a_comment() -> None:
    assert jump_target('-A X -m comment --comment "not a jump: -j KUBE-SERVICES" -j RETURN') == (
        "RETURN"
    )
    assert jump_target("-A PREROUTING -g KUBE-SERVICES") == "KUBE-SERVICES"
    assert jump_target('-A X -m comment --comment "a \\"quoted\\" -j word"') is None


def test_ipvs_services_of_kube_proxy() -> None:
    """IPVS is not in this kernel: the choice is tested on its own (the netlink part
    runs in User-Mode Linux later)."""
    tcp, udp = 6, 17
    cluster = VirtualService(tcp, "10.96.0.10", 80)
    dns = VirtualService(udp, "10.96.0.53", 53)
    nodeport = VirtualService(tcp, "192.168.1.10", 30080)
    admin = VirtualService(tcp, "192.168.1.10", 8080)  # a node address, outside the range
    elsewhere = VirtualService(tcp, "203.0.113.5", 30080)  # in the range, not a node address
    marked = VirtualService(0, "", 0, fwmark=7)
    services = [cluster, dns, nodeport, admin, elsewhere, marked]
    link = {"10.96.0.10", "10.96.0.53"}
    node_addresses = {"192.168.1.10", "127.0.0.1"}
    assert kube_proxy_services(services, link, node_addresses) == [cluster, dns, nodeport]
    # without kube-ipvs0 nothing shows kube-proxy ran in IPVS mode here
    assert kube_proxy_services(services, None, node_addresses) == []
    assert kube_proxy_services(services, link, node_addresses, (8000, 9000)) == [
        cluster,
        dns,
        admin,
    ]
    assert str(nodeport) == "TCP 192.168.1.10:30080" and str(marked) == "fwmark 7"
