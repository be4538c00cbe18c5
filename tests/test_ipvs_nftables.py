"""The IPVS datapath's nftables table with real packets, on THIS machine's kernel.

What IPVS cannot do alone (masquerade, hairpin, loadBalancerSourceRanges,
the drops of externalTrafficPolicy Local) is the agent's `table ip
lbctl_ipvs`.  It is written here by the agent's own code path: the real
planner turns manifests into frontends, `ipvs.table_content` makes the
table's content from them and `nftables.TableWriter` writes it whole, as
IpvsDatapath's first and periodic syncs do; the incremental tests at the end
drive `contributions.TableSync` with the planner's diffs, as
`IpvsDatapath.apply` does.

A STAND-IN FOR IPVS: this machine's kernel has no IPVS (CONFIG_IP_VS), and
the User-Mode Linux kernel that has IPVS (tests/test_ipvs.py) refuses every
nftables table of family ip (Debian builds it without CONFIG_NF_TABLES_IPV4),
so no kernel here runs both.  The test therefore stands in for IPVS's
destination NAT with a separate table it owns (`ip lbctl_test_standin`), one
`dnat` per frontend to a backend the plan chose, at the points where IPVS
translates: after the agent's marking chains (prerouting at mangle priority,
output at mangle) and before its postrouting NAT chain.  Everything the
agent's table decides (what to mark, drop and masquerade) is the real table
acting on real TCP and UDP packets between test namespaces.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbctl.datapath import NodeConfig
from lbctl.datapath.ipvs import datapath as ipvs
from lbctl.datapath.ipvs import nftables
from lbctl.datapath.ipvs.contributions import TableSync
from lbctl.model import ServiceTable
from lbctl.plan.planner import Frontend, NodeContext, Planner
from lbctl.sources.manifests import ManifestSource
from tests import k8s_yaml
from tests.agent_proc import lbctl
from tests.manifest_plans import ManifestPlans, Unscannable, touched
from tests.netlab import (
    Cluster,
    Lab,
    Netns,
    RequestError,
    TcpServer,
    UdpServer,
    build_cluster,
    tcp_request,
    udp_request,
    veth,
)

pytestmark = pytest.mark.netns

WEB, LOCAL_VIP, LB_VIP, REMOTE_VIP = "10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13"
LB_IP = "192.168.90.10"  # the LoadBalancer's ingress IP, routed to the node
NODE_IP, NEAR_IP = "192.168.77.1", "192.168.77.2"  # NEAR is inside the source range
FAR_NODE_IP, FAR_IP = "192.168.78.1", "192.168.78.2"  # FAR is outside it
GATEWAY = "10.244.0.1"  # the node's address towards every pod (tests/netlab.py)
CLUSTER_CIDR = "10.244.0.0/16"
WEB_TCP, WEB_UDP, LOCAL_PORT, REMOTE_PORT = 30080, 30053, 30081, 30082


def manifests(pods: list[str]) -> list[dict[str, Any]]:
    web = k8s_yaml.service("web", WEB, [("http", "TCP", 80), ("dns", "UDP", 53)], type="NodePort")
    web["spec"]["ports"][0]["nodePort"] = WEB_TCP
    web["spec"]["ports"][1]["nodePort"] = WEB_UDP
    local = k8s_yaml.service(
        "local", LOCAL_VIP, [("http", "TCP", 80)], type="NodePort", externalTrafficPolicy="Local"
    )
    local["spec"]["ports"][0]["nodePort"] = LOCAL_PORT
    remote = k8s_yaml.service(
        "remote", REMOTE_VIP, [("http", "TCP", 80)], type="NodePort", externalTrafficPolicy="Local"
    )
    remote["spec"]["ports"][0]["nodePort"] = REMOTE_PORT
    lb = k8s_yaml.service(
        "lb",
        LB_VIP,
        [("http", "TCP", 80)],
        type="LoadBalancer",
        loadBalancerSourceRanges=["192.168.77.0/24"],
    )
    lb["spec"]["ports"][0]["nodePort"] = 30090
    lb["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    tcp, udp = ("http", "TCP", 8080), ("dns", "UDP", 5353)
    return [
        web,
        k8s_yaml.endpoint_slice("web", pods[:1], [tcp, udp]),
        local,
        k8s_yaml.endpoint_slice("local", pods[1:2], [tcp]),
        remote,  # its only endpoint is on another node: outside clients are dropped
        k8s_yaml.endpoint_slice("remote", pods[1:2], [tcp], nodes={pods[1]: "other"}),
        lb,
        k8s_yaml.endpoint_slice("lb", pods[:1], [tcp]),
    ]


def plan(directory: Path) -> dict[Any, Frontend]:
    """The frontends the agent would plan on node "node" for these manifests."""
    source = ManifestSource(directory, node_name="node")
    table = ServiceTable()
    planner = Planner()
    addresses = tuple(ipaddress.IPv4Address(a) for a in (NODE_IP, FAR_NODE_IP))
    planner.set_node(table, NodeContext("node", addresses))
    planner.update(table, source.poll(table))
    return planner.frontends()


def standin_script(frontends: dict[Any, Frontend]) -> str:
    """IPVS's DNAT, stood in for: each (address, protocol, port) to the first backend."""
    elements = []
    for key in sorted({ipvs.vs_key(k) for k in frontends}):
        fe = ipvs.deciding(frontends, key)
        if fe is None or not fe.backends:
            continue  # IPVS would have no real server either
        backend = fe.backends[0]
        proto = fe.key.protocol.name.lower()
        elements.append(f"{key[0]} . {proto} . {key[1]} : {backend.address} . {backend.port}")
    dnat = "dnat ip to ip daddr . meta l4proto . th dport map @vs;"
    return (
        "table ip lbctl_test_standin {\n"
        "  map vs { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; "
        f"elements = {{ {', '.join(elements)} }}; }}\n"
        # where IPVS translates: after the agent's mangle-priority chains
        f"  chain prerouting {{ type nat hook prerouting priority dstnat; {dnat} }}\n"
        f"  chain output {{ type nat hook output priority -100; {dnat} }}\n"
        "}\n"
    )


@dataclasses.dataclass
class Env:
    cluster: Cluster
    near: Netns
    far: Netns
    frontends: dict[Any, Frontend]
    writer: nftables.TableWriter
    node_conf: NodeConfig
    unmasqueraded: str  # the address a backend saw before the agent's table existed

    def write(self, frontends: dict[Any, Frontend] | None = None) -> list[str]:
        """The agent's own write, run in the node's namespace."""
        with self.cluster.node.entered():
            content = ipvs.table_content(
                self.frontends if frontends is None else frontends, self.node_conf
            )
            return self.writer.write(content)

    @property
    def pods(self) -> list[str]:
        return [p.ip for p in self.cluster.pods]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("ipvs-nft")
    with Lab() as lab:
        cluster = build_cluster(lab, pods=2, invalid_drop_rule=False)
        node = cluster.node
        near, far = lab.netns("near"), lab.netns("far")
        for ns, node_if, node_ip, ip in (
            (near, "ext0", NODE_IP, NEAR_IP),
            (far, "ext1", FAR_NODE_IP, FAR_IP),
        ):
            veth(node, node_if, ns, "eth0")
            node.ip("addr", "add", f"{node_ip}/24", "dev", node_if)
            ns.ip("addr", "add", f"{ip}/24", "dev", "eth0")
            ns.ip("route", "add", "default", "via", node_ip)
        for pod in cluster.pods:
            TcpServer(pod, 8080)
            UdpServer(pod, 5353)
        k8s_yaml.write(tmp / "all.yaml", *manifests([p.ip for p in cluster.pods]))
        frontends = plan(tmp)
        done = subprocess.run(
            ["ip", "netns", "exec", node.name, "nft", "-f", "-"],
            input=standin_script(frontends),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        # control: with the stand-in alone, an outside client is not masqueraded
        before = tcp_request(near, NODE_IP, WEB_TCP).peer_ip
        conf = NodeConfig(cluster_cidrs=(ipaddress.IPv4Network(CLUSTER_CIDR),))
        env = Env(cluster, near, far, frontends, nftables.TableWriter(), conf, before)
        assert env.write() == []
        yield env


def test_the_plan_fills_the_agents_sets(env: Env) -> None:
    with env.cluster.node.entered():
        sets = nftables.read()
    assert sets is not None
    assert sets["cluster_cidrs"] == [CLUSTER_CIDR]
    assert f"{NODE_IP} . tcp . {WEB_TCP}" in sets["external"]
    assert f"{FAR_NODE_IP} . udp . {WEB_UDP}" in sets["external"]
    assert f"{LB_IP} . tcp . 80" in sets["external"]
    assert not any(f". {LOCAL_PORT}" in e for e in sets["external"]), "Local: not masqueraded"
    assert sets["no_local"] == [f"{a} . tcp . {REMOTE_PORT}" for a in (NODE_IP, FAR_NODE_IP)]
    assert sets["allowed"] == [f"{LB_IP} . tcp . 80 . 192.168.77.0/24"]


def test_maps_dump_decodes_the_sets_the_agent_wrote(env: Env) -> None:
    """`lbctl maps dump` in IPVS mode, its nftables half: the User-Mode Linux kernel
    refuses the table (its test shows the IPVS half), this kernel has no IPVS, so
    the dump here finds the table alone and must decode every set of it."""
    data = json.loads(lbctl("maps", "dump", "-o", "json", node=env.cluster.node).stdout)
    assert data["mode"] == "ipvs" and data["ipvs_loaded"] is False
    assert data["virtual_services"] == []  # no IPVS in this kernel
    sets = data["nftables"]["sets"]
    with env.cluster.node.entered():
        assert sets == nftables.read()  # decoded as the kernel holds them
    assert sets["cluster_cidrs"] == [CLUSTER_CIDR]
    assert f"{NODE_IP} . tcp . {WEB_TCP}" in sets["external"]
    assert sets["allowed"] == [f"{LB_IP} . tcp . 80 . 192.168.77.0/24"]
    table = lbctl("maps", "dump", node=env.cluster.node).stdout
    assert "mode: ipvs" in table and "ip_vs is not loaded" in table
    row = next(line for line in table.splitlines() if line.startswith("allowed "))
    assert f"{LB_IP} . tcp . 80 . 192.168.77.0/24" in row


def test_outside_traffic_to_a_node_port_is_masqueraded(env: Env) -> None:
    assert env.unmasqueraded == NEAR_IP, "the stand-in alone must not masquerade"
    for client, address in ((env.near, NODE_IP), (env.far, FAR_NODE_IP)):
        tcp = tcp_request(client, address, WEB_TCP)
        assert (tcp.pod, tcp.peer_ip) == ("pod0", GATEWAY), tcp
        udp = udp_request(client, address, WEB_UDP)
        assert (udp.pod, udp.peer_ip) == ("pod0", GATEWAY), udp
    # a pod (inside the cluster CIDR) reaching the ClusterIP keeps its address
    assert tcp_request(env.cluster.client, WEB, 80).peer_ip == env.cluster.client.ip
    assert udp_request(env.cluster.client, WEB, 53).peer_ip == env.cluster.client.ip


def test_a_pod_reaching_itself_through_a_service_is_masqueraded(env: Env) -> None:
    pod0 = env.cluster.pods[0]
    reply = tcp_request(pod0, WEB, 80)
    assert (reply.pod, reply.peer_ip) == ("pod0", GATEWAY), reply
    reply = udp_request(pod0, WEB, 53)
    assert (reply.pod, reply.peer_ip) == ("pod0", GATEWAY), reply


def test_load_balancer_source_ranges(env: Env) -> None:
    inside = tcp_request(env.near, LB_IP, 80)
    assert (inside.pod, inside.peer_ip) == ("pod0", GATEWAY), inside  # allowed, masqueraded
    started = time.monotonic()
    with pytest.raises(RequestError, match="timed out"):
        tcp_request(env.far, LB_IP, 80, timeout=1.0)  # dropped, not refused
    assert time.monotonic() - started >= 0.9
    # the same client reaches an unranged frontend: only the range stopped it
    assert tcp_request(env.far, FAR_NODE_IP, WEB_TCP).pod == "pod0"


def test_external_traffic_policy_local_keeps_the_client_address(env: Env) -> None:
    for client, address, ip in ((env.near, NODE_IP, NEAR_IP), (env.far, FAR_NODE_IP, FAR_IP)):
        reply = tcp_request(client, address, LOCAL_PORT)
        assert (reply.pod, reply.peer_ip) == ("pod1", ip), reply
    # no endpoint on this node: outside clients are dropped (without the table the
    # node itself would answer with a reset: nothing listens on the port)
    with pytest.raises(RequestError, match="timed out"):
        tcp_request(env.near, NODE_IP, REMOTE_PORT, timeout=1.0)


def test_masquerade_all_masquerades_clusterips_not_local_policy(env: Env) -> None:
    """--masquerade-all as kube-proxy's masqueradeAll: every client of a ClusterIP is
    masqueraded, but externalTrafficPolicy Local still keeps the address of outside
    clients and pods (kube-proxy's masqueradeAll rule matches the ClusterIP only)."""
    all_conf = dataclasses.replace(env.node_conf, masquerade_all=True)
    with env.cluster.node.entered():
        assert env.writer.write(ipvs.table_content(env.frontends, all_conf)) == []
    try:
        pod = env.cluster.client
        # a pod reaching a ClusterIP: masqueraded now (it keeps its address without the flag)
        assert tcp_request(pod, WEB, 80).peer_ip == GATEWAY
        assert udp_request(pod, WEB, 53).peer_ip == GATEWAY
        # policy Cluster from outside: masqueraded either way
        assert tcp_request(env.near, NODE_IP, WEB_TCP).peer_ip == GATEWAY
        # policy Local: the outside client and the pod keep their own address
        for client, ip in ((env.near, NEAR_IP), (env.far, FAR_IP)):
            reply = tcp_request(client, NODE_IP, LOCAL_PORT)
            assert (reply.pod, reply.peer_ip) == ("pod1", ip), reply
        reply = tcp_request(pod, NODE_IP, LOCAL_PORT)
        assert (reply.pod, reply.peer_ip) == ("pod1", pod.ip), reply
        # hairpin: always
        assert tcp_request(env.cluster.pods[0], WEB, 80).peer_ip == GATEWAY
    finally:
        assert env.write() == []  # the module's table again
    assert tcp_request(env.cluster.client, WEB, 80).peer_ip == env.cluster.client.ip


def test_the_table_is_rewritten_in_one_transaction(env: Env) -> None:
    """`nft monitor` prints one `# new generation` line per committed transaction."""
    node = env.cluster.node
    monitor = subprocess.Popen(
        ["ip", "netns", "exec", node.name, "nft", "monitor"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(0.5)  # subscribed
        fewer = {k: fe for k, fe in env.frontends.items() if str(fe.service) != "test/lb"}
        assert env.write(fewer) == []
        assert env.write(fewer) == [], "an unchanged content is not written again"
        assert env.write() == []
        time.sleep(0.5)
    finally:
        monitor.terminate()
        out, _ = monitor.communicate(timeout=10)
    generations = [ln for ln in out.splitlines() if ln.startswith("# new generation")]
    assert len(generations) == 2, out  # two writes, each one transaction; the repeat none
    first = out.split(generations[0])[0]
    assert "delete table ip lbctl_ipvs" in first and "add rule ip lbctl_ipvs postrouting" in first
    # the LB's source range went and came back with its frontend
    with node.entered():
        sets = nftables.read()
    assert sets is not None and sets["allowed"] == [f"{LB_IP} . tcp . 80 . 192.168.77.0/24"]


def test_a_refused_write_changes_nothing(env: Env) -> None:
    with env.cluster.node.entered():
        before = nftables.read()
        bad = dataclasses.replace(
            ipvs.table_content(env.frontends, env.node_conf),
            clusterip=frozenset({(WEB, "tcp", 70000)}),  # a port nft refuses
        )
        errors = env.writer.write(bad)
        again = env.writer.write(bad)
        after = nftables.read()
        state = env.writer.state()
    assert len(errors) == 1 and "nftables table lbctl_ipvs: nft -f -:" in errors[0], errors
    assert again == [], "the same failure is reported once"
    assert after == before, "the kernel still holds the last good table"
    assert state["error"] == errors[0] and not state["written"]
    assert env.write() == []  # the good content again
    assert tcp_request(env.near, NODE_IP, WEB_TCP).peer_ip == GATEWAY


# -- incremental element updates (IpvsDatapath.apply's table side) ---------------------

SHARED = "10.244.7.7"  # one pod behind two Services: in `hairpin` while either holds it


def incremental_manifests(directory: Path, web: list[str], conditions: dict[str, Any]) -> None:
    """40 Services, each in its own file; `web` and the two sharing SHARED change."""
    for i in range(36):
        k8s_yaml.write(
            directory / f"s{i}.yaml",
            k8s_yaml.service(f"s{i}", f"10.96.3.{i + 1}", [("http", "TCP", 80)]),
            k8s_yaml.endpoint_slice(f"s{i}", [f"10.244.3.{i + 1}"], [("http", "TCP", 8080)]),
        )
    k8s_yaml.write(
        directory / "web.yaml",
        k8s_yaml.service("web", WEB, [("http", "TCP", 80), ("dns", "UDP", 53)]),
        k8s_yaml.endpoint_slice(
            "web", web, [("http", "TCP", 8080), ("dns", "UDP", 5353)], conditions=conditions
        ),
    )
    for name, vip in (("shared-a", "10.96.4.1"), ("shared-b", "10.96.4.2")):
        k8s_yaml.write(
            directory / f"{name}.yaml",
            k8s_yaml.service(name, vip, [("http", "TCP", 80)]),
            k8s_yaml.endpoint_slice(name, [SHARED], [("http", "TCP", 8080)]),
        )


class NftCalls:
    """Every nft the writer runs, recorded and then run for real (a wrapper, not a mock)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.scripts: list[str] = []
        real = nftables._nft

        def run(*args: str, script: str | None = None) -> str:
            self.scripts.append(f"nft {' '.join(args)}\n{script or ''}")
            return real(*args, script=script)

        monkeypatch.setattr(nftables, "_nft", run)

    def take(self) -> list[str]:
        out, self.scripts = self.scripts, []
        return out


def full_rewrite_sets(lab: Lab, frontends: dict[Any, Frontend], conf: NodeConfig) -> Any:
    """The sets a fresh full write of this plan gives, in a namespace of their own."""
    ns = lab.netns("full")
    with ns.entered():
        assert nftables.TableWriter().write(ipvs.table_content(frontends, conf)) == []
        return nftables.read()


INCREMENTAL_CONF = NodeConfig(cluster_cidrs=(ipaddress.IPv4Network(CLUSTER_CIDR),))


def first_sync(tmp_path: Path, node: Netns, pods: list[str]) -> tuple[ManifestPlans, TableSync]:
    """As the agent's first sync: node settings, then the whole plan, written whole."""
    incremental_manifests(tmp_path, pods, {})
    plans = ManifestPlans(tmp_path, (NODE_IP,))
    plans.step()
    sync = TableSync()
    with node.entered():
        assert sync.configure(INCREMENTAL_CONF) == []
        sync.reset(plans.frontends())
        assert sync.rewrite() == []
    return plans, sync


def test_an_endpoint_change_is_one_transaction_of_element_deltas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pods = ["10.244.1.1", "10.244.1.2"]
    with Lab() as lab:
        node = lab.netns("incr")
        plans, sync = first_sync(tmp_path, node, pods)
        calls = NftCalls(monkeypatch)

        def change(web: list[str], conditions: dict[str, Any] | None = None) -> list[str]:
            incremental_manifests(tmp_path, web, conditions or {})
            return apply()

        def apply(gone: frozenset[str] = frozenset()) -> list[str]:
            diff = plans.step()
            assert diff, "the change reached the plan"
            with node.entered():  # frontends read by key only: nothing scans them all
                delta, errors = sync.apply(Unscannable(plans.frontends()), touched(diff))
            assert errors == [] and not delta.addresses_added, errors
            assert delta.addresses_removed == gone, "the dummy link's addresses to remove"
            return calls.take()

        def hairpin() -> list[str]:
            with node.entered():
                sets = nftables.read()
            assert calls.take() == ["nft -j list table ip lbctl_ipvs\n"]  # this read alone
            assert sets is not None
            return list(sets["hairpin"])

        # one endpoint added: one transaction, element additions only
        (script,) = change([*pods, "10.244.1.3"])
        assert script == (
            "nft -f -\nadd element ip lbctl_ipvs hairpin { 10.244.1.3 . 10.244.1.3 }\n"
        ), script
        assert "10.244.1.3 . 10.244.1.3" in hairpin()
        # one endpoint removed
        (script,) = change(["10.244.1.2", "10.244.1.3"])
        assert script == (
            "nft -f -\ndelete element ip lbctl_ipvs hairpin { 10.244.1.1 . 10.244.1.1 }\n"
        ), script
        # one endpoint made terminating while another is ready: it leaves the plan
        terminating = {"10.244.1.2": k8s_yaml.TERMINATING}
        (script,) = change(["10.244.1.2", "10.244.1.3"], terminating)
        assert script.endswith("delete element ip lbctl_ipvs hairpin { 10.244.1.2 . 10.244.1.2 }\n")
        # every endpoint gone: the frontends move to no_endpoints, in one transaction
        (script,) = change([])
        assert script == (
            "nft -f -\n"
            "delete element ip lbctl_ipvs hairpin { 10.244.1.3 . 10.244.1.3 }\n"
            f"add element ip lbctl_ipvs no_endpoints {{ {WEB} . tcp . 80, {WEB} . udp . 53 }}\n"
        ), script
        # a change that moves no element (the scheduler) runs no nft at all
        (script,) = change(["10.244.1.3"])
        assert "add element ip lbctl_ipvs hairpin" in script
        web = tmp_path / "web.yaml"
        text = web.read_text().replace(
            "name: web\n", "name: web\n  annotations:\n    lbctl.io/scheduler: rr\n", 1
        )
        web.write_text(text)
        assert apply() == [], "the scheduler is IPVS's: no element changed"

        # a backend shared by two Services stays in hairpin until the last one leaves
        assert f"{SHARED} . {SHARED}" in hairpin()
        (tmp_path / "shared-a.yaml").unlink()
        (script,) = apply(gone=frozenset({"10.96.4.1"}))
        assert "hairpin" not in script and "10.96.4.1 . tcp . 80" in script, script
        assert f"{SHARED} . {SHARED}" in hairpin(), "shared-b still holds it"
        (tmp_path / "shared-b.yaml").unlink()
        (script,) = apply(gone=frozenset({"10.96.4.2"}))
        assert f"delete element ip lbctl_ipvs hairpin {{ {SHARED} . {SHARED} }}" in script
        assert f"{SHARED} . {SHARED}" not in hairpin()

        # after all these, the table is what a full rewrite of the same plan gives
        with node.entered():
            incremental = nftables.read()
        assert incremental == full_rewrite_sets(lab, plans.frontends(), INCREMENTAL_CONF)
        assert sync.nft.written == ipvs.table_content(plans.frontends(), INCREMENTAL_CONF)


def test_a_refused_element_update_waits_for_the_full_rewrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Lab() as lab:
        node = lab.netns("refused")
        plans, sync = first_sync(tmp_path, node, ["10.244.1.1"])
        calls = NftCalls(monkeypatch)
        node.run("nft", "delete", "table", "ip", nftables.TABLE)  # drift: gone by hand

        def change(web: list[str]) -> list[str]:
            incremental_manifests(tmp_path, web, {})
            diff = plans.step()
            with node.entered():
                return sync.apply(plans.frontends(), touched(diff))[1]

        errors = change(["10.244.1.1", "10.244.1.2"])
        assert len(errors) == 1 and "No such file or directory" in errors[0], errors
        assert len(calls.take()) == 1
        assert sync.nft.state()["written"] is False and sync.nft.state()["error"] == errors[0]
        # the mirror is unknown now: changes write nothing until the full rewrite
        assert change(["10.244.1.2"]) == [] and calls.take() == []
        with node.entered():
            assert sync.rewrite() == []
            (script,) = calls.take()
            healed = nftables.read()
        assert "delete table ip lbctl_ipvs" in script, "rewritten whole"
        assert healed == full_rewrite_sets(lab, plans.frontends(), INCREMENTAL_CONF)
        assert sync.nft.state()["error"] is None
