"""kube-proxy's packet-flow conformance data, replayed as real connections.

The data (`kube-proxy-packet-flows.yaml`, see `DATA_PATH`) states for many
scenarios (Services, EndpointSlices, sometimes proxy settings) where the
first packet of a new connection must land: on one of a set of backends
(`dnat_to`), refused (`reject`), silently dropped (`drop`) or left alone
(`pass`), and whether the backend must see a node address instead of the
client (`masquerade`).  This module builds that world in network
namespaces, runs the real agent (`lbctl run`) in the node's namespace, and
sends every packet as a real TCP or UDP connection:

    world: 203.0.113.2, .130 and 2600:5200::1 on lo (the external clients);
      |    routes the LB IPs, externalIPs, other node addresses, ClusterIPs
      |    and service CIDR, and the pod addresses to the node
    ext0: 192.168.0.1/24, 2001:db8::fe/64
      |
    ext0: 192.168.0.2/24, 2001:db8::1/64 (+ 192.168.1.2, 192.168.99.11, 2001:db8:1::2)
    node: lbctl; forwarding, rp_filter 0, conntrack INVALID drop in FORWARD;
      |   default route to world
      |-- lxcN -- eth0 pod (a namespace per address, /32 or /128, gateway
      |                     169.254.1.1 / fe80::1 on the node's side)
      |-- ul0: 100.64.0.1/30, fd00:64::1/126
            |
          ul0: 100.64.0.2/30 nodeb -- lxcN -- eth0 pod on another node

An endpoint on this node (`local_to_node`) is a pod behind the node, one on
another node a pod behind nodeb.  Since an address is local in one scenario
and remote in another, each placement it needs has its own pod namespace
("twins"), made up front; both nodes' routes for the address pick the twin
the scenario wants, so switching scenarios changes routes, not namespaces.
Senders have tx checksum offload off (veth would hide checksum bugs).

Every server of the lab (one thread, `Responder`) answers a line with JSON
naming where it runs, the address it was reached at and the peer it saw.
Every place a packet may land has one: each endpoint's pod, on every port of
its slices; the node, on 0.0.0.0/[::] at each node-local destination port, so
a NodePort left untranslated answers from the node instead of looking like a
reject; a client pod's own loopback; and world, for `pass` packets to any
other address (a ClusterIP on a port its Service lacks), which world makes
local for that scenario (`ip route add local ADDR dev lo`).  A packet to a
Service address that lbctl leaves alone loops between node and world until
its TTL runs out (world accepts its own clients' addresses coming back, and
no namespace rate-limits ICMP), so the client hears ICMP time exceeded: only
lbctl's own drops are silent.

Clients: pod sources connect from their pod's namespace, external ones from
world bound to the source address, node ones (a node address or loopback)
from a short subprocess in the node namespace inside a fresh test cgroup,
the only one lbctl's socket hooks are attached to (`--cgroup`), unbound.

The agent restarts only when the proxy settings change (the cases are
grouped by them); between scenarios one manifest file is replaced and the
harness waits until the pinned maps show it, which a marker Service, whose
port changes on every switch, makes unambiguous.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import itertools
import json
import os
import queue
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from tests import k8s_yaml
from tests.agent_proc import AgentProcess
from tests.netlab import Lab, Netns, veth

REPO = Path(__file__).resolve().parents[1]
DATA_PATH = Path(
    os.environ.get("LBCTL_CONFORMANCE_DATA")
    or REPO.parent / "shared" / "conformance" / "kube-proxy-packet-flows.yaml"
)

IP = ipaddress.ip_address
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# ---------------------------------------------------------------------------- the lab plan

# The world <-> node link (the node's own addresses come from the data).
WORLD_LINK = {4: ("192.168.0.1", 24), 6: ("2001:db8::fe", 64)}
# The node <-> nodeb underlay.
UNDERLAY = {4: ("100.64.0.1", "100.64.0.2", 30), 6: ("fd00:64::1", "fd00:64::2", 126)}
# What pods use as their gateway: on every node-side veth, never chosen as a source.
POD_GATEWAY = {4: "169.254.1.1", 6: "fe80::1"}
# The marker Service, rewritten on every scenario switch; nothing sends to it.
MARKER_NAMESPACE, MARKER_NAME, MARKER_IP = "lbctl-conformance", "marker", "198.18.0.1"

TRIES = {"dnat_to": 16, "pass": 2, "reject": 2, "drop": 1}
DROP_WAIT = 0.7  # s of silence that make a drop (one SYN; Linux resends after 1 s)
REJECT_FAST = 1.0  # s within which a reject must arrive
REPLY_WAIT = 2.0  # s for anything else
AGENT_START = 20.0  # s for `lbctl run` to sync
APPLY_WAIT = 10.0  # s for a manifest change to reach the maps

XFAIL_IPV6 = "IPv6: lbctl balances IPv4 only so far (IPv6 Services and EndpointSlices are skipped)"
XFAIL_SCTP = "SCTP: lbctl balances TCP and UDP only (and this kernel has no SCTP to send it with)"
XFAIL_SERVICE_CIDR = (
    "asserted in nftables mode only, which drops traffic to unallocated addresses of the "
    "service CIDR: lbctl is not told the service CIDR"
)


class HarnessError(RuntimeError):
    """The lab, the agent or the data could not be set up (not a verdict on lbctl)."""


# ------------------------------------------------------------------------------- the data


@dataclasses.dataclass(frozen=True)
class Dest:
    """A destination "ip:port" or "[ipv6]:port"."""

    ip: Address
    port: int

    @classmethod
    def parse(cls, text: str) -> Dest:
        host, _, port = text.rpartition(":")
        return cls(IP(host.strip("[]")), int(port))

    @classmethod
    def of(cls, sockaddr: tuple[Any, ...]) -> Dest:
        return cls(IP(sockaddr[0]), int(sockaddr[1]))

    @property
    def family(self) -> int:
        return self.ip.version

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Packet:
    scenario: str
    name: str
    family: int  # 4 or 6
    protocol: str  # TCP, UDP, SCTP
    source: Address
    dest: Dest
    expect: dict[str, Any]
    masquerade: bool
    iptables_expect: dict[str, Any] | None  # also acceptable (iptables mode asserts it)
    modes: tuple[str, ...]  # the packet's own, else the scenario's
    why: str

    @property
    def id(self) -> str:
        return f"{self.scenario}/{self.name}"

    @property
    def outcome(self) -> str:
        return expectation_kind(self.expect)


@dataclasses.dataclass(frozen=True)
class Scenario:
    index: int
    name: str
    modes: tuple[str, ...]
    proxy_config: dict[str, Any]
    services: tuple[dict[str, Any], ...]
    slices: tuple[dict[str, Any], ...]
    packets: tuple[Packet, ...]

    def endpoints(self) -> Iterator[tuple[dict[str, Any], dict[str, Any], Address]]:
        """(slice, endpoint, address) for every endpoint address of every slice."""
        for eps in self.slices:
            for ep in eps.get("endpoints") or []:
                for address in ep.get("addresses") or []:
                    yield eps, ep, IP(address)


@dataclasses.dataclass(frozen=True)
class Data:
    node_ips: frozenset[Address]
    primary: dict[int, Address]
    cluster_cidrs: tuple[Network, ...]
    service_cidrs: tuple[Network, ...]
    defaults: dict[str, dict[str, Any]]
    scenarios: tuple[Scenario, ...]

    def scenario(self, name: str) -> Scenario:
        return next(s for s in self.scenarios if s.name == name)

    def is_pod(self, ip: Address) -> bool:
        return any(ip in net for net in self.cluster_cidrs if net.version == ip.version)

    def is_node(self, ip: Address) -> bool:
        return ip in self.node_ips or ip.is_loopback


def expectation_kind(expect: dict[str, Any]) -> str:
    kinds = [k for k in ("dnat_to", "reject", "drop", "pass") if expect.get(k)]
    if len(kinds) != 1:
        raise HarnessError(f"expectation {expect} names no single outcome")
    return kinds[0]


def load(path: Path = DATA_PATH) -> Data:
    if not path.exists():
        raise HarnessError(
            f"conformance data {path} is missing; set LBCTL_CONFORMANCE_DATA to its path"
        )
    raw = yaml.safe_load(path.read_text())
    node = raw["node"]
    scenarios = []
    for index, sc in enumerate(raw["scenarios"]):
        modes = tuple(sc.get("modes") or ("nftables", "iptables"))
        packets = []
        for p in sc.get("packets") or []:
            packets.append(
                Packet(
                    scenario=sc["name"],
                    name=p["name"],
                    family=6 if p["family"] == "IPv6" else 4,
                    protocol=p["protocol"],
                    source=IP(p["source"]),
                    dest=Dest.parse(p["dest"]),
                    expect=dict(p["expect"]),
                    masquerade=bool(p.get("masquerade")),
                    iptables_expect=p.get("iptables_mode_expect"),
                    modes=tuple(p.get("modes") or modes),
                    why=str(p.get("why", "")),
                )
            )
        scenarios.append(
            Scenario(
                index=index,
                name=sc["name"],
                modes=modes,
                proxy_config=dict(sc.get("proxy_config") or {}),
                services=tuple(sc.get("services") or ()),
                slices=tuple(sc.get("endpointslices") or ()),
                packets=tuple(packets),
            )
        )
    return Data(
        node_ips=frozenset(IP(a) for a in node["ips"]),
        primary={4: IP(node["primary_ipv4"]), 6: IP(node["primary_ipv6"])},
        cluster_cidrs=tuple(ipaddress.ip_network(c) for c in raw["cluster_cidr"].values()),
        service_cidrs=tuple(ipaddress.ip_network(c) for c in raw["service_cidr"].values()),
        defaults=raw["default_proxy_config"],
        scenarios=tuple(scenarios),
    )


# ------------------------------------------------------------------- expected failures


def target(data: Data, scenario: Scenario, packet: Packet) -> tuple[dict[str, Any], str] | None:
    """(the Service, the kind of frontend: ClusterIP, ExternalIP, LoadBalancer or
    NodePort) that a packet is sent to, or None when it is sent to no Service."""
    ip, port = packet.dest.ip, packet.dest.port
    for svc in scenario.services:
        for sp in svc.get("ports") or []:
            if sp.get("protocol", "TCP") != packet.protocol:
                continue
            if sp["port"] == port:
                if IP(svc["clusterIP"]) == ip:
                    return svc, "ClusterIP"
                if ip in {IP(a) for a in svc.get("externalIPs") or []}:
                    return svc, "ExternalIP"
                if ip in {IP(i["ip"]) for i in svc.get("loadBalancerIngress") or []}:
                    return svc, "LoadBalancer"
            if sp.get("nodePort") == port and data.is_node(ip):
                return svc, "NodePort"
    return None


def expected_failure(data: Data, packet: Packet) -> str | None:
    """Why lbctl cannot pass this packet yet (a feature it does not have), or None.

    Decided from the data: the feature must matter to this very packet.
    """
    scenario = data.scenario(packet.scenario)
    if packet.family == 6 and packet.outcome != "pass":
        return XFAIL_IPV6  # a pass is right already: lbctl leaves IPv6 alone
    if packet.protocol == "SCTP":
        return XFAIL_SCTP
    found = target(data, scenario, packet)
    if (
        found is None
        and packet.modes == ("nftables",)
        and any(packet.dest.ip in net for net in data.service_cidrs)
    ):
        return XFAIL_SERVICE_CIDR
    return None


# -------------------------------------------------------------------------- proxy config


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    """kube-proxy's settings for a scenario, as lbctl flags."""

    node_port_addresses: tuple[str, ...] | None  # None: every local address
    localhost_nodeports: bool | None  # None: lbctl's default
    masquerade_all: bool
    cluster_cidrs: tuple[str, ...]  # (): no local traffic detector

    def flags(self) -> list[str]:
        out: list[str] = []
        if self.cluster_cidrs:
            out += ["--cluster-cidr", ",".join(self.cluster_cidrs)]
        if self.node_port_addresses is not None:
            out += ["--node-port-addresses", ",".join(self.node_port_addresses)]
        if self.localhost_nodeports is not None:
            out.append(
                "--localhost-nodeports" if self.localhost_nodeports else "--no-localhost-nodeports"
            )
        if self.masquerade_all:
            out.append("--masquerade-all")
        return out

    def __str__(self) -> str:
        return " ".join(self.flags()) or "(defaults)"


def proxy_config(data: Data, scenario: Scenario) -> ProxyConfig:
    """The scenario's settings over the data's defaults for its mode.

    iptables-only scenarios start from the iptables column, nftables-only ones
    from the nftables column; a scenario of both modes keeps what the columns
    agree on, every local address for NodePorts, and lbctl's own default
    for localhost NodePorts (no packet of those scenarios depends on it).
    """
    ipt, nft = data.defaults["iptables"], data.defaults["nftables"]
    if scenario.modes == ("iptables",):
        settings = dict(ipt)
    elif scenario.modes == ("nftables",):
        settings = dict(nft)
    else:
        settings = {k: v for k, v in ipt.items() if nft.get(k) == v}
        settings.setdefault("localhost_nodeports", None)
    settings.update(scenario.proxy_config)

    addresses = settings.get("nodeport_addresses")  # a list, or "all local addresses"
    localhost = settings.get("localhost_nodeports")
    if not isinstance(localhost, bool) and localhost is not None:
        localhost = False  # "not supported"
    detector = str(settings.get("local_traffic_detector", "none"))
    return ProxyConfig(
        node_port_addresses=tuple(addresses) if isinstance(addresses, list) else None,
        localhost_nodeports=localhost,
        masquerade_all=bool(settings.get("masquerade_all", False)),
        cluster_cidrs=()
        if detector.startswith("none")
        else tuple(str(c) for c in data.cluster_cidrs),
    )


# -------------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    packet: Packet
    xfail: str | None

    @property
    def id(self) -> str:
        return self.packet.id


def cases(data: Data) -> list[Case]:
    """Every packet of every scenario, grouped by proxy config (one agent per group)."""
    order: dict[ProxyConfig, int] = {}
    for sc in data.scenarios:
        order.setdefault(proxy_config(data, sc), len(order))
    scenarios = sorted(data.scenarios, key=lambda s: (order[proxy_config(data, s)], s.index))
    return [Case(p, expected_failure(data, p)) for sc in scenarios for p in sc.packets]


# ---------------------------------------------------------------------------- manifests


def _port_name(port: dict[str, Any]) -> dict[str, str]:
    name = port.get("name") or ""
    return {"name": name} if name else {}


def service_manifest(svc: dict[str, Any]) -> dict[str, Any]:
    cluster_ip = str(svc["clusterIP"])
    family = "IPv6" if IP(cluster_ip).version == 6 else "IPv4"
    spec: dict[str, Any] = {
        "type": svc.get("type", "ClusterIP"),
        "clusterIP": cluster_ip,
        "clusterIPs": [cluster_ip],
        "ipFamilies": [family],
        "ipFamilyPolicy": "SingleStack",
        "ports": [],
    }
    for port in svc.get("ports") or []:
        entry: dict[str, Any] = {
            **_port_name(port),
            "port": port["port"],
            "protocol": port.get("protocol", "TCP"),
            "targetPort": port.get("targetPort", port["port"]),
        }
        if port.get("nodePort"):
            entry["nodePort"] = port["nodePort"]
        spec["ports"].append(entry)
    for key in (
        "externalIPs",
        "externalTrafficPolicy",
        "internalTrafficPolicy",
        "loadBalancerSourceRanges",
        "healthCheckNodePort",
    ):
        if svc.get(key) is not None:
            spec[key] = svc[key]
    spec["sessionAffinity"] = svc.get("sessionAffinity", "None")
    if spec["sessionAffinity"] == "ClientIP":
        timeout = int(svc.get("sessionAffinityTimeoutSeconds", 10800))
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": timeout}}
    manifest: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": svc["name"], "namespace": svc["namespace"]},
        "spec": spec,
    }
    ingress = svc.get("loadBalancerIngress") or []
    if ingress:
        manifest["status"] = {"loadBalancer": {"ingress": [dict(i) for i in ingress]}}
    return manifest


def slice_manifest(eps: dict[str, Any], node_name: str) -> dict[str, Any]:
    endpoints = []
    for ep in eps.get("endpoints") or []:
        conditions = ep.get("conditions") or {}
        local = bool(ep.get("local_to_node"))
        other = ep.get("nodeName") if ep.get("nodeName") not in (None, node_name) else None
        endpoints.append(
            {
                "addresses": list(ep["addresses"]),
                "conditions": {
                    k: bool(conditions[k])
                    for k in ("ready", "serving", "terminating")
                    if k in conditions
                },
                "nodeName": node_name if local else (other or "other-node"),
            }
        )
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": eps["name"],
            "namespace": eps["namespace"],
            "labels": {"kubernetes.io/service-name": eps["serviceName"]},
        },
        "addressType": eps.get("addressType", "IPv4"),
        "ports": [
            {"name": p.get("name") or "", "port": p["port"], "protocol": p.get("protocol", "TCP")}
            for p in eps.get("ports") or []
        ],
        "endpoints": endpoints,
    }


def marker_manifest(port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": MARKER_NAME, "namespace": MARKER_NAMESPACE},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": MARKER_IP,
            "ports": [{"name": "marker", "port": port, "protocol": "TCP", "targetPort": port}],
        },
    }


# ------------------------------------------------------------------------------ servers

_IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)
_IP_RECVERR: int = getattr(socket, "IP_RECVERR", 11)
_IPV6_RECVERR: int = getattr(socket, "IPV6_RECVERR", 25)
_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst, addr
_IN6_PKTINFO = struct.Struct("=16sI")  # addr, ifindex


def _af(family: int) -> socket.AddressFamily:
    return socket.AF_INET6 if family == 6 else socket.AF_INET


def _kind(protocol: str) -> socket.SocketKind:
    return socket.SOCK_DGRAM if protocol == "UDP" else socket.SOCK_STREAM


@dataclasses.dataclass
class _Conn:
    label: str
    buf: bytes = b""


class Responder:
    """Every server of the lab, served by one thread.

    A socket keeps the namespace it was made in, so one thread can serve
    listeners of all namespaces.  Each request is a line of JSON with a token;
    the answer says where the server runs (`label`), the address it was
    reached at and the peer it saw, and echoes the token.
    """

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._new: queue.SimpleQueue[tuple[socket.socket, str, str]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._stop = threading.Event()
        self._owned: list[socket.socket] = []
        self.served = 0
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._loop, name="conformance-servers", daemon=True)
        self._thread.start()

    def listen(self, ns: Netns, label: str, family: int, protocol: str, port: int) -> None:
        sock = ns.open_socket(_af(family), _kind(protocol))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if protocol == "UDP":
                if family == 6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
            sock.bind(("::" if family == 6 else "0.0.0.0", port))
            if protocol == "TCP":
                sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise HarnessError(
                f"cannot listen on {protocol} port {port} (IPv{family}) in {label}: {exc}"
            ) from exc
        self._owned.append(sock)
        self._new.put((sock, "tcp-listen" if protocol == "TCP" else "udp", label))
        self._wake_w.send(b"x")

    def close(self) -> None:
        self._stop.set()
        self._wake_w.send(b"x")
        self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        for sock in self._owned:
            sock.close()
        self._sel.close()
        self._wake_w.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, _events in self._sel.select(0.5):
                kind, state = key.data
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    if kind == "wake":
                        self._adopt()
                    elif kind == "tcp-listen":
                        conn, _peer = sock.accept()
                        conn.setblocking(False)
                        self._sel.register(conn, selectors.EVENT_READ, ("tcp", _Conn(state)))
                    elif kind == "tcp":
                        self._tcp(sock, state)
                    else:
                        self._udp(sock, state)
                except OSError as exc:  # EAGAIN, or ECONNREFUSED of an earlier UDP answer
                    if exc.errno not in (errno.EAGAIN, errno.ECONNREFUSED):
                        self.errors.append(f"{state}: {exc}")

    def _adopt(self) -> None:
        with_data = True
        while with_data:
            try:
                with_data = bool(self._wake_r.recv(4096))
            except BlockingIOError:
                with_data = False
        while True:
            try:
                sock, kind, label = self._new.get_nowait()
            except queue.Empty:
                return
            self._sel.register(sock, selectors.EVENT_READ, (kind, label))

    @staticmethod
    def _answer(label: str, local: Dest, peer: Dest, request: bytes) -> bytes:
        try:
            token = json.loads(request.decode()).get("token", "")
        except ValueError:
            token = None
        reply = {"where": label, "local": str(local), "peer": str(peer), "token": token}
        return json.dumps(reply).encode() + b"\n"

    def _tcp(self, conn: socket.socket, state: _Conn) -> None:
        try:
            data = conn.recv(65536)
        except OSError:  # reset by the client
            data = b""
        state.buf += data
        if data and b"\n" not in state.buf:
            return
        self._sel.unregister(conn)
        try:
            if data:
                line = state.buf.split(b"\n", 1)[0]
                local, peer = Dest.of(conn.getsockname()), Dest.of(conn.getpeername())
                conn.send(self._answer(state.label, local, peer, line))
                self.served += 1
        except OSError as exc:
            self.errors.append(f"{state.label}: {exc}")
        finally:
            conn.close()

    def _udp(self, sock: socket.socket, label: str) -> None:
        family = 6 if sock.family == socket.AF_INET6 else 4
        data, ancdata, _flags, peer_addr = sock.recvmsg(65535, 256)
        port = sock.getsockname()[1]
        local_ip: Address | None = None
        anc: list[tuple[int, int, bytes]] = []
        for level, kind, value in ancdata:
            if family == 4 and level == socket.IPPROTO_IP and kind == _IP_PKTINFO:
                _ifindex, _spec, addr = _IN_PKTINFO.unpack(value[: _IN_PKTINFO.size])
                local_ip = ipaddress.IPv4Address(addr)
                anc = [(socket.IPPROTO_IP, _IP_PKTINFO, _IN_PKTINFO.pack(0, addr, bytes(4)))]
            if family == 6 and level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                addr, _ifindex = _IN6_PKTINFO.unpack(value[: _IN6_PKTINFO.size])
                local_ip = ipaddress.IPv6Address(addr)
                anc = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(addr, 0))]
        if local_ip is None:
            self.errors.append(f"{label}: UDP datagram without packet info")
            return
        answer = self._answer(label, Dest(local_ip, port), Dest.of(peer_addr), data)
        sock.sendmsg([answer], anc, 0, peer_addr)
        self.served += 1


# ------------------------------------------------------------------------------ clients

_tokens = itertools.count(1)


def attempt(
    sock: socket.socket,
    protocol: str,
    bind: str | None,
    dest: Dest,
    connect_timeout: float,
    reply_timeout: float,
) -> dict[str, Any]:
    """One connection on a fresh socket: connect, one line out, one line back.

    Returns {"outcome": reply|refused|timeout|error, "stage", "detail",
    "client" (local ip:port), "seconds", "reply" (the server's JSON)}.  TCP
    sockets are closed with a reset, so hundreds leave no TIME_WAIT behind.
    """
    token = f"{os.getpid()}-{next(_tokens)}"
    out: dict[str, Any] = {"outcome": "", "stage": "connect", "detail": "", "client": ""}
    started = time.monotonic()
    try:
        if protocol == "UDP":  # report every ICMP error, not just port unreachable
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
        if bind:
            sock.bind((bind, 0))
        sock.settimeout(connect_timeout)
        sock.connect((str(dest.ip), dest.port))
        out["client"] = str(Dest.of(sock.getsockname()))
        out["peer"] = str(Dest.of(sock.getpeername()))
        out["stage"] = "reply"
        sock.settimeout(reply_timeout)
        line = json.dumps({"token": token}).encode() + b"\n"
        if protocol == "UDP":
            sock.send(line)
            data = sock.recv(65535)
        else:
            sock.sendall(line)
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionAbortedError(errno.ECONNABORTED, "closed without an answer")
                data += chunk
        reply = json.loads(data.split(b"\n", 1)[0].decode())
        if reply.get("token") != token:
            raise ValueError(f"answer {reply} is not for token {token}")
        out.update(outcome="reply", reply=reply)
    except ConnectionRefusedError:
        out["outcome"] = "refused"
    except TimeoutError:
        out["outcome"] = "timeout"
    except OSError as exc:
        out.update(outcome="error", detail=errno.errorcode.get(exc.errno or 0, str(exc)))
    except ValueError as exc:
        out.update(outcome="error", detail=f"bad answer: {exc}")
    finally:
        out["seconds"] = round(time.monotonic() - started, 4)
        if protocol == "TCP":
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    return out


def attempts(
    make: Any, protocol: str, bind: str | None, dest: Dest, timeouts: dict[str, float], tries: int
) -> list[dict[str, Any]]:
    """`tries` attempts, stopping after the first that gets no answer when one is due."""
    results = []
    for _ in range(tries):
        result = attempt(make(), protocol, bind, dest, timeouts["connect"], timeouts["reply"])
        results.append(result)
        if result["outcome"] != "reply" and timeouts.get("want_reply"):
            break
    return results


def node_client_main() -> int:
    """The node client (`python -m tests.conformance --node-client`), request on stdin.

    Runs in the node's namespace inside the test cgroup, which it checks first:
    lbctl's socket hooks only see processes of that cgroup.
    """
    request = json.load(sys.stdin)
    cgroup = next(
        (
            line[3:]
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line[:3] == "0::"
        ),
        "",
    )
    if cgroup != request["cgroup"]:
        print(json.dumps({"error": f"client is in cgroup {cgroup!r}, not {request['cgroup']!r}"}))
        return 1
    family = _af(request["family"])
    kind = _kind(request["protocol"])
    results = attempts(
        lambda: socket.socket(family, kind),
        request["protocol"],
        None,
        Dest.parse(request["dest"]),
        request["timeouts"],
        request["tries"],
    )
    print(json.dumps({"results": results}))
    return 0


# -------------------------------------------------------------------------- namespaces


def sysctls(ns: Netns, values: dict[str, object]) -> None:
    """Write sysctls of `ns` from this thread (/proc/sys/net follows the thread's netns)."""
    with ns.entered():
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(str(value))


def ip_batch(ns: Netns, commands: Iterable[str]) -> None:
    lines = list(commands)
    if not lines:
        return
    proc = subprocess.run(
        ["ip", "-n", ns.name, "-batch", "-"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise HarnessError(f"ip -n {ns.name} -batch failed: {proc.stderr.strip()}\n{lines}")


ROUTER_SYSCTLS = {
    "net.ipv4.ip_forward": 1,
    "net.ipv4.conf.all.rp_filter": 0,
    "net.ipv4.conf.default.rp_filter": 0,
    "net.ipv4.icmp_ratelimit": 0,  # every unhandled packet's ICMP error must reach its client
    "net.ipv6.conf.all.forwarding": 1,
    "net.ipv6.icmp.ratelimit": 0,
    "net.ipv6.conf.all.accept_dad": 0,
    "net.ipv6.conf.default.accept_dad": 0,
}
POD_SYSCTLS = {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0}


def _within(inner: Network, outer: Network) -> bool:
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def _addr(ip: Address, prefix: int | None = None) -> str:
    full = 32 if ip.version == 4 else 128
    return f"{ip}/{full if prefix is None else prefix}"


@dataclasses.dataclass
class PodNs:
    ns: Netns
    ip: Address
    side: str  # "node" or "nodeb"
    host_if: str

    @property
    def label(self) -> str:
        return f"pod {self.ip}@{self.side}"


class Topology:
    """The namespaces of the lab (see the module docstring); built once."""

    def __init__(self, lab: Lab, data: Data, responder: Responder) -> None:
        self.lab = lab
        self.data = data
        self.responder = responder
        self.pods: dict[tuple[Address, str], PodNs] = {}
        self.placed: dict[Address, str] = {}  # the side the node routes each pod address to
        self.listening: set[tuple[str, int, str, int]] = set()
        self.world_local: set[Address] = set()
        self._ifindex = itertools.count(1)

        self.node = lab.netns("node")
        self.world = lab.netns("world")
        self.nodeb = lab.netns("nodeb")
        for ns in (self.node, self.world, self.nodeb):
            sysctls(ns, ROUTER_SYSCTLS)
        # A packet lbctl leaves alone (say to an LB IP) goes back out of the node's
        # default route to world, whose own client sent it: accepting its own source
        # lets it loop until the TTL runs out, and the client hears ICMP time
        # exceeded instead of the silence of a martian discard, which would pass for
        # a drop.
        sysctls(self.world, {"net.ipv4.conf.all.accept_local": 1})
        self.node.run(
            "iptables", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"
        )
        veth(self.node, "ext0", self.world, "ext0")
        veth(self.node, "ul0", self.nodeb, "ul0")
        self.world.run("ethtool", "-K", "ext0", "tx", "off")

        node_cmds, world_cmds, nodeb_cmds = [], [], []
        for family, (gw, prefix) in WORLD_LINK.items():
            primary = data.primary[family]
            node_cmds.append(f"addr add {_addr(primary, prefix)} dev ext0 nodad")
            world_cmds.append(f"addr add {gw}/{prefix} dev ext0 nodad")
            node_cmds.append(f"route add default via {gw} dev ext0")
            near, far, plen = UNDERLAY[family]
            node_cmds.append(f"addr add {near}/{plen} dev ul0 nodad")
            nodeb_cmds.append(f"addr add {far}/{plen} dev ul0 nodad")
            nodeb_cmds.append(f"route add default via {near} dev ul0")
        link = {
            v: ipaddress.ip_network(f"{gw}/{p}", strict=False) for v, (gw, p) in WORLD_LINK.items()
        }
        for ip in sorted(data.node_ips, key=lambda a: (a.version, a)):
            if ip != data.primary[ip.version]:
                node_cmds.append(f"addr add {_addr(ip)} dev ext0 nodad")
        for net in sorted(self._routed_to_node(), key=lambda n: (n.version, n)):
            if _within(net, link[net.version]):
                continue  # on the link already
            world_cmds.append(f"route add {net} via {data.primary[net.version]} dev ext0")
        for client in self._external_clients():
            world_cmds.append(f"addr add {_addr(client)} dev lo nodad")
        ip_batch(self.node, node_cmds)
        ip_batch(self.world, world_cmds)
        ip_batch(self.nodeb, nodeb_cmds)

        for sc in data.scenarios:  # every pod namespace any scenario needs, up front
            for ip, side in self.placement(sc).items():
                self._pod(ip, side)
        self._wait_links_up()

    # -- what the data needs

    def _routed_to_node(self) -> set[Network]:
        """Everything world must send to the node: what a router or cloud LB would."""
        nets: set[Network] = set(self.data.service_cidrs) | set(self.data.cluster_cidrs)
        for ip in self.data.node_ips:
            nets.add(ipaddress.ip_network(_addr(ip)))
        for sc in self.data.scenarios:
            for svc in sc.services:
                ips = [svc["clusterIP"], *(svc.get("externalIPs") or [])]
                ips += [i["ip"] for i in svc.get("loadBalancerIngress") or []]
                for text in ips:
                    nets.add(ipaddress.ip_network(_addr(IP(text))))
            for _eps, _ep, address in sc.endpoints():
                nets.add(ipaddress.ip_network(_addr(address)))
        # drop what a wider route already covers
        return {n for n in nets if not any(n != m and _within(n, m) for m in nets)}

    def _external_clients(self) -> list[Address]:
        found = {
            p.source
            for sc in self.data.scenarios
            for p in sc.packets
            if not self.data.is_node(p.source) and not self.data.is_pod(p.source)
        }
        return sorted(found, key=lambda a: (a.version, a))

    def placement(self, sc: Scenario) -> dict[Address, str]:
        """Where each pod address of the scenario lives: on this node or on nodeb.

        Pod clients and pass destinations are on this node; endpoints where
        the data says.  An address listed both on this node and elsewhere (a
        scenario with no usable endpoint) stays on this node.
        """
        local: set[Address] = set()
        remote: set[Address] = set()
        for p in sc.packets:
            if self.data.is_pod(p.source):
                local.add(p.source)
            if self.data.is_pod(p.dest.ip) and p.outcome == "pass":
                local.add(p.dest.ip)
        for _eps, ep, address in sc.endpoints():
            (local if ep.get("local_to_node") else remote).add(address)
        placed = dict.fromkeys(remote, "nodeb")
        placed.update(dict.fromkeys(local, "node"))
        return placed

    # -- building

    def _pod(self, ip: Address, side: str) -> PodNs:
        key = (ip, side)
        if key in self.pods:
            return self.pods[key]
        host = self.node if side == "node" else self.nodeb
        n = next(self._ifindex)
        host_if = f"lxc{n}"
        ns = self.lab.netns(f"p{n}")
        sysctls(ns, POD_SYSCTLS)
        veth(host, host_if, ns, "eth0")
        gw = POD_GATEWAY[ip.version]
        pod_cmds = [f"addr add {_addr(ip)} dev eth0 nodad"]
        if ip.version == 4:
            pod_cmds.append(f"route add {gw} dev eth0 scope link")
            host_cmds = [f"addr add {gw}/32 dev {host_if} scope link"]
        else:
            host_cmds = [f"addr add {gw}/64 dev {host_if} nodad"]
        pod_cmds.append(f"route add default via {gw} dev eth0")
        ip_batch(ns, pod_cmds)  # routes to the pod: see prepare()
        ip_batch(host, host_cmds)
        ns.run("ethtool", "-K", "eth0", "tx", "off")  # veth would hide checksum bugs
        pod = PodNs(ns, ip, side, host_if)
        self.pods[key] = pod
        return pod

    def _wait_links_up(self, timeout: float = 5.0) -> None:
        """New veths drop what they are given until the kernel's linkwatch starts
        them (up to a second after they come up): wait for every one."""
        deadline = time.monotonic() + timeout
        for ns in self.lab.namespaces:
            while True:
                links = json.loads(ns.ip("-j", "link", "show").stdout)
                down = [
                    link["ifname"]
                    for link in links
                    if link["ifname"] != "lo" and link.get("operstate") != "UP"
                ]
                if not down:
                    break
                if time.monotonic() > deadline:
                    raise HarnessError(f"links {down} of {ns.name} never came up")
                time.sleep(0.05)

    def listen(self, where: Netns, label: str, family: int, protocol: str, port: int) -> None:
        if protocol not in ("TCP", "UDP"):
            return  # no SCTP in this kernel: nothing could connect anyway
        key = (where.name, family, protocol, port)
        if key not in self.listening:
            self.responder.listen(where, label, family, protocol, port)
            self.listening.add(key)

    def prepare(self, sc: Scenario) -> None:
        """Routes, listeners and world-local addresses for one scenario.

        Both nodes route each pod address of the scenario to the twin on the
        side it belongs to, the other node through the underlay: a reply to a
        pod on this node must not end in nodeb's twin of it.
        """
        data = self.data
        node_cmds, nodeb_cmds = [], []
        for ip, side in sorted(self.placement(sc).items(), key=lambda kv: (kv[0].version, kv[0])):
            if self.placed.get(ip) == side:
                continue
            near, far, _plen = UNDERLAY[ip.version]
            pod = self.pods[(ip, side)]
            src = data.primary[ip.version]
            if side == "node":
                node_cmds.append(f"route replace {_addr(ip)} dev {pod.host_if} src {src}")
                nodeb_cmds.append(f"route replace {_addr(ip)} via {near} dev ul0")
            else:
                node_cmds.append(f"route replace {_addr(ip)} via {far} dev ul0 src {src}")
                nodeb_cmds.append(f"route replace {_addr(ip)} dev {pod.host_if}")
            self.placed[ip] = side
        ip_batch(self.node, node_cmds)
        ip_batch(self.nodeb, nodeb_cmds)

        placement = self.placement(sc)
        for eps, _ep, address in sc.endpoints():
            pod = self.pods[(address, placement[address])]
            for port in eps.get("ports") or []:
                self.listen(
                    pod.ns, pod.label, address.version, port.get("protocol", "TCP"), port["port"]
                )

        world_local: set[Address] = set()
        for p in sc.packets:
            dest = p.dest
            if dest.ip.is_loopback and data.is_pod(p.source):
                pod = self.pods[(p.source, "node")]
                self.listen(pod.ns, pod.label, p.family, p.protocol, dest.port)
            elif data.is_node(dest.ip):
                self.listen(self.node, "node", p.family, p.protocol, dest.port)
            elif data.is_pod(dest.ip):
                if (dest.ip, "node") in self.pods:
                    pod = self.pods[(dest.ip, "node")]
                    self.listen(pod.ns, pod.label, p.family, p.protocol, dest.port)
            elif "pass" in (p.outcome, expectation_kind(p.iptables_expect or p.expect)):
                world_local.add(dest.ip)
                self.listen(self.world, "world", p.family, p.protocol, dest.port)
        world_cmds = [
            f"route del local {_addr(ip)} dev lo table local"
            for ip in self.world_local - world_local
        ]
        world_cmds += [
            f"route add local {_addr(ip)} dev lo table local"
            for ip in world_local - self.world_local
        ]
        ip_batch(self.world, world_cmds)
        self.world_local = world_local

    # -- clients

    def client(self, source: Address) -> tuple[str, Netns]:
        """("pod" | "world" | "node", the namespace) a source address sends from."""
        if self.data.is_node(source):
            return "node", self.node
        if self.data.is_pod(source):
            return "pod", self.pods[(source, "node")].ns
        return "world", self.world


# ---------------------------------------------------------------------------- cgroup


def cgroup2_mount() -> Path:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    raise HarnessError("no cgroup2 mount in /proc/self/mounts")


class TestCgroup:
    """A fresh cgroup v2 directory for node clients; lbctl's socket hooks go there only."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.mount = cgroup2_mount()
        self.path = self.mount / f"lbctl-conformance-{os.getpid()}"
        self.path.mkdir()  # never adopt an existing one
        if self.path.parent != self.mount or self.path == self.mount:
            raise HarnessError(f"refusing cgroup {self.path}")

    @property
    def relative(self) -> str:
        """The path as /proc/PID/cgroup shows it ("/lbctl-conformance-PID")."""
        return "/" + str(self.path.relative_to(self.mount))

    def join(self) -> None:
        """For preexec_fn: move the calling (child) process into the cgroup."""
        fd = os.open(self.path / "cgroup.procs", os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)

    def remove(self) -> None:
        deadline = time.monotonic() + 5
        while self.path.exists():
            try:
                self.path.rmdir()  # programs attached to it are released with it
            except OSError as exc:  # EBUSY: a client that exited may not have left yet
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


# ------------------------------------------------------------------------------ agent


class Agent:
    """`lbctl run` for one proxy config at a time, fed from a manifest directory."""

    def __init__(self, topo: Topology, workdir: Path, pin_prefix: str, cgroup: TestCgroup) -> None:
        self.topo = topo
        self.workdir = workdir
        self.pin_prefix = pin_prefix
        self.cgroup = cgroup
        self.manifests = workdir / "manifests"
        self.manifests.mkdir(parents=True, exist_ok=True)
        self.proc: AgentProcess | None = None
        self.config: ProxyConfig | None = None
        self.failed: dict[ProxyConfig, str] = {}
        self.failed_shows: dict[tuple[ProxyConfig | None, str], str] = {}
        self.pins: list[Path] = []
        self._starts = itertools.count(1)
        self._marker = itertools.count(1000)
        self.scenario: str | None = None

    def flags(self, config: ProxyConfig) -> list[str]:
        if self.cgroup.path == self.cgroup.mount:  # belt and braces: never the root cgroup
            raise HarnessError("refusing to start lbctl on the root cgroup")
        data = self.topo.data
        return [
            "--hostname-override",
            "test-node",
            "--node-ip",
            str(data.primary[4]),
            "--cgroup",  # two arguments: AgentProcess adds --cgroup "" when it sees none
            str(self.cgroup.path),
            "--metrics-bind-address=",
            "--healthz-bind-address=",
            *config.flags(),
        ]

    def log_tail(self, lines: int = 30) -> str:
        if self.proc is None:
            return ""
        return "\n".join(self.proc.log_text().splitlines()[-lines:])

    def ensure(self, config: ProxyConfig) -> None:
        if config in self.failed:
            raise HarnessError(self.failed[config])
        if self.config == config and self.proc is not None and self.proc.proc is not None:
            if self.proc.proc.poll() is None:
                return
            raise HarnessError(f"lbctl exited ({self.proc.proc.returncode}):\n{self.log_tail()}")
        self.stop()
        n = next(self._starts)
        pin = Path("/sys/fs/bpf") / f"{self.pin_prefix}conformance-{n}"
        self.pins.append(pin)
        for old in self.manifests.iterdir():
            old.unlink()
        log = self.workdir / f"agent-{n}.log"
        self.proc = AgentProcess(self.topo.node, self.manifests, pin, log, *self.flags(config))
        self.config = config
        self.scenario = None
        self.proc.start()
        try:
            self.proc.wait_for_log("synced:", timeout=AGENT_START)
        except AssertionError as exc:
            message = f"lbctl run {' '.join(self.flags(config))} did not start: {exc}"
            self.failed[config] = message
            self.stop()
            raise HarnessError(message) from None

    def show(self, sc: Scenario) -> None:
        """Replace the manifests with the scenario's and wait until the maps hold them."""
        if self.scenario == sc.name:
            return
        if (self.config, sc.name) in self.failed_shows:
            raise HarnessError(self.failed_shows[(self.config, sc.name)])
        assert self.proc is not None
        marker = next(self._marker)
        objects = [marker_manifest(marker)]
        objects += [service_manifest(svc) for svc in sc.services]
        objects += [slice_manifest(eps, "test-node") for eps in sc.slices]
        k8s_yaml.write(self.manifests / "scenario.yaml", *objects)
        mine = {f"{svc['namespace']}/{svc['name']}" for svc in sc.services}
        expected = {  # at least a ClusterIP frontend each
            f"{svc['namespace']}/{svc['name']}"
            for svc in sc.services
            if IP(svc["clusterIP"]).version == 4
            and any(p.get("protocol", "TCP") in ("TCP", "UDP") for p in svc.get("ports") or [])
        }
        marker_ref = f"{MARKER_NAMESPACE}/{MARKER_NAME}"
        deadline = time.monotonic() + APPLY_WAIT
        last: Any = None
        seen: set[str] = set()
        while time.monotonic() < deadline:
            frontends = self.frontends()
            seen = {f["service"] for f in frontends} - {marker_ref}
            marked = any(f["service"] == marker_ref and f["port"] == marker for f in frontends)
            if marked and expected <= seen <= mine:
                if frontends == last:  # the same twice in a row: the change is complete
                    self.scenario = sc.name
                    return
                last = frontends
            time.sleep(0.03)
        message = (
            f"scenario {sc.name}: the maps never showed its Services (marker {marker}); "
            f"expected {sorted(expected)}, saw {sorted(seen)}\n{self.log_tail()}"
        )
        self.failed_shows[(self.config, sc.name)] = message
        self.scenario = None
        raise HarnessError(message)

    def frontends(self) -> list[dict[str, Any]]:
        """The frontends of the pinned maps (what `lbctl maps dump -o json` prints)."""
        from lbctl.datapath.ebpf import (
            inspect as dump,  # the same reader as the CLI, without its start-up time
        )

        assert self.proc is not None
        try:
            frontends: list[dict[str, Any]] = dump.read(self.proc.pin_dir)["frontends"]
        except Exception:  # not pinned yet, or a map being replaced
            return []
        return frontends

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        self.config = None
        self.scenario = None

    def close(self, remove_pins: Any) -> None:
        try:
            self.stop()
        finally:
            for pin in self.pins:
                remove_pins(pin)


# ---------------------------------------------------------------------------- verdicts


@dataclasses.dataclass
class Verdict:
    packet: Packet
    client: str
    results: list[dict[str, Any]]
    problems: list[str]
    accepted: str  # which expectation matched ("" if none)

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        p = self.packet
        alt = f" (iptables mode: {p.iptables_expect})" if p.iptables_expect else ""
        lines = [
            f"{p.protocol} {p.source} -> {p.dest} from {self.client}: expected {p.expect}"
            f"{alt}, masquerade {p.masquerade}" + (f" -- {p.why}" if p.why else ""),
            *self.problems,
            "attempts:",
            *(f"  {describe(r)}" for r in self.results),
        ]
        return "\n".join(lines)


def describe(r: dict[str, Any]) -> str:
    took = f"after {r.get('seconds', 0):.3f} s"
    if r.get("outcome") == "reply":
        a = r["reply"]
        return (
            f"answered by {a['where']} at {a['local']}, which saw {a['peer']} "
            f"(client {r['client']}) {took}"
        )
    if r.get("outcome") == "refused":
        return f"refused (RST or ICMP unreachable) {took}"
    if r.get("outcome") == "timeout":
        return f"no answer ({r.get('stage')}) {took}"
    return f"error {r.get('detail')} at {r.get('stage')} {took}"


def judge(
    data: Data,
    topo: Topology,
    packet: Packet,
    expect: dict[str, Any],
    results: list[dict[str, Any]],
) -> list[str]:
    """What is wrong with the results under one expectation ([] if nothing)."""
    kind = expectation_kind(expect)
    if not results:
        return ["no attempt was made"]
    problems = []
    for n, r in enumerate(results, 1):
        outcome = r.get("outcome")
        if kind == "reject":
            if outcome != "refused":
                problems.append(f"attempt {n}: expected a reject, got: {describe(r)}")
            elif r["seconds"] > REJECT_FAST:
                problems.append(f"attempt {n}: refused, but only after {r['seconds']:.2f} s")
            continue
        if kind == "drop":
            if not (outcome == "timeout" and (packet.protocol == "UDP" or r["stage"] == "connect")):
                problems.append(f"attempt {n}: expected silence, got: {describe(r)}")
            continue
        if outcome != "reply":
            problems.append(f"attempt {n}: expected an answer, got: {describe(r)}")
            continue
        answer = r["reply"]
        local, peer, client = (
            Dest.parse(answer["local"]),
            Dest.parse(answer["peer"]),
            Dest.parse(r["client"]),
        )
        if kind == "dnat_to":
            backends = {Dest.parse(d) for d in expect["dnat_to"]}
            if local not in backends or not answer["where"].startswith("pod "):
                problems.append(
                    f"attempt {n}: landed on {answer['where']} at {local}, not on one of "
                    f"{sorted(map(str, backends))}"
                )
            elif packet.masquerade and peer.ip not in data.node_ips:
                problems.append(
                    f"attempt {n}: backend {local} saw {peer}, expected a node address (masquerade)"
                )
            elif not packet.masquerade and peer != client:
                problems.append(
                    f"attempt {n}: backend {local} saw {peer}, expected the client itself "
                    f"{client} (no masquerade)"
                )
        else:  # pass: the original destination, untouched, from the original source
            where = expected_listener(data, topo, packet)
            if local != packet.dest or answer["where"] != where:
                problems.append(
                    f"attempt {n}: landed on {answer['where']} at {local}, expected {where} "
                    f"at {packet.dest} untouched"
                )
            elif peer != client:
                problems.append(
                    f"attempt {n}: {where} saw {peer}, expected the original source {client}"
                )
    return problems


def expected_listener(data: Data, topo: Topology, packet: Packet) -> str:
    dest = packet.dest.ip
    if dest.is_loopback and data.is_pod(packet.source):
        return topo.pods[(packet.source, "node")].label
    if data.is_node(dest):
        return "node"
    if data.is_pod(dest):
        return topo.pods[(dest, "node")].label
    return "world"


# ----------------------------------------------------------------------------- harness


class Harness:
    """The lab, its servers, the test cgroup and the agent, for a whole test module."""

    def __init__(self, data: Data, workdir: Path, pin_prefix: str) -> None:
        self.data = data
        self.workdir = workdir
        self.pin_prefix = pin_prefix
        self.lab = Lab()
        self.responder: Responder | None = None
        self.cgroup: TestCgroup | None = None
        self.topo: Topology | None = None
        self.agent: Agent | None = None

    def start(self) -> Harness:
        self.responder = Responder()
        self.topo = Topology(self.lab, self.data, self.responder)
        self.cgroup = TestCgroup()
        self.agent = Agent(self.topo, self.workdir, self.pin_prefix, self.cgroup)
        return self

    def close(self, remove_pins: Any) -> None:
        steps = [
            lambda: self.agent and self.agent.close(remove_pins),
            lambda: self.responder and self.responder.close(),
            self.lab.close,
            lambda: self.cgroup and self.cgroup.remove(),
        ]
        errors = []
        for step in steps:
            try:
                step()
            except Exception as exc:  # clean up the rest regardless
                errors.append(exc)
        if errors:
            raise errors[0]

    def activate(self, scenario: Scenario) -> None:
        assert self.topo is not None and self.agent is not None
        self.topo.prepare(scenario)
        self.agent.ensure(proxy_config(self.data, scenario))
        self.agent.show(scenario)

    def check(self, packet: Packet) -> Verdict:
        assert self.topo is not None and self.cgroup is not None
        if packet.protocol not in ("TCP", "UDP"):
            try:
                socket.socket(_af(packet.family), socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
                why = "the harness sends TCP and UDP only"
            except OSError as exc:
                why = f"this kernel cannot send it ({exc.strerror})"
            raise HarnessError(f"{packet.protocol}: {why}")
        self.activate(self.data.scenario(packet.scenario))
        kind = packet.outcome
        tries = max(TRIES[kind], TRIES[expectation_kind(packet.iptables_expect or packet.expect)])
        if kind == "drop":
            timeouts = {"connect": DROP_WAIT, "reply": DROP_WAIT}
        else:
            timeouts = {"connect": REPLY_WAIT, "reply": REPLY_WAIT}
        timeouts["want_reply"] = float(kind in ("dnat_to", "pass"))
        where, ns = self.topo.client(packet.source)
        if where == "node":
            results = self._node_client(packet, timeouts, tries)
        else:
            bind = str(packet.source) if where == "world" else None
            results = attempts(
                lambda: ns.open_socket(_af(packet.family), _kind(packet.protocol)),
                packet.protocol,
                bind,
                packet.dest,
                timeouts,
                tries,
            )
        problems = judge(self.data, self.topo, packet, packet.expect, results)
        accepted = "" if problems else "expect"
        if (
            problems
            and packet.iptables_expect
            and not judge(self.data, self.topo, packet, packet.iptables_expect, results)
        ):
            problems, accepted = [], "iptables_mode_expect"
        label = {"node": "the node (test cgroup)", "pod": f"pod {packet.source}", "world": "world"}
        if problems and self.responder is not None and self.responder.errors:
            problems.append(f"lab servers reported: {self.responder.errors[-5:]}")
        return Verdict(packet, label[where], results, problems, accepted)

    def _node_client(
        self, packet: Packet, timeouts: dict[str, float], tries: int
    ) -> list[dict[str, Any]]:
        assert self.topo is not None and self.cgroup is not None
        request = {
            "cgroup": self.cgroup.relative,
            "family": packet.family,
            "protocol": packet.protocol,
            "dest": str(packet.dest),
            "timeouts": timeouts,
            "tries": tries,
        }
        proc = subprocess.run(
            [
                "nsenter",
                f"--net={self.topo.node.path}",
                sys.executable,
                "-m",
                "tests.conformance",
                "--node-client",
            ],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            preexec_fn=self.cgroup.join,
            check=False,
        )
        try:
            answer = json.loads(proc.stdout)
        except ValueError:
            raise HarnessError(f"node client failed ({proc.returncode}): {proc.stderr}") from None
        if "error" in answer:
            raise HarnessError(f"node client: {answer['error']}")
        results: list[dict[str, Any]] = answer["results"]
        return results


if __name__ == "__main__":
    if sys.argv[1:] == ["--node-client"]:
        sys.exit(node_client_main())
    sys.exit(f"usage: {sys.argv[0]} --node-client < request.json")
