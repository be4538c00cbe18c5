"""`lbctl trace` against a real agent, held to where real packets go.

The world of tests/extlab.py: an outside client with two addresses, node A
running the real agent (`lbctl run --manifests`, its health server on
127.0.0.1:10256 inside node A's namespace), node B over an underlay, pods
on both answering with their name and the peer address they saw.  Services
cover ClusterIP, NodePort, externalIP and LoadBalancer IPs, source ranges, no
endpoints, externalTrafficPolicy Local with local and with remote-only
endpoints, ClientIP affinity, not-ready and terminating endpoints, and the
schedulers maglev, sh, wrr, rr, lc and random.

Generated cases (a seeded RNG over clients, source ports and frontends, plus
repeats of earlier tuples for conntrack and affinity) each run
`lbctl trace -o json` first, then send a real TCP connection or UDP datagram
from exactly that source address and port, and check that the packet went
where the trace said: to its backend when the trace is deterministic, to one
of its candidates otherwise, masqueraded or not as it said, refused when it
said reject, silent when it said drop, and unanswered by any backend when it
said the packet passes.
"""

from __future__ import annotations

import errno
import http.client
import ipaddress
import json
import random
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lbctl.agent.http.trace import settings_of as tracez_settings
from lbctl.datapath import NodeConfig
from lbctl.datapath.ebpf import conntrack_gc, libbpf
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.datapath.ebpf.trace.decide import Knobs, trace
from lbctl.datapath.ebpf.trace.view import MapView, Packet
from lbctl.model import Protocol, ServiceRef
from lbctl.plan.planner import SCOPE_ALL, SCOPE_EXTERNAL, Backend, Frontend, FrontendKey
from tests import extlab, k8s_yaml, packets
from tests.agent_proc import AgentProcess, lbctl
from tests.extlab import CLIENT_IP, NODE_A, NODE_B, NODE_IP, OTHER_CLIENT_IP, World
from tests.netlab import Lab, Netns, TcpServer, UdpServer
from tests.test_bpf_prog import TC_ACT_SHOT

pytestmark = pytest.mark.netns

HEALTH = "127.0.0.1:10256"
TARGETS = [("http", "TCP", 8080), ("dns", "UDP", 5353)]
HTTP = [("http", "TCP", 80)]
BOTH = [("http", "TCP", 80), ("dns", "UDP", 53)]
NOT_READY = {"ready": False, "serving": False, "terminating": False}


def lb_service(
    name: str,
    cluster_ip: str,
    ports: list[tuple[str, str, int]],
    node_ports: list[int],
    lb_ip: str,
    scheduler: str,
    **spec: Any,
) -> dict[str, Any]:
    svc = k8s_yaml.service(name, cluster_ip, ports, type="LoadBalancer", **spec)
    for port, node_port in zip(svc["spec"]["ports"], node_ports, strict=True):
        port["nodePort"] = node_port
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}
    svc["metadata"]["annotations"] = {"lbctl.io/scheduler": scheduler}
    return svc


def cluster_service(
    name: str, cluster_ip: str, ports: list[tuple[str, str, int]], scheduler: str, **spec: Any
) -> dict[str, Any]:
    svc = k8s_yaml.service(name, cluster_ip, ports, **spec)
    svc["metadata"]["annotations"] = {"lbctl.io/scheduler": scheduler}
    return svc


def publish(manifests: Path, w: World) -> None:
    a0, a1 = (p.ip for p in w.pods_a)
    b0, b1 = (p.ip for p in w.pods_b)
    nodes = {a0: NODE_A, a1: NODE_A, b0: NODE_B, b1: NODE_B}

    def eps(name: str, ips: list[str], **kw: Any) -> dict[str, Any]:
        return k8s_yaml.endpoint_slice(name, ips, TARGETS, nodes=nodes, **kw)

    every = [a0, a1, b0, b1]
    k8s_yaml.write(
        manifests / "web.yaml",
        lb_service(
            "web",
            "10.96.0.50",
            BOTH,
            [30080, 30081],
            "203.0.113.100",
            "maglev",
            externalIPs=["203.0.113.200"],
        ),
        eps("web", every),
    )
    k8s_yaml.write(
        manifests / "local.yaml",
        lb_service(
            "local",
            "10.96.0.51",
            HTTP,
            [30090],
            "203.0.113.101",
            "sh",
            externalTrafficPolicy="Local",
        ),
        eps("local", [a0, a1, b0], conditions={a1: k8s_yaml.TERMINATING}),
    )
    k8s_yaml.write(
        manifests / "remote.yaml",
        lb_service(
            "remote",
            "10.96.0.52",
            HTTP,
            [30092],
            "203.0.113.102",
            "wrr",
            externalTrafficPolicy="Local",
        ),
        eps("remote", [b0, b1]),
    )
    k8s_yaml.write(
        manifests / "ranges.yaml",
        lb_service(
            "ranges",
            "10.96.0.53",
            BOTH,
            [30094, 30095],
            "203.0.113.103",
            "rr",
            loadBalancerSourceRanges=[f"{CLIENT_IP}/32", "10.244.0.0/16"],
        ),
        eps("ranges", [a0, b1]),
    )
    k8s_yaml.write(
        manifests / "empty.yaml",
        cluster_service("empty", "10.96.0.54", BOTH, "random"),
        eps("empty", []),
    )
    k8s_yaml.write(
        manifests / "sticky.yaml",
        cluster_service(
            "sticky",
            "10.96.0.55",
            BOTH,
            "random",
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 300}},
        ),
        eps("sticky", every),
    )
    k8s_yaml.write(
        manifests / "states.yaml",
        cluster_service("states", "10.96.0.56", HTTP, "lc"),
        eps("states", every, conditions={a1: NOT_READY, b0: k8s_yaml.GONE}),
    )


# (address, port, protocol) of every frontend the cases aim at, and one of nothing
DESTINATIONS = [
    ("10.96.0.50", 80, "tcp"),
    ("10.96.0.50", 53, "udp"),
    (NODE_IP, 30080, "tcp"),
    (NODE_IP, 30081, "udp"),
    ("203.0.113.100", 80, "tcp"),
    ("203.0.113.200", 53, "udp"),
    ("203.0.113.101", 80, "tcp"),
    (NODE_IP, 30090, "tcp"),
    ("203.0.113.102", 80, "tcp"),
    (NODE_IP, 30092, "tcp"),
    ("203.0.113.103", 80, "tcp"),
    ("203.0.113.103", 53, "udp"),
    ("10.96.0.54", 80, "tcp"),
    ("10.96.0.54", 53, "udp"),
    ("10.96.0.55", 80, "tcp"),
    ("10.96.0.55", 53, "udp"),
    ("10.96.0.56", 80, "tcp"),
    ("10.96.0.99", 80, "tcp"),
]


@dataclass(frozen=True)
class Case:
    client: str  # "outside", "other" (the second outside address), "pod"
    sport: int
    dst: str
    dport: int
    proto: str


@dataclass(frozen=True)
class Outcome:
    kind: str  # "reply", "refused", "timeout", "unreachable"
    pod: str = ""
    peer_ip: str = ""


def send(ns: Netns, src: str, case: Case, timeout: float = 1.0) -> Outcome:
    """One connection (TCP) or datagram (UDP) from exactly src:sport."""
    kind = socket.SOCK_STREAM if case.proto == "tcp" else socket.SOCK_DGRAM
    with ns.open_socket(socket.AF_INET, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if kind == socket.SOCK_STREAM:  # close with RST: no TIME_WAIT on the tuple
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.settimeout(timeout)
        sock.bind((src, case.sport))
        try:
            # a connected UDP socket takes replies only from dst:dport (reverse NAT)
            sock.connect((case.dst, case.dport))
            sock.send(b"trace\n")
            raw = sock.recv(1024).decode()
        except ConnectionRefusedError:
            return Outcome("refused")
        except TimeoutError:
            return Outcome("timeout")
        except OSError as err:
            if err.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                return Outcome("unreachable")
            raise
    pod, peer = raw.split(" ")[:2]
    return Outcome("reply", pod, peer.rsplit(":", 1)[0])


class Env:
    def __init__(self, world: World, agent: AgentProcess) -> None:
        self.world = world
        self.agent = agent
        self.pod_ips = {p.name: p.ip for p in world.pods_a + world.pods_b}

    def source(self, client: str) -> tuple[Netns, str]:
        w = self.world
        if client == "pod":
            return w.pod_client.ns, w.pod_client.ip
        return w.client, CLIENT_IP if client == "outside" else OTHER_CLIENT_IP

    def trace(self, case: Case, *extra: str) -> tuple[int, dict[str, Any]]:
        _, src = self.source(case.client)
        out = self.run_trace(
            "-o", "json", "--src", f"{src}:{case.sport}", "--dst", f"{case.dst}:{case.dport}",
            "--proto", case.proto, *extra,
        )  # fmt: skip
        assert out.returncode in (0, 3, 4), out.stderr
        return out.returncode, json.loads(out.stdout)

    def run_trace(self, *args: str) -> subprocess.CompletedProcess[str]:
        return lbctl("trace", *args, node=self.world.node_a, check=False)


@pytest.fixture
def env(tmp_path: Path, pin_dir: Path) -> Iterator[Env]:
    with Lab() as lab:
        world = extlab.build(lab, pods_a=2, pods_b=2)
        for pod in world.pods_a + world.pods_b:
            TcpServer(pod, 8080)
            UdpServer(pod, 5353)
        manifests = tmp_path / "manifests"
        manifests.mkdir()
        publish(manifests, world)
        flags = extlab.agent_flags()
        flags[flags.index("--healthz-bind-address") + 1] = HEALTH
        agent = AgentProcess(world.node_a, manifests, pin_dir, tmp_path / "agent.log", *flags)
        try:
            agent.start()
            agent.wait_for_log("synced:")
            yield Env(world, agent)
        finally:
            agent.stop()


def generated_cases(rng: random.Random, n: int) -> list[Case]:
    cases: list[Case] = []
    for i in range(n):
        if i % 5 == 4 and cases:  # a tuple seen before: conntrack
            cases.append(rng.choice(cases))
            continue
        if i % 5 == 2 and cases:  # a client and frontend seen before: affinity, sh
            old = rng.choice(cases)
            cases.append(
                Case(old.client, rng.randrange(20000, 30000), old.dst, old.dport, old.proto)
            )
            continue
        dst, dport, proto = rng.choice(DESTINATIONS)
        client = rng.choice(["outside", "outside", "other", "pod", "pod"])
        cases.append(Case(client, rng.randrange(20000, 30000), dst, dport, proto))
    return cases


def check_agreement(env: Env, case: Case, code: int, t: dict[str, Any], real: Outcome) -> None:
    where = f"{case}: trace {t['verdict']} ({t['reason']}), really {real}"
    verdict = t["verdict"]
    assert code == {"forward": 0, "pass": 3, "drop": 4, "reject": 4}[verdict], where
    if verdict == "reject":
        assert real.kind == "refused", where
        return
    if verdict == "drop":
        assert real.kind == "timeout", where
        return
    if verdict == "pass":
        assert real.kind in ("unreachable", "timeout"), where  # no backend answered
        return
    assert real.kind == "reply", where
    landed = env.pod_ips[real.pod]
    choice = t["choice"]
    if choice["deterministic"]:
        assert landed == choice["backend"]["address"], where
    else:
        assert landed in {c["address"] for c in choice["candidates"]}, where
    # the backends the trace lists are what the maps hold: the real one is among them
    assert landed in {b["address"] for b in t["backends"]}, where
    masq = masquerade_of(t, landed)
    _, src = env.source(case.client)
    expected_peer = masq["address"].split(":")[0] if masq["applies"] else src
    assert real.peer_ip == expected_peer, where


def test_trace_agrees_with_real_packets(env: Env) -> None:
    rng = random.Random(8)
    cases = generated_cases(rng, 30)
    seen: dict[str, int] = {}
    for case in cases:
        code, t = env.trace(case)
        ns, src = env.source(case.client)
        real = send(ns, src, case)
        check_agreement(env, case, code, t, real)
        how = (t["choice"] or {}).get("by") or t["verdict"]
        seen[how] = seen.get(how, 0) + 1
    # the generated cases reached every kind of decision
    assert {"scheduler", "conntrack", "affinity", "reject", "pass", "drop"} <= set(seen), seen
    assert sum(seen.values()) >= 20
    print(f"{len(cases)} cases, decided by: {seen}")


def by_address(t: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["address"]: e for e in t["notBackends"]}


def test_trace_explains_each_decision(env: Env) -> None:
    w = env.world
    a0, a1 = (p.ip for p in w.pods_a)
    b0, b1 = (p.ip for p in w.pods_b)

    # externalTrafficPolicy Local from outside: this node's ready endpoint only, by sh
    case = Case("outside", 21000, "203.0.113.101", 80, "tcp")
    code, t = env.trace(case)
    assert code == 0 and t["frontend"]["scope"] == "external", t
    assert t["frontend"]["service"] == "test/local" and t["frontend"]["kind"] == "LoadBalancer"
    assert [b["address"] for b in t["backends"]] == [a0]
    assert t["choice"]["deterministic"] and t["choice"]["backend"]["address"] == a0
    assert t["masquerade"]["applies"] is False
    assert t["backends"][0]["why"] == "ready, on this node (externalTrafficPolicy Local)"
    why = by_address(t)
    assert why[a1]["why"] == (
        "serving, terminating: used only when no endpoint is ready, and some are"
    )
    assert why[b0]["why"].startswith(f"on node {NODE_B}, not this node ({NODE_A})")
    steps = [s["step"] for s in t["steps"]]
    assert steps == ["conntrack", "frontend", "traffic policy", "scheduler"]
    assert send(w.client, CLIENT_IP, case).pod == "a0"

    # the same frontend from a pod: every ready endpoint, the cluster-wide entry
    code, t = env.trace(Case("pod", 21001, "203.0.113.101", 80, "tcp"))
    assert code == 0 and t["frontend"]["scope"] == "all"
    assert sorted(b["address"] for b in t["backends"]) == sorted([a0, b0])

    # remote-only endpoints under Local: outside clients are dropped, not rejected
    code, t = env.trace(Case("outside", 21002, NODE_IP, 30092, "tcp"))
    assert code == 4 and t["verdict"] == "drop" and t["backends"] == []
    assert t["reason"] == "no backend on this node (its endpoints are on other nodes)"
    assert {by_address(t)[ip]["node"] for ip in (b0, b1)} == {NODE_B}

    # not ready and terminating endpoints are left out, each with its condition
    code, t = env.trace(Case("pod", 21003, "10.96.0.56", 80, "tcp"))
    assert code == 0 and t["choice"]["scheduler"] == "lc"
    assert sorted(b["address"] for b in t["backends"]) == sorted([a0, b1])
    why = by_address(t)
    assert why[a1]["why"] == "not ready: gets no traffic"
    assert why[b0]["why"] == "terminating, not serving: gets no traffic"

    # source ranges: the second outside address is not in them
    code, t = env.trace(Case("other", 21004, "203.0.113.103", 80, "tcp"))
    assert code == 4 and t["verdict"] == "drop"
    assert t["frontend"]["sourceRanges"] == ["10.244.0.0/16", f"{CLIENT_IP}/32"]
    assert t["steps"][-1] == {
        "step": "source ranges",
        "result": f"{OTHER_CLIENT_IP} is in none of 10.244.0.0/16, {CLIENT_IP}/32: dropped",
    }

    # no endpoints: rejected; nothing at the address: passes untouched, and the
    # agent says what the address does serve
    code, t = env.trace(Case("pod", 21005, "10.96.0.54", 53, "udp"))
    assert code == 4 and t["verdict"] == "reject"
    code, t = env.trace(Case("pod", 21006, "10.96.0.50", 8080, "tcp"))
    assert code == 3 and t["verdict"] == "pass" and t["frontend"] is None
    assert "the agent serves this address on 10.96.0.50:53/UDP, 10.96.0.50:80/TCP" in t["notes"]

    # the table output, as an operator reads it
    out = env.run_trace("--src", f"{CLIENT_IP}:21000", "--dst", "203.0.113.101:80")
    assert out.returncode == 0 and out.stderr == ""
    lines = out.stdout.splitlines()
    assert lines[0] == f"PACKET   TCP {CLIENT_IP}:21000 -> 203.0.113.101:80"
    assert lines[1].startswith("SERVICE  test/local port http, LoadBalancer (scope external")
    assert lines[-1] == (
        f"VERDICT  forward: an existing flow: to {a0}:8080, client address kept "
        "(as the flow was when it started) (exit 0)"
    )


def test_trace_without_the_agent_and_bad_input(env: Env) -> None:
    case = Case("pod", 22000, "10.96.0.50", 80, "tcp")
    _, with_agent = env.trace(case)
    # the agent's /tracez refuses a query that names no frontend address, saying why
    with env.world.node_a.entered():
        conn = http.client.HTTPConnection(*HEALTH.split(":"), timeout=5)
        conn.request("GET", "/tracez?address=10.96.0.300&port=80")
        resp = conn.getresponse()
        body = resp.read().decode()
        conn.close()
    assert resp.status == 400 and body.startswith("/tracez: address: "), body
    env.agent.kill()
    out = env.run_trace(
        "-o", "yaml", "--src", f"{env.world.pod_client.ip}:22000", "--dst", "10.96.0.50:80",
        "--bpffs", str(env.agent.pin_dir),
    )  # fmt: skip
    import yaml

    t = yaml.safe_load(out.stdout)
    assert out.returncode == 0
    assert t["plan"]["available"] is False
    assert t["plan"]["error"].startswith(f"the agent is not reachable at {HEALTH}")
    assert "the agent did not say" in t["settingsFrom"]
    # the same decision from the maps alone, without the reasons
    assert t["choice"] == with_agent["choice"]
    assert all("why" not in b for b in t["backends"])
    assert out.stderr.startswith(f"lbctl trace: the agent is not reachable at {HEALTH}")

    for args, message in [
        (["--src", "10.0.0.1", "--dst", "10.96.0.50"], "--dst '10.96.0.50': give the port too"),
        (["--src", "nohost:1", "--dst", "10.96.0.50:80"], "'nohost' is not an IPv4 address"),
        (["--src", "10.0.0.1", "--dst", "10.96.0.50:99999"], "'99999' is not a port number"),
    ]:
        bad = env.run_trace(*args)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    missing = env.run_trace(
        "--src", "10.0.0.1", "--dst", "10.96.0.50:80", "--bpffs", "/sys/fs/bpf/lbctl-none"
    )
    assert missing.returncode == 1
    assert "no lbctl maps under /sys/fs/bpf/lbctl-none" in missing.stderr


# -- the decision alone, against the program under BPF_PROG_TEST_RUN ---------------------

SNAT = "192.0.2.1"
CIDR = "10.244.0.0/16"
OUTSIDE_HOSTS = ("192.168.50.10", "192.168.50.11")


def masquerade_of(t: dict[str, Any], backend: str) -> dict[str, Any]:
    """The trace's masquerade decision for the backend the packet went to."""
    masq: dict[str, Any] = t["masquerade"]
    if masq.get("byBackend"):
        [masq] = [m for m in masq["byBackend"] if m["backend"].split(":")[0] == backend]
    return masq


def prog_frontends() -> dict[FrontendKey, Frontend]:
    def fe(
        vip: str,
        port: int,
        proto: Protocol,
        backends: list[str],
        scheduler: str,
        kind: str = "ClusterIP",
        scope: int = SCOPE_ALL,
        **kw: Any,
    ) -> Frontend:
        weights = kw.pop("weights", [1] * len(backends))
        return Frontend(
            FrontendKey(ipaddress.IPv4Address(vip), port, proto, scope),
            ServiceRef("ns", f"{scheduler}-{vip}-{port}"),
            "p",
            kind,
            tuple(
                Backend(ipaddress.IPv4Address(a), 8080, proto, weight=w)
                for a, w in zip(backends, weights, strict=True)
            ),
            scheduler=scheduler,
            **kw,
        )

    pods = [f"10.244.1.{i}" for i in range(10, 17)]
    ranges = (ipaddress.IPv4Network("10.0.0.0/9"), ipaddress.IPv4Network(CIDR))
    tcp, udp = Protocol.TCP, Protocol.UDP
    out = [
        fe("10.96.0.10", 80, tcp, pods[:5], "maglev"),
        fe("10.96.0.10", 53, udp, pods[:4], "sh"),
        fe("10.96.0.11", 80, tcp, pods[:3], "wrr", weights=[1, 2, 3]),
        fe("10.96.0.12", 80, tcp, pods[2:6], "rr"),
        fe("10.96.0.13", 80, tcp, pods[:4], "lc"),
        fe("10.96.0.14", 53, udp, pods, "random", affinity_timeout=5),
        fe("10.96.0.15", 80, tcp, [], "random"),
        # a LoadBalancer IP with externalTrafficPolicy Local and source ranges
        fe("203.0.113.1", 80, tcp, pods[:3], "maglev", "LoadBalancer", local=True,
           source_ranges=ranges),
        fe("203.0.113.1", 80, tcp, pods[:1], "maglev", "LoadBalancer", SCOPE_EXTERNAL,
           local=True, source_ranges=ranges),
        # Local with remote-only endpoints: outside clients are dropped
        fe("203.0.113.2", 53, udp, pods[3:5], "sh", "LoadBalancer", local=True),
        fe("203.0.113.2", 53, udp, [], "sh", "LoadBalancer", SCOPE_EXTERNAL, local=True,
           drop_empty=True),
        fe("198.51.100.1", 30080, tcp, pods[4:7], "random", "NodePort"),
        # endpoints outside the pod network (an API server's), on this node, and both
        # mixed with a pod: the masquerade depends on the backend
        fe("10.96.0.1", 443, tcp, [OUTSIDE_HOSTS[0], OUTSIDE_HOSTS[1]], "rr"),
        fe("10.96.0.16", 53, udp, [pods[0], OUTSIDE_HOSTS[0], SNAT], "random"),
        fe("10.96.0.17", 80, tcp, [SNAT], "maglev"),
    ]  # fmt: skip
    return {f.key: f for f in out}


def program_verdict(dp: BpfDatapath, frame: bytes, client: str) -> tuple[str, str, str]:
    """(verdict, destination, source) of the frame the program let out."""
    result = libbpf.prog_test_run(dp.prog_fd, frame)
    if result.retval == TC_ACT_SHOT:
        return "drop", "", ""
    out = packets.parse(result.data)
    if out.dst == client:
        return "reject", "", ""
    if result.data == frame:
        return "pass", "", ""
    assert out.dst is not None and out.src is not None
    return "forward", out.dst, out.src


def test_trace_equals_the_program(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    dp.configure(
        NodeConfig(
            snat_address=ipaddress.IPv4Address(SNAT),
            cluster_cidrs=(ipaddress.IPv4Network(CIDR),),
            host_addresses=frozenset({ipaddress.IPv4Address(SNAT)}),
        )
    )
    frontends = prog_frontends()
    assert dp.reconcile(frontends) == []
    knobs = Knobs.from_agent(tracez_settings(dp.settings))
    destinations = sorted({(str(k.address), k.port, k.protocol) for k in frontends})
    destinations.append(("10.96.0.99", 80, Protocol.TCP))
    clients = ["10.0.0.7", "10.0.0.8", "10.244.0.10", "172.16.0.5"]
    rng = random.Random(11)
    done: list[Packet] = []
    by: dict[str, int] = {}
    masquerades: dict[tuple[bool, str], bool] = {}
    for i in range(600):
        if i % 4 == 3 and done:
            p = rng.choice(done)  # the same tuple again: conntrack
        else:
            dst, dport, proto = rng.choice(destinations)
            p = Packet(
                ipaddress.IPv4Address(rng.choice(clients)),
                rng.randrange(1024, 65536),
                ipaddress.IPv4Address(dst),
                dport,
                proto,
            )
        if i % 50 == 49:  # let affinity entries run out now and then
            for key, a in list(dp.maps.lb4_affinity.items()):
                a.last_seen_ns -= 6 * 10**9
                dp.maps.lb4_affinity.update(key, a)
        t = trace(MapView(dp.maps), p, conntrack_gc.now_ns(), knobs)
        assert p.sport is not None
        if p.protocol is Protocol.TCP:
            frame = packets.ipv4_tcp(str(p.src), str(p.dst), p.sport, p.dport, "S")
        else:
            frame = packets.ipv4_udp(str(p.src), str(p.dst), p.sport, p.dport, b"q")
        verdict, dst, src = program_verdict(dp, frame, str(p.src))
        where = f"{p}: trace {t['verdict']} {t['reason']}, program {verdict} to {dst} from {src}"
        assert verdict == t["verdict"], where
        done.append(p)
        how = (t["choice"] or {}).get("by") or t["verdict"]
        by[how] = by.get(how, 0) + 1
        if verdict != "forward":
            continue
        choice = t["choice"]
        if choice["deterministic"]:
            assert dst == choice["backend"]["address"], where
        else:
            assert dst in {c["address"] for c in choice["candidates"]}, where
        masq = masquerade_of(t, dst)
        assert src == (masq["address"].split(":")[0] if masq["applies"] else str(p.src)), where
        masquerades[(masq["applies"], masq["why"].split(":")[0])] = True
    assert {"scheduler", "conntrack", "affinity", "reject", "pass", "drop"} <= set(by), by
    # the backend's place decided some: a pod to the API server, anyone to this node
    assert (True, "a pod reaching 192.168.50.10, outside the cluster CIDRs") in masquerades
    assert (False, f"{SNAT} is an address of this node") in masquerades
    print(f"600 packets, decided by: {by}")
