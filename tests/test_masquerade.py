"""Who is masqueraded, for every traffic policy and kind of client, as kube-proxy does.

The model of kube-proxy's rules is `kubeproxy_rules.expected_flow`; it is
first held to the facts of the conformance data (kube-proxy's own unit
tests), then every case of the matrix

    {ClusterIP, NodePort, LoadBalancer IP, externalIP}
      x {externalTrafficPolicy Cluster, Local} x {internalTrafficPolicy Cluster, Local}
      x {a pod, an outside client, the node itself, a pod reaching itself (hairpin)}

is sent as real TCP connections through the real agent in the conformance
lab (tests/conformance.py: world, node, nodeb, pods in namespaces), with
`--masquerade-all` off and on (with the pod CIDR as local traffic detector)
and on without a detector.  Each connection must land where the model says
(all endpoints or this node's) and its backend must see the client's own
address or a node address as the model says.  For the clients the tc
program balances (not the node's own processes, which the socket hooks
balance at connect()), `lbctl trace` over the same maps must say the same.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbctl.cli import trace as trace_command
from lbctl.datapath.ebpf.trace.view import Packet as TracePacket
from lbctl.model import Protocol
from tests import conformance
from tests.conftest import PIN_PREFIX, remove_pins
from tests.kubeproxy_rules import expected_flow

pytestmark = pytest.mark.netns

DATA = conformance.load()
IP = conformance.IP

POD, OUTSIDE, HAIRPIN_POD = "10.0.0.2", "203.0.113.2", "10.180.0.9"
NODE = str(DATA.primary[4])
POLICIES = list(itertools.product((False, True), repeat=2))  # (eTP Local, iTP Local)
CONFIGS = {  # scenario name -> (masqueradeAll, local traffic detector)
    "masquerade-all-off": (False, True),
    "masquerade-all-on": (True, True),
    "masquerade-all-on-no-detector": (True, False),
}


@dataclasses.dataclass(frozen=True)
class Svc:
    """One Service of the matrix: its policies and addresses."""

    name: str
    n: int  # 1..4 for the policies; hairpin Services are 11..14
    etp_local: bool
    itp_local: bool

    @property
    def hairpin(self) -> bool:
        return self.n > 10

    def dest(self, kind: str) -> str:
        return {
            "ClusterIP": f"172.30.9.{self.n}:80",
            "NodePort": f"{NODE}:{3100 + self.n}",
            "LoadBalancer": f"198.18.9.{self.n}:80",
            "ExternalIP": f"198.18.10.{self.n}:80",
        }[kind]

    @property
    def endpoints(self) -> dict[str, bool]:
        """Endpoint address -> on this node."""
        if self.hairpin:
            return {HAIRPIN_POD: True}
        return {f"10.180.0.{self.n}": True, f"10.180.1.{self.n}": False}

    def manifest(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": "masq",
            "type": "LoadBalancer",
            "clusterIP": self.dest("ClusterIP").split(":")[0],
            "ports": [
                {
                    "name": "p80",
                    "port": 80,
                    "protocol": "TCP",
                    "nodePort": 3100 + self.n,
                    "targetPort": 80,
                }
            ],
            "externalIPs": [self.dest("ExternalIP").split(":")[0]],
            "loadBalancerIngress": [{"ip": self.dest("LoadBalancer").split(":")[0]}],
            "externalTrafficPolicy": "Local" if self.etp_local else "Cluster",
            "internalTrafficPolicy": "Local" if self.itp_local else "Cluster",
        }

    def slice(self) -> dict[str, Any]:
        return {
            "name": f"{self.name}-1",
            "namespace": "masq",
            "serviceName": self.name,
            "addressType": "IPv4",
            "endpoints": [
                {
                    "addresses": [address],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": "test-node" if local else "remote",
                    "local_to_node": local,
                }
                for address, local in self.endpoints.items()
            ],
            "ports": [{"name": "p80", "port": 80, "protocol": "TCP"}],
        }


def _policy(local: bool) -> str:
    return "Local" if local else "Cluster"


SERVICES = [
    Svc(f"{prefix}-etp{_policy(e).lower()}-itp{_policy(i).lower()}", base + n, e, i)
    for prefix, base in (("svc", 0), ("hairpin", 10))
    for n, (e, i) in enumerate(POLICIES, 1)
]


@dataclasses.dataclass(frozen=True)
class Expected:
    svc: Svc
    kind: str
    client: str  # "pod", "outside", "node", "hairpin"
    endpoints: str  # "all" or "local"
    masquerade: bool


def _source(client: str) -> str:
    return {"pod": POD, "outside": OUTSIDE, "node": NODE, "hairpin": HAIRPIN_POD}[client]


def _packets(name: str) -> tuple[list[conformance.Packet], dict[str, Expected]]:
    masquerade_all, detector = CONFIGS[name]
    packets, expected = [], {}
    for svc in SERVICES:
        for kind in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalIP"):
            for client in ("hairpin",) if svc.hairpin else ("pod", "outside", "node"):
                endpoints, masq = expected_flow(
                    kind,
                    client,
                    etp_local=svc.etp_local,
                    itp_local=svc.itp_local,
                    masquerade_all=masquerade_all,
                    detector=detector,
                )
                backends = [
                    f"{a}:80" for a, local in svc.endpoints.items() if local or endpoints == "all"
                ]
                p = conformance.Packet(
                    scenario=name,
                    name=f"{client} to {kind} of {svc.name}",
                    family=4,
                    protocol="TCP",
                    source=IP(_source(client)),
                    dest=conformance.Dest.parse(svc.dest(kind)),
                    expect={"dnat_to": backends},
                    masquerade=masq,
                    iptables_expect=None,
                    modes=("nftables", "iptables"),
                    why=f"kube-proxy: {endpoints} endpoints, masquerade {masq}",
                )
                packets.append(p)
                expected[p.id] = Expected(svc, kind, client, endpoints, masq)
    return packets, expected


def _data() -> tuple[conformance.Data, dict[str, Expected]]:
    scenarios, expected = [], {}
    for index, name in enumerate(CONFIGS):
        masquerade_all, detector = CONFIGS[name]
        packets, more = _packets(name)
        expected.update(more)
        scenarios.append(
            conformance.Scenario(
                index=index,
                name=name,
                modes=("nftables", "iptables"),
                proxy_config={
                    "masquerade_all": masquerade_all,
                    "local_traffic_detector": "pod CIDR" if detector else "none",
                },
                services=tuple(s.manifest() for s in SERVICES),
                slices=tuple(s.slice() for s in SERVICES),
                packets=tuple(packets),
            )
        )
    return dataclasses.replace(DATA, scenarios=tuple(scenarios)), expected


MATRIX, EXPECTED = _data()


# -- the model, held to kube-proxy's own facts -------------------------------------------


def _client_of(data: conformance.Data, packet: conformance.Packet) -> str:
    if data.is_node(packet.source):
        return "node"
    return "pod" if data.is_pod(packet.source) else "outside"


MODEL_SCENARIOS = [s for s in DATA.scenarios if s.name.startswith("internal-external-masquerade")]


@pytest.mark.parametrize("scenario", MODEL_SCENARIOS, ids=lambda s: s.name)
def test_the_model_agrees_with_kube_proxys_tests(scenario: conformance.Scenario) -> None:
    """Every packet of kube-proxy's TestInternalExternalMasquerade cases, as the model
    predicts it: the endpoints it lands on and whether it is masqueraded."""
    config = conformance.proxy_config(DATA, scenario)
    checked = 0
    for packet in scenario.packets:
        if packet.family != 4:
            continue
        found = conformance.target(DATA, scenario, packet)
        assert found is not None, packet.id
        svc, kind = found
        endpoints, masq = expected_flow(
            kind,
            _client_of(DATA, packet),
            etp_local=svc.get("externalTrafficPolicy") == "Local",
            itp_local=svc.get("internalTrafficPolicy") == "Local",
            masquerade_all=config.masquerade_all,
            detector=bool(config.cluster_cidrs),
        )
        local = {
            f"{address}:{eps['ports'][0]['port']}"
            for eps, ep, address in scenario.endpoints()
            if eps["serviceName"] == svc["name"] and ep.get("local_to_node")
        }
        every = {
            f"{address}:{eps['ports'][0]['port']}"
            for eps, _ep, address in scenario.endpoints()
            if eps["serviceName"] == svc["name"]
        }
        assert set(packet.expect["dnat_to"]) == (local if endpoints == "local" else every), (
            packet.id
        )
        assert masq == packet.masquerade, f"{packet.id}: {packet.why}"
        checked += 1
    assert checked >= 3


def test_the_matrix_covers_every_combination() -> None:
    seen = {(e.kind, e.svc.etp_local, e.svc.itp_local, e.client) for e in EXPECTED.values()}
    clients = ("pod", "outside", "node", "hairpin")
    kinds = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalIP")
    assert seen == {(k, e, i, c) for k in kinds for e, i in POLICIES for c in clients}
    # and masqueradeAll leaves the address of eTP=Local's outside clients and pods alone
    kept = [
        e
        for p, e in EXPECTED.items()
        if p.startswith("masquerade-all-on/") and e.kind != "ClusterIP" and e.svc.etp_local
    ]
    assert kept and all(e.masquerade == (e.client in ("node", "hairpin")) for e in kept)


# -- real packets ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[conformance.Harness]:
    h = conformance.Harness(MATRIX, tmp_path_factory.mktemp("masquerade"), PIN_PREFIX)
    try:
        yield h.start()
    finally:
        h.close(remove_pins)


def _params() -> list[object]:
    return [
        pytest.param(p, id=p.id)
        for sc in sorted(MATRIX.scenarios, key=lambda s: s.index)
        for p in sc.packets
    ]


def _trace(pin_dir: Path, packet: conformance.Packet) -> dict[str, Any]:
    """`lbctl trace`'s decision over the agent's maps (the agent serves no /tracez here)."""
    src, dst = ipaddress.IPv4Address(packet.source), ipaddress.IPv4Address(packet.dest.ip)
    p = TracePacket(src, None, dst, packet.dest.port, Protocol.TCP)
    return trace_command.run(pin_dir, "", p, timeout=0.1)


@pytest.mark.parametrize("packet", _params())
def test_packet(harness: conformance.Harness, packet: conformance.Packet) -> None:
    verdict = harness.check(packet)
    assert verdict.ok, verdict.report()
    expected = EXPECTED[packet.id]
    if expected.client == "node":
        return  # the socket hooks, not the tc program that trace follows
    assert harness.agent is not None and harness.agent.proc is not None
    t = _trace(harness.agent.proc.pin_dir, packet)
    assert t["verdict"] == "forward", t
    candidates = t["choice"]["candidates"] or [t["choice"]["backend"]]
    assert {f"{c['address']}:{c['port']}" for c in candidates} == set(packet.expect["dnat_to"]), t
    assert t["masquerade"]["applies"] == expected.masquerade, t["masquerade"]
