"""The agent's Prometheus metrics as a scraper sees them: real agents, real packets.

The per-Service datapath counters are scraped over HTTP (from inside node
A's namespace, where the agent serves them on 127.0.0.1:10249) before and
after traffic from the outside client of tests/extlab.py: requests that go
through, and drops of every reason a test can cause (a Service without
endpoints, a client outside loadBalancerSourceRanges, externalTrafficPolicy
Local without a local endpoint, a NAT port range too small).  kube-proxy's
metrics are checked with an in-process agent following the real-protocol
API server of tests/apiserver.py.
"""

from __future__ import annotations

import datetime
import http.client
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbctl.agent.http.server import Observability
from lbctl.agent.loop import Agent
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.datapath.ebpf.servicecounters import DROP_REASONS
from lbctl.sources.kube import TRIGGER_TIME, KubeSource
from tests import extlab, k8s_yaml
from tests.agent_proc import AgentProcess
from tests.apiserver import FakeApiServer
from tests.extlab import CLIENT_IP, LB_IP, NODE_IP, OTHER_CLIENT_IP, World
from tests.kube_agent import kube_agent as kube_agent_in
from tests.netlab import Lab, Netns, RequestError, TcpServer, UdpServer, tcp_request, udp_request

pytestmark = pytest.mark.netns

METRICS = ("127.0.0.1", 10249)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
WEB_PORTS = [("http", "TCP", 80), ("dns", "UDP", 53)]
TARGETS = [("http", "TCP", 8080), ("dns", "UDP", 5353)]


def get(ns: Netns, address: tuple[str, int], path: str) -> tuple[int, dict[str, str], bytes]:
    with ns.entered():
        conn = http.client.HTTPConnection(*address, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no HELP text"
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def scrape(ns: Netns, address: tuple[str, int] = METRICS) -> Samples:
    status, _, body = get(ns, address, "/metrics")
    assert status == 200
    return parse(body.decode())


def svc_labels(service: str, port: str, protocol: str, **extra: str) -> dict[str, str]:
    return {"namespace": "test", "service": service, "port": port, "protocol": protocol, **extra}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def load_balancer(name: str, cluster_ip: str, node_ports: list[int], **spec: Any) -> Any:
    svc = k8s_yaml.service(name, cluster_ip, WEB_PORTS, type="LoadBalancer", **spec)
    for port, node_port in zip(svc["spec"]["ports"], node_ports, strict=True):
        port["nodePort"] = node_port
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    return svc


def node_port(
    name: str, cluster_ip: str, port: tuple[str, str, int], node: int, **spec: Any
) -> Any:
    svc = k8s_yaml.service(name, cluster_ip, [port], type="NodePort", **spec)
    svc["spec"]["ports"][0]["nodePort"] = node
    return svc


def send_udp(ns: Netns, source: str, ip: str, port: int, count: int) -> None:
    """Datagrams that expect no answer (they are dropped), each from a fresh socket."""
    for _ in range(count):
        with ns.open_socket(kind=socket.SOCK_DGRAM) as sock:
            sock.bind((source, 0))
            sock.sendto(b"hi\n", (ip, port))


def wait_for(check: Any, what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)


class Env:
    def __init__(self, world: World, agent: AgentProcess, manifests: Path) -> None:
        self.world = world
        self.agent = agent
        self.manifests = manifests

    def write(self, name: str, *objects: Any) -> None:
        k8s_yaml.write(self.manifests / f"{name}.yaml", *objects)

    def slice(self, service: str, pods: list[str], ports: Any = TARGETS) -> Any:
        w = self.world
        chosen = [p for p in w.pods_a + w.pods_b if p.name in pods]
        nodes = {p.ip: w.node_of(p) for p in chosen}
        return k8s_yaml.endpoint_slice(service, [p.ip for p in chosen], ports, nodes=nodes)


def start(tmp_path: Path, pin_dir: Path, lab: Lab, *flags: str, pods_b: int = 2) -> Env:
    world = extlab.build(lab, pods_a=2, pods_b=pods_b)
    for pod in world.pods_a + world.pods_b:
        TcpServer(pod, 8080)
        UdpServer(pod, 5353)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    flags = (*extlab.agent_flags(), "--metrics-bind-address", "127.0.0.1:10249", *flags)
    agent = AgentProcess(world.node_a, manifests, pin_dir, tmp_path / "agent.log", *flags)
    return Env(world, agent, manifests)


@pytest.fixture
def env(tmp_path: Path, pin_dir: Path) -> Iterator[Env]:
    with Lab() as lab:
        e = start(tmp_path, pin_dir, lab)
        try:
            yield e
        finally:
            e.agent.stop()


def test_service_counters_follow_traffic_and_drops(env: Env) -> None:
    w = env.world
    web = load_balancer(
        "web", "10.96.0.50", [30080, 30081], loadBalancerSourceRanges=[f"{CLIENT_IP}/32"]
    )
    env.write("web", web, env.slice("web", ["a0", "a1", "b0", "b1"]))
    env.write("empty", node_port("empty", "10.96.0.51", ("http", "TCP", 80), 30090))
    far = node_port(
        "faraway", "10.96.0.52", ("dns", "UDP", 53), 30091, externalTrafficPolicy="Local"
    )
    env.write("faraway", far, env.slice("faraway", ["b0", "b1"], [("dns", "UDP", 5353)]))
    env.agent.start()
    env.agent.wait_for_log("synced:")
    http_ = svc_labels("web", "http", "TCP")
    dns = svc_labels("web", "dns", "UDP")

    before = scrape(w.node_a)
    assert value(before, "lbctl_mode", mode="ebpf", configured="auto") == 1
    for labels in (http_, dns):  # every Service port has its series from the start
        assert value(before, "lbctl_service_new_connections_total", **labels) == 0
        series = frozenset({**labels, "direction": "request"}.items())
        assert ("lbctl_service_packets_total", series) in before
        # each drop reason too, at 0: a rate() over it is 0, not "no data"
        for reason in DROP_REASONS:
            drops = frozenset({**labels, "reason": reason}.items())
            assert before.get(("lbctl_service_drops_total", drops)) == 0, (labels, reason)
    per_port = [
        name
        for name, labels in before
        if name.startswith("lbctl_service_") and dict(labels).items() >= http_.items()
    ]
    assert len(per_port) == 10, per_port  # the cardinality the docs state

    for _ in range(20):
        assert tcp_request(w.client, LB_IP, 80).pod in {"a0", "a1", "b0", "b1"}
    for _ in range(10):
        udp_request(w.client, LB_IP, 53)
    send_udp(w.client, OTHER_CLIENT_IP, LB_IP, 53, 5)  # outside the source ranges
    for _ in range(4):  # no endpoints: refused at once
        with pytest.raises(RequestError):
            tcp_request(w.client, NODE_IP, 30090)
    send_udp(w.client, CLIENT_IP, NODE_IP, 30091, 3)  # Local, endpoints only on node B

    after = scrape(w.node_a)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # every TCP request is one new connection (RST-closed, so no port reuse continues one)
    assert delta("lbctl_service_new_connections_total", **http_) == 20
    # SYN, ACK, the request line, and the closing RST or ACKs: at least 3 each way
    requests = delta("lbctl_service_packets_total", **http_, direction="request")
    replies = delta("lbctl_service_packets_total", **http_, direction="reply")
    assert requests >= 60 and replies >= 40, (requests, replies)
    # IP bytes: at least a 20-byte IP and 20-byte TCP header per packet
    assert delta("lbctl_service_bytes_total", **http_, direction="request") >= 40 * requests
    # one datagram each way per UDP request, whatever flow it joined
    assert delta("lbctl_service_packets_total", **dns, direction="request") == 10
    assert delta("lbctl_service_packets_total", **dns, direction="reply") == 10
    udp_bytes = 20 + 8 + len("hi")
    assert delta("lbctl_service_bytes_total", **dns, direction="request") == 10 * udp_bytes
    drops = "lbctl_service_drops_total"
    assert delta(drops, **dns, reason="source_range") == 5
    assert delta(drops, **http_, reason="source_range") == 0
    assert delta(drops, **svc_labels("empty", "http", "TCP"), reason="no_endpoints_rejected") == 4
    assert delta(drops, **svc_labels("faraway", "dns", "UDP"), reason="no_local_endpoints") == 3
    # the node-wide verdicts agree
    verdicts = "lbctl_verdicts_total"
    assert delta(verdicts, verdict="drop_source_range") == 5
    assert delta(verdicts, verdict="rejected_no_backend") == 4
    assert delta(verdicts, verdict="drop_no_local_endpoint") == 3

    # conntrack and NAT fill come from the kernel maps, counted at most every 10 s
    def fill() -> Samples | None:
        m = scrape(w.node_a)
        return m if value(m, "lbctl_map_entries", map="conntrack") > 0 else None

    m = wait_for(fill, "conntrack entries counted", timeout=15)
    # every flow from outside was masqueraded: a forward conntrack entry and a NAT
    # entry each (the reply's entry is the NAT one); 20 TCP flows and up to 10 UDP
    flows = value(m, "lbctl_map_entries", map="conntrack")
    assert 20 <= flows <= 30 and value(m, "lbctl_map_entries", map="nat") == flows

    # the exported fill is the kernel map's, as of its last count: closed TCP flows
    # leave the map 10 s after their RST (the sweep runs every 2 s), so wait for a
    # count made after that
    def agree() -> Samples | None:
        m = scrape(w.node_a)
        in_map = env.agent.dump()["maps"]["ct4"]["entries"]
        return m if value(m, "lbctl_map_entries", map="conntrack") == in_map else None

    m = wait_for(agree, "the exported conntrack fill equal to the map's", timeout=40)
    assert value(m, "lbctl_map_capacity", map="conntrack") == 262144
    assert value(m, "lbctl_map_entries", map="affinity") == 0


def test_counters_survive_a_removed_frontend_and_start_afresh_for_a_new_service(
    env: Env,
) -> None:
    w = env.world
    env.write("web", load_balancer("web", "10.96.0.50", [30080, 30081]), env.slice("web", ["a0"]))
    env.agent.start()
    env.agent.wait_for_log("synced:")
    http_ = svc_labels("web", "http", "TCP")
    for _ in range(5):
        tcp_request(w.client, LB_IP, 80)
    for _ in range(3):
        tcp_request(w.client, NODE_IP, 30080)
    assert value(scrape(w.node_a), "lbctl_service_new_connections_total", **http_) == 8

    # the load balancer IP goes: its frontend's counts stay with the Service port
    web = load_balancer("web", "10.96.0.50", [30080, 30081])
    del web["status"]
    env.write("web", web, env.slice("web", ["a0"]))
    wait_for(lambda: LB_IP not in str(env.agent.dump()["frontends"]), "LB frontend removed")
    assert value(scrape(w.node_a), "lbctl_service_new_connections_total", **http_) == 8
    tcp_request(w.client, NODE_IP, 30080)
    assert value(scrape(w.node_a), "lbctl_service_new_connections_total", **http_) == 9

    # the Service goes: so do its series; made again, it starts from zero
    (env.manifests / "web.yaml").unlink()
    wait_for(lambda: not env.agent.dump()["frontends"], "web removed")
    m = scrape(w.node_a)
    assert not any(dict(labels).get("service") == "web" for _, labels in m)
    env.write("web", load_balancer("web", "10.96.0.50", [30080, 30081]), env.slice("web", ["a0"]))
    wait_for(lambda: env.agent.dump()["frontends"], "web back")
    tcp_request(w.client, LB_IP, 80)
    assert value(scrape(w.node_a), "lbctl_service_new_connections_total", **http_) == 1


def test_nat_port_exhaustion_is_counted_per_service(tmp_path: Path, pin_dir: Path) -> None:
    with Lab() as lab:
        # two NAT ports and one backend: a third masqueraded flow finds no port
        env = start(tmp_path, pin_dir, lab, "--nat-port-range", "61000-61001", pods_b=0)
        try:
            web = load_balancer("web", "10.96.0.50", [30080, 30081])
            env.write("web", web, env.slice("web", ["a0"]))
            env.agent.start()
            env.agent.wait_for_log("synced:")
            w = env.world
            failed = 0
            for i in range(5):  # UDP flows hold their port for the 60 s timeout
                try:
                    udp_request(w.client, LB_IP, 53, timeout=0.5, source_port=42000 + i)
                except RequestError:
                    failed += 1
            m = scrape(w.node_a)
        finally:
            env.agent.stop()
    assert failed == 3
    dns = svc_labels("web", "dns", "UDP")
    assert value(m, "lbctl_service_drops_total", **dns, reason="nat_ports_exhausted") == 3
    assert value(m, "lbctl_service_new_connections_total", **dns) == 2
    assert value(m, "lbctl_verdicts_total", verdict="nat_exhausted") == 3


def test_per_service_counters_can_be_turned_off(tmp_path: Path, pin_dir: Path) -> None:
    with Lab() as lab:
        env = start(tmp_path, pin_dir, lab, "--no-per-service-metrics", pods_b=0)
        try:
            env.write("web", load_balancer("web", "10.96.0.50", [30080, 30081]))
            env.agent.start()
            env.agent.wait_for_log("synced:")
            m = scrape(env.world.node_a)
            dump = env.agent.dump()
        finally:
            env.agent.stop()
    assert not any(name.startswith("lbctl_service_") for name, _ in m)
    assert value(m, "lbctl_frontends") >= 4  # the datapath itself is unchanged
    assert dump["maps"]["lb_fe_stats"]["entries"] == 0


# -- kube-proxy's metrics, with an agent following a real-protocol API server --------


@pytest.fixture
def ns() -> Iterator[Netns]:
    ns = Netns.create("kpm")
    try:
        ns.ip("link", "set", "lo", "up")
        yield ns
    finally:
        ns.delete()


@pytest.fixture
def kube(ns: Netns, clean_datapath: BpfDatapath) -> Iterator[tuple[Agent, FakeApiServer]]:
    with kube_agent_in(ns, clean_datapath) as made:
        yield made


def rfc3339(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat().replace("+00:00", "Z")


def test_kube_proxy_metrics_and_network_programming_latency(
    kube: tuple[Agent, FakeApiServer], ns: Netns
) -> None:
    agent, server = kube
    source = agent.source
    assert isinstance(source, KubeSource)
    obs = Observability(agent)
    try:
        with ns.entered():
            assert obs.start(("127.0.0.1", 0), None) == []
        address = obs.addresses["metrics"]
        agent.sync()
        m = scrape(ns, address)
        assert value(m, "kubeproxy_sync_full_proxy_rules_duration_seconds_count") == 1
        assert value(m, "kubeproxy_sync_proxy_rules_duration_seconds_count") == 1
        assert value(m, "kubeproxy_sync_partial_proxy_rules_duration_seconds_count") == 0
        assert time.time() - value(m, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") < 30
        assert value(m, "kubeproxy_sync_proxy_rules_endpoint_changes_total") == 1
        assert value(m, "kubeproxy_sync_proxy_rules_service_changes_total") == 1
        assert value(m, "kubeproxy_network_programming_duration_seconds_count") == 0

        def step_when_queued() -> None:
            wait_for(lambda: sum(source.pending().values()), "the change arrives")
            agent.step()

        # a new endpoint whose Pod became ready 2.5 s ago (the slice controller's
        # stamp), after the agent started: changes from before its start are not timed
        time.sleep(max(0.0, source.started_at + 2.6 - time.time()))
        eps = k8s_yaml.endpoint_slice(
            "web",
            ["10.9.0.1", "10.9.0.2"],
            [("http", "TCP", 8080)],
            annotations={TRIGGER_TIME: rfc3339(time.time() - 2.5)},
        )
        server.update(eps)
        step_when_queued()
        m = scrape(ns, address)
        count = "kubeproxy_network_programming_duration_seconds_count"
        bucket = "kubeproxy_network_programming_duration_seconds_bucket"
        assert value(m, count) == 1
        assert value(m, bucket, le="2.0") == 0  # at least the 2.5 s before lbctl saw it
        assert value(m, bucket, le="10.0") == 1
        assert value(m, "kubeproxy_sync_partial_proxy_rules_duration_seconds_count") == 1
        assert value(m, "kubeproxy_sync_proxy_rules_duration_seconds_count") == 2
        assert value(m, "kubeproxy_sync_proxy_rules_endpoint_changes_total") == 2
        assert value(m, "lbctl_backends") == 2

        # a change stamped before the agent started, and a deletion, are not timed
        eps["metadata"]["annotations"][TRIGGER_TIME] = rfc3339(source.started_at - 60)
        eps["endpoints"] = eps["endpoints"][:1]
        server.update(eps)
        step_when_queued()
        server.delete("endpointslices", "test", "web-1")
        step_when_queued()
        m = scrape(ns, address)
        assert value(m, count) == 1
        assert value(m, "kubeproxy_sync_proxy_rules_endpoint_changes_total") == 4
        assert value(m, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0

        # API trouble: failed requests and watch restarts, per resource
        assert value(m, "lbctl_source_api_errors_total", resource="Service") == 0
        server.compact()
        server.cut_watches()
        server.fail_next(2)
        wait_for(
            lambda: (
                value(scrape(ns, address), "lbctl_source_api_errors_total", resource="Service")
                + value(
                    scrape(ns, address), "lbctl_source_api_errors_total", resource="EndpointSlice"
                )
                + value(scrape(ns, address), "lbctl_source_api_errors_total", resource="Node")
                >= 2
            ),
            "API errors counted",
        )
        m = scrape(ns, address)
        restarts = sum(
            value(m, "lbctl_source_watch_restarts_total", resource=kind, reason=reason)
            for kind in ("Service", "EndpointSlice", "Node")
            for reason in ("closed", "expired", "error")
        )
        assert restarts >= 3  # every watch was cut
    finally:
        obs.stop()
