"""The dashboards and alert rules on a real Prometheus scraping a real agent.

Debian's Prometheus runs inside node A's namespace of tests/extlab.py,
scraping the agent there every 2 s as the PodMonitor of deploy/prometheus/
makes prometheus-operator scrape it (tests/prometheus.py), and evaluating
deploy/prometheus/lbctl-rules.yaml.  The agent runs with the ConfigMap's config
file, following tests/apiserver.py.  While Prometheus watches:

- the API server is down when the agent starts: LbctlFirstSyncNotDone goes
  pending on the real series, and away once the first sync is done;
- requests, a Service change (an EndpointSlice stamped with its trigger time,
  a new Service), drops (outside loadBalancerSourceRanges, no endpoints) and
  NAT port exhaustion: LbctlNATPortsExhausted and LbctlServiceDropsRising go
  pending;
- the agent stops: LbctlAgentDown goes pending.

Then every query of every dashboard under deploy/, with its variables and
macros replaced as Grafana would (tests/grafana.py), for All and for the one
node, and every variable's label_values(), must return data (zeros count);
every rule evaluates without error and uses only what the agent exports, as
do the rules' unit tests; `promtool check metrics` passes on the exposition.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbctl.agent import config
from lbctl.sources.kube import TRIGGER_TIME
from tests import extlab, grafana, k8s_yaml
from tests.agent_proc import AgentProcess
from tests.apiserver import FakeApiServer
from tests.conftest import BPFFS, PIN_PREFIX, remove_pins
from tests.extlab import CLIENT_IP, LB_IP, NODE_A, NODE_IP, OTHER_CLIENT_IP
from tests.netlab import Lab, RequestError, TcpServer, UdpServer, tcp_request, udp_request
from tests.prometheus import Prometheus, scrape_config
from tests.test_alert_rules import PODMONITOR, RULES, UNIT_TESTS, alerts, load
from tests.test_deploy import DEPLOY, check_query, exposition, find
from tests.test_metrics import rfc3339, send_udp

pytestmark = pytest.mark.netns

SCRAPE_S = 2.0  # also the scrape timeout: generous for a loaded machine
NAT_PORTS = 20  # per backend: natty's one backend (a1) runs out after 20 flows
NAT_FLOWS = 25
DROPS = 400  # over LbctlServiceDropsRising's 1/s averaged over 5 minutes
Doc = dict[str, Any]


@dataclasses.dataclass
class Observed:
    prometheus: Prometheus
    job: str
    started: float  # wall clock: Prometheus's first scrape window
    ended: float  # the agent stopped after this
    exposition: str
    seen: dict[str, list[Doc]]  # alert name -> its active alerts when it was expected
    rules: list[Doc]  # /api/v1/rules groups
    mode_selected: list[Doc]  # the mode rule's query with mode="ebpf"
    late: list[Doc]  # the drop series of a Service made after the first sync
    dashboard_results: dict[str, list[Doc]]  # "<target> <selection>" -> range query result
    variable_values: dict[str, list[str]]


def write_config(tmp: Path) -> Path:
    """The ConfigMap's config file, as the DaemonSet gives it to the agent."""
    path = tmp / "config.yaml"
    path.write_text(find("ConfigMap", "lbctl-config")["data"]["config.yaml"])
    return path


def services(server: FakeApiServer) -> None:
    web = k8s_yaml.service(
        "web",
        "10.96.0.50",
        [("http", "TCP", 80), ("dns", "UDP", 53)],
        type="LoadBalancer",
        loadBalancerSourceRanges=[f"{CLIENT_IP}/32"],
    )
    for port, node_port in zip(web["spec"]["ports"], (30080, 30081), strict=True):
        port["nodePort"] = node_port
    web["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    server.apply(web)
    server.apply(slice_of("web", ["10.244.0.20"]))  # natty's backend is a1's alone
    empty = k8s_yaml.service("empty", "10.96.0.51", [("http", "TCP", 80)], type="NodePort")
    empty["spec"]["ports"][0]["nodePort"] = 30090
    server.apply(empty)
    natty = k8s_yaml.service("natty", "10.96.0.52", [("dns", "UDP", 53)], type="NodePort")
    natty["spec"]["ports"][0]["nodePort"] = 30091
    server.apply(natty)
    server.apply(
        k8s_yaml.endpoint_slice(
            "natty", ["10.244.0.21"], [("dns", "UDP", 5353)], nodes={"10.244.0.21": NODE_A}
        )
    )
    server.apply(k8s_yaml.node(NODE_A))


def slice_of(service: str, ips: list[str], **extra: Any) -> Doc:
    nodes = {ip: NODE_A if ip.startswith("10.244.0.") else extlab.NODE_B for ip in ips}
    ports = [("http", "TCP", 8080), ("dns", "UDP", 5353)]
    return k8s_yaml.endpoint_slice(service, ips, ports, nodes=nodes, **extra)


def traffic(world: extlab.World) -> None:
    for _ in range(8):
        tcp_request(world.client, LB_IP, 80)
    for _ in range(5):
        udp_request(world.client, LB_IP, 53)
    send_udp(world.client, OTHER_CLIENT_IP, LB_IP, 53, DROPS)  # outside the source ranges
    for _ in range(4):
        with pytest.raises(RequestError):  # no endpoints: refused
            tcp_request(world.client, NODE_IP, 30090)
    failed = 0
    for i in range(NAT_FLOWS):  # each from its own source port: one NAT port each
        try:
            udp_request(world.client, NODE_IP, 30091, timeout=1.5, source_port=42000 + i)
        except RequestError:
            failed += 1
    assert failed == NAT_FLOWS - NAT_PORTS


def expect_alert(
    prom: Prometheus, name: str, seen: dict[str, list[Doc]], at_least: float = 0, **labels: str
) -> None:
    """Until `name` is active (pending or firing) for `labels`, its value `at_least`."""

    def active() -> list[Doc]:
        return [a for a in prom.active(name, **labels) if float(a["value"]) >= at_least]

    seen[name] = prom.wait(active, f"{name} {labels} active, at least {at_least}")


def dashboard_queries(prom: Prometheus, start: float, end: float) -> dict[str, list[Doc]]:
    """Every target of every dashboard, for All and for the node, as Grafana asks."""
    out = {}
    for name, board in grafana.dashboards(DEPLOY).items():
        variables = grafana.variable_queries(board)
        selections: list[dict[str, list[str] | None]] = [
            dict.fromkeys(variables),  # All
            {v: ([NODE_A] if label == "instance" else None) for v, (_, label) in variables.items()},
        ]
        for target in grafana.targets(name, board):
            for selected in selections:
                expr = grafana.interpolate(target.expr, board, selected, end - start, SCRAPE_S)
                step = grafana.interval(end - start, SCRAPE_S)
                if target.instant:
                    result = prom.query(expr)
                else:
                    result = prom.query_range(expr, start, end, step)
                out[f"{target} with {selected}: {expr}"] = result
    return out


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    tmp = tmp_path_factory.mktemp("prom")
    pin_dir = BPFFS / f"{PIN_PREFIX}prometheus"
    with Lab() as lab:
        world = extlab.build(lab, pods_a=2, pods_b=0)
        for pod in world.pods_a:
            TcpServer(pod, 8080)
            UdpServer(pod, 5353)
        sock = world.node_a.open_socket()
        sock.bind(("127.0.0.1", 0))
        server = FakeApiServer(sock, bookmark_interval=0.5).start()
        world.node_a.on_delete(server.stop)
        services(server)
        server.set_down(True)  # the agent's first sync waits for it
        monitor = load(PODMONITOR)
        pod = find("DaemonSet", "lbctl")["spec"]["template"]
        job = scrape_config(monitor, pod, NODE_IP, NODE_A, SCRAPE_S)
        prom = Prometheus(world.node_a, tmp, [job], [RULES], SCRAPE_S)
        flags = [
            "--kubeconfig", str(server.write_kubeconfig(tmp / "kubeconfig")),
            "--config", str(write_config(tmp)),
            "--hostname-override", NODE_A,
            "--node-ip", NODE_IP,
            "--cluster-cidr", extlab.CLUSTER_CIDR,
            "--nat-port-range", f"61000-{61000 + NAT_PORTS - 1}",
        ]  # fmt: skip
        agent = AgentProcess(world.node_a, None, pin_dir, tmp / "agent.log", *flags)
        seen: dict[str, list[Doc]] = {}
        try:
            prom.start()
            started = time.time()
            agent.start()
            # up, answering, but no first sync: the API server is down
            expect_alert(prom, "LbctlFirstSyncNotDone", seen, instance=NODE_A)
            server.set_down(False)
            agent.wait_for_log("synced:", timeout=90)
            prom.wait(lambda: not prom.active("LbctlFirstSyncNotDone"), "first sync alert gone")

            traffic(world)
            # a Service change: an endpoint moves (stamped by the slice controller)
            # and a Service appears
            stamp = {TRIGGER_TIME: rfc3339(time.time() - 0.5)}
            server.apply(slice_of("web", ["10.244.0.21"], annotations=stamp))
            server.apply(k8s_yaml.service("late", "10.96.0.53", [("http", "TCP", 80)]))
            changed = time.time()
            prom.wait(
                lambda: prom.query('lbctl_service_new_connections_total{service="late"}'),
                "the new Service's series scraped",
            )
            late = prom.query('lbctl_service_drops_total{service="late"}')
            server.delete("services", "test", "late")  # and its series go with it
            prom.wait(
                lambda: not prom.query('{service="late"}'), "the removed Service's series gone"
            )
            exhausted = NAT_FLOWS - NAT_PORTS  # increase() extrapolates: at least that
            expect_alert(prom, "LbctlNATPortsExhausted", seen, exhausted, instance=NODE_A)
            expect_alert(
                prom, "LbctlServiceDropsRising", seen, 1, service="web", reason="source_range"
            )
            prom.wait_for_scrapes(job["job_name"], changed, count=6)

            mode_rule = alerts(load(RULES)["groups"])["LbctlModeFellBackToIPVS"]["expr"]
            mode_selected = prom.query(mode_rule.replace('mode="ipvs"', 'mode="ebpf"'))
            exposed = scrape(world.node_a)
            rules = prom.api("rules")["groups"]
            ended = time.time()
            results = dashboard_queries(prom, started, ended)
            values = {
                f"{name} ${var}": prom.api(f"label/{label}/values", **{"match[]": selector})
                for name, board in grafana.dashboards(DEPLOY).items()
                for var, (selector, label) in grafana.variable_queries(board).items()
            }

            agent.stop()
            expect_alert(prom, "LbctlAgentDown", seen, instance=NODE_A)
            yield Observed(
                prom, job["job_name"], started, ended, exposed, seen, rules,
                mode_selected, late, results, values,
            )  # fmt: skip
        finally:
            agent.stop()
            prom.stop()
            remove_pins(pin_dir)


def scrape(node: Any) -> str:
    import http.client

    with node.entered():
        conn = http.client.HTTPConnection(NODE_IP, 10249, timeout=10)
        try:
            conn.request("GET", "/metrics")
            return conn.getresponse().read().decode()
        finally:
            conn.close()


def has_data(result: list[Doc]) -> bool:
    """Grafana draws something: a series with a value that is a number (0 included)."""
    samples = [v for series in result for v in series.get("values", [series.get("value")]) if v]
    return any(not math.isnan(float(value)) for _, value in samples)


def test_every_dashboard_query_returns_data(observed: Observed) -> None:
    assert len(observed.dashboard_results) >= 2 * 37  # every target, for All and the node
    empty = [where for where, result in observed.dashboard_results.items() if not has_data(result)]
    assert not empty, "no data:\n" + "\n".join(empty)
    # the check sees "no data": a misspelt name; NaN (a quantile without observations)
    span = (observed.started, observed.ended, SCRAPE_S)
    assert not has_data(observed.prometheus.query_range("rate(lbctl_verdict_total[8s])", *span))
    assert not has_data([{"metric": {}, "values": [[1, "NaN"], [2, "NaN"]]}])
    assert has_data([{"metric": {}, "values": [[1, "NaN"], [2, "0"]]}])
    for where, values in observed.variable_values.items():
        assert values, f"{where}: no values"
    assert NODE_A in observed.variable_values["grafana/lbctl-dashboard.json $instance"]
    assert "test" in observed.variable_values["grafana/lbctl-dashboard.json $namespace"]


def test_the_drop_series_exist_at_zero_for_every_reason(observed: Observed) -> None:
    by_reason = {
        s["metric"]["reason"]: s
        for s in observed.prometheus.query_range(
            'lbctl_service_drops_total{service="web", port="http"}',
            observed.started,
            observed.ended,
            SCRAPE_S,
        )
    }
    assert set(by_reason) == {
        "no_endpoints_rejected", "no_endpoints", "source_range",
        "no_local_endpoints", "nat_ports_exhausted",
    }  # fmt: skip
    # the Service's namespace, not the pod's (the PodMonitor's honorLabels)
    assert {s["metric"]["namespace"] for s in by_reason.values()} == {"test"}
    assert all(float(v) == 0 for _, v in by_reason["source_range"]["values"])  # TCP: none
    # a Service made later has them too, at 0, from its first scrape (and they
    # went with it: the fixture waited for that)
    assert {s["metric"]["reason"]: float(s["value"][1]) for s in observed.late} == dict.fromkeys(
        by_reason, 0.0
    )


def test_the_alert_rules_run_on_the_real_series(observed: Observed) -> None:
    rules = [r for g in observed.rules for r in g["rules"]]
    assert {r["name"] for r in rules if r["type"] == "alerting"} == set(
        alerts(load(RULES)["groups"])
    )
    bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    nat = observed.seen["LbctlNATPortsExhausted"][0]
    assert float(nat["value"]) >= NAT_FLOWS - NAT_PORTS
    drops = observed.seen["LbctlServiceDropsRising"][0]
    assert drops["labels"]["namespace"] == "test" and float(drops["value"]) > 1
    for name in ("LbctlFirstSyncNotDone", "LbctlAgentDown"):
        (alert,) = observed.seen[name]
        assert alert["labels"]["job"] == observed.job, alert
    # the mode rule's labels are the real series' (this kernel runs ebpf, not ipvs)
    (mode,) = observed.mode_selected
    assert mode["metric"]["instance"] == NODE_A and mode["metric"]["configured"] == "auto"


def known_values(exported: dict[str, dict[str, set[str]]]) -> dict[str, dict[str, set[str]]]:
    """The exposition, plus what it cannot show here: `up`, and the ipvs mode."""
    out = {name: {k: set(v) for k, v in labels.items()} for name, labels in exported.items()}
    out["up"] = {}
    out["lbctl_mode"]["mode"] |= {"ebpf", "ipvs"}
    out["lbctl_mode"]["configured"] |= set(config.MODES)
    return out


def test_the_rules_use_only_what_the_agent_exports(observed: Observed) -> None:
    exported = known_values(exposition(observed.exposition))
    problems = [
        f"{name}: {problem}"
        for name, rule in alerts(load(RULES)["groups"]).items()
        for problem in check_query(rule["expr"], exported)
    ]
    assert not problems, "\n".join(problems)


def test_the_rules_unit_tests_use_only_what_the_agent_exports(observed: Observed) -> None:
    exported = known_values(exposition(observed.exposition))
    free = {"job", "instance", "namespace", "service", "port", "protocol"}
    problems = []
    for test in load(UNIT_TESTS)["tests"]:
        for series in test["input_series"]:
            match = re.fullmatch(r"(\w+)\{(.*)\}", series["series"])
            assert match, series
            name, labels = match.group(1), dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            if not name.startswith(("lbctl_", "kubeproxy_")) and name != "up":
                continue  # a decoy of another exporter
            if name not in exported:
                problems.append(f"{series['series']}: not exported")
                continue
            for label, value in labels.items():
                if label in free:
                    continue
                if value not in exported[name].get(label, set()):
                    problems.append(f"{series['series']}: {label}={value!r} is not exported")
    assert not problems, "\n".join(problems)


def test_promtool_check_metrics_passes_on_the_exposition(observed: Observed) -> None:
    assert "lbctl_service_drops_total{" in observed.exposition
    checked = subprocess.run(
        ["promtool", "check", "metrics"],
        input=observed.exposition,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr


def test_grafana_interpolation() -> None:
    board = {
        "templating": {
            "list": [
                {"name": "instance", "type": "query", "multi": True, "includeAll": True,
                 "allValue": ".*"},
            ]
        }
    }  # fmt: skip
    expr = 'rate(x{instance=~"$instance"}[$__rate_interval]) / ${instance}'
    assert grafana.interpolate(expr, board, {"instance": None}, 600, 15) == (
        'rate(x{instance=~".*"}[60000ms]) / .*'
    )
    # a day at 1000 points: 86.4 s steps, plus one scrape interval (over 4 of them)
    assert grafana.interpolate("[$__rate_interval]", board, {}, 24 * 3600, 15) == "[101400ms]"
    picked = grafana.interpolate(
        'x{instance=~"$instance"}', board, {"instance": ["10.0.0.1:10249", "b"]}, 60, 1
    )
    assert picked == 'x{instance=~"(10\\\\.0\\\\.0\\\\.1:10249|b)"}'
    with pytest.raises(ValueError, match="no value for \\$nope"):
        grafana.interpolate("x{a=~'$nope'}", board, {}, 60, 1)


def test_the_scrape_job_is_what_the_podmonitor_says() -> None:
    monitor = yaml.safe_load(PODMONITOR.read_text())
    pod = find("DaemonSet", "lbctl")["spec"]["template"]
    job = scrape_config(monitor, pod, NODE_IP, NODE_A, 30)
    assert job["job_name"] == "lbctl" and job["honor_labels"] is True
    assert job["static_configs"][0]["targets"] == [f"{NODE_IP}:10249"]
    assert job["metrics_path"] == pod["metadata"]["annotations"]["prometheus.io/path"]
    relabel = job["relabel_configs"][0]
    assert relabel["source_labels"] == ["__meta_kubernetes_pod_node_name"]
    assert relabel["target_label"] == "instance"
