"""Two nodes and the outside world, in network namespaces, for traffic from outside.

    client (198.51.100.10, .20) --ext0-- node A (lbctl) --und0-- node B
                                          |  pods 10.244.0.x       |  pods 10.244.1.x

Node A answers on 198.51.100.1 (its external address, the masquerade address)
and routes node B's pod CIDR over the underlay; node B sends everything else
back to node A.  Both nodes drop conntrack-INVALID forwarded packets, as real
nodes do.  The client routes the LoadBalancer IP to node A, as a cloud load
balancer or a BGP router would deliver it.
"""

from __future__ import annotations

import dataclasses

from tests import netlab
from tests.netlab import Lab, Netns, Pod

NODE_IP = "198.51.100.1"
CLIENT_IP = "198.51.100.10"
OTHER_CLIENT_IP = "198.51.100.20"  # a second outside client, e.g. outside source ranges
LB_IP = "203.0.113.100"
CLUSTER_CIDR = "10.244.0.0/16"
NODE_A, NODE_B = "node-a", "node-b"


@dataclasses.dataclass
class World:
    client: Netns
    node_a: Netns
    node_b: Netns
    pods_a: list[Pod]
    pods_b: list[Pod]
    pod_client: Pod  # a client pod on node A

    def node_of(self, pod: Pod) -> str:
        return NODE_A if pod in self.pods_a else NODE_B


def _node(lab: Lab, role: str, invalid_drop_rule: bool = True) -> Netns:
    ns = lab.netns(role)
    ns.sysctl("net.ipv4.ip_forward", 1)
    ns.sysctl("net.ipv4.conf.all.rp_filter", 0)
    ns.sysctl("net.ipv4.conf.default.rp_filter", 0)
    if invalid_drop_rule:  # as real nodes have; lbctl itself needs no rule
        ns.run("iptables", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
    return ns


def _pod(lab: Lab, node: Netns, name: str, ip: str, gateway: str) -> Pod:
    ns = lab.netns(name)
    host_if = f"lxc{name}"
    netlab.veth(node, host_if, ns, "eth0")
    ns.ip("addr", "add", f"{ip}/32", "dev", "eth0")
    ns.ip("route", "add", gateway, "dev", "eth0", "scope", "link")
    ns.ip("route", "add", "default", "via", gateway, "dev", "eth0")
    node.ip("addr", "add", f"{gateway}/32", "dev", host_if)
    node.ip("route", "add", f"{ip}/32", "dev", host_if)
    netlab.tx_checksum_offload(ns, "eth0", on=False)
    return Pod(ns=ns, name=name, ip=ip, host_if=host_if)


def build(lab: Lab, pods_a: int = 2, pods_b: int = 2, node_a_rules: bool = True) -> World:
    client = lab.netns("client")
    node_a = _node(lab, "nodea", node_a_rules)
    node_b = _node(lab, "nodeb")

    netlab.veth(client, "eth0", node_a, "ext0")
    client.ip("addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
    client.ip("addr", "add", f"{OTHER_CLIENT_IP}/24", "dev", "eth0")
    client.ip("route", "add", "default", "via", NODE_IP)
    netlab.tx_checksum_offload(client, "eth0", on=False)
    node_a.ip("addr", "add", f"{NODE_IP}/24", "dev", "ext0")

    netlab.veth(node_a, "und0", node_b, "und0")
    node_a.ip("addr", "add", "100.64.0.1/30", "dev", "und0")
    node_b.ip("addr", "add", "100.64.0.2/30", "dev", "und0")
    node_a.ip("route", "add", "10.244.1.0/24", "via", "100.64.0.2")
    node_b.ip("route", "add", "default", "via", "100.64.0.1")

    a = [_pod(lab, node_a, f"a{i}", f"10.244.0.{20 + i}", "10.244.0.1") for i in range(pods_a)]
    b = [_pod(lab, node_b, f"b{i}", f"10.244.1.{20 + i}", "10.244.1.1") for i in range(pods_b)]
    pod_client = _pod(lab, node_a, "pc", "10.244.0.10", "10.244.0.1")
    return World(client, node_a, node_b, a, b, pod_client)


def agent_flags() -> list[str]:
    return [
        "--hostname-override",
        NODE_A,
        "--node-ip",
        NODE_IP,
        "--cluster-cidr",
        CLUSTER_CIDR,
        "--metrics-bind-address",
        "",
        "--healthz-bind-address",
        "",
        "--cgroup",
        "",
    ]
