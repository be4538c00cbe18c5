"""lbctl's alerting rules and scrape objects (deploy/prometheus/), checked with promtool.

- `promtool test rules` runs deploy/prometheus/tests/lbctl-rules.test.yaml, the
  rules' unit tests; a rule broken on purpose (a threshold, a `for`, a join)
  makes them fail, every alert has a case where it fires, and every alert
  the tests name exists.
- prometheusrule.yaml (prometheus-operator) is generated from lbctl-rules.yaml
  and holds the same groups.
- The PodMonitor, the DaemonSet's prometheus.io annotations and the
  ConfigMap's metricsBindAddress agree on the port, the path and the pods'
  labels, and the job the PodMonitor names is the one the rules select.
- scrape-config.yaml (plain Prometheus) finds the agent's pod by its labels and
  annotations: `promtool check service-discovery` runs its relabeling on the
  targets Kubernetes pod discovery would give for the DaemonSet's pod (Debian's
  Prometheus has no Kubernetes discovery, so they are given statically).
- `kubectl apply -k deploy/` stays free of the operator's kinds (they need
  its CRDs); deploy/prometheus/kustomization.yaml applies them.

tests/test_prometheus.py runs the rules on a real Prometheus scraping a real
agent.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbctl.agent import config
from tests.test_deploy import DEPLOY, MONITORING, agent_container, find, pod_spec

pytestmark = pytest.mark.unit  # pure: make unit runs it without root

RULES = MONITORING / "lbctl-rules.yaml"
UNIT_TESTS = MONITORING / "tests" / "lbctl-rules.test.yaml"
OPERATOR_RULES = MONITORING / "prometheusrule.yaml"
PODMONITOR = MONITORING / "podmonitor.yaml"
SCRAPE_CONFIG = MONITORING / "scrape-config.yaml"
NODE_IP = "192.0.2.7"
GENERATOR = Path(__file__).resolve().parents[1] / "scripts" / "prometheusrule.py"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
Doc = dict[str, Any]


def load(path: Path) -> Doc:
    doc: Doc = yaml.safe_load(path.read_text())
    return doc


def alerts(groups: list[Doc]) -> dict[str, Doc]:
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def unit_test(rules_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The unit tests run against `rules_text` in place of lbctl-rules.yaml."""
    (tmp_path / "tests").mkdir(exist_ok=True)
    (tmp_path / "lbctl-rules.yaml").write_text(rules_text)
    shutil.copy(UNIT_TESTS, tmp_path / "tests" / UNIT_TESTS.name)
    return promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path / "tests")


def test_the_rules_are_valid_and_their_unit_tests_pass() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", UNIT_TESTS.name, cwd=UNIT_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_the_alerts_cover_what_operators_need() -> None:
    names = set(alerts(load(RULES)["groups"]))
    for wanted in (
        "LbctlAgentDown",
        "LbctlAgentsAbsent",
        "LbctlAgentNotReady",
        "LbctlFirstSyncNotDone",
        "LbctlFrontendsFailing",
        "LbctlApiSourceDown",
        "LbctlMapNearCapacity",
        "LbctlNATPortsExhausted",
        "LbctlServiceDropsRising",
        "LbctlModeFellBackToIPVS",
    ):
        assert wanted in names
    for name, rule in alerts(load(RULES)["groups"]).items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_every_alert_is_unit_tested_firing_and_every_tested_alert_exists() -> None:
    defined = set(alerts(load(RULES)["groups"]))
    cases = [case for t in load(UNIT_TESTS)["tests"] for case in t.get("alert_rule_test", [])]
    named = {case["alertname"] for case in cases}
    # a misspelt alertname with no exp_alerts would pass vacuously
    assert named <= defined, f"the unit tests name unknown alerts: {named - defined}"
    fired = {case["alertname"] for case in cases if case.get("exp_alerts")}
    assert fired == defined, f"never seen firing: {defined - fired}"


BREAKAGES = {  # a rule broken on purpose: old text -> new text
    "threshold": ("lbctl_map_capacity > 0.9", "lbctl_map_capacity > 0.96"),
    "for": ('up{job="lbctl"} == 0\n        for: 5m', 'up{job="lbctl"} == 0\n        for: 10m'),
    "join": (" unless on (job, instance) lbctl_first_sync_seconds", ""),
    "aggregation": ("sum by (namespace, service,", "sum by (instance, namespace, service,"),
    "matcher": ('lbctl_mode{mode="ipvs", configured="auto"}', 'lbctl_mode{mode="ipvs"}'),
    "window": ('verdict="nat_exhausted"}[5m]) > 0', 'verdict="nat_exhausted"}[1m]) > 0'),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_the_unit_tests_catch_a_broken_rule(breakage: str, tmp_path: Path) -> None:
    old, new = BREAKAGES[breakage]
    text = RULES.read_text()
    assert old in text
    assert unit_test(text, tmp_path).returncode == 0  # as shipped
    broken = unit_test(text.replace(old, new), tmp_path)
    said = broken.stdout + broken.stderr
    assert broken.returncode != 0 and "FAILED" in said, said


def test_the_prometheusrule_is_generated_from_the_rule_file() -> None:
    check = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stderr
    rule = load(OPERATOR_RULES)
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"] == load(RULES)  # the same groups, rule for rule
    daemonset = find("DaemonSet", "lbctl")
    assert rule["metadata"]["namespace"] == daemonset["metadata"]["namespace"]


def test_the_generator_check_notices_a_stale_prometheusrule(tmp_path: Path) -> None:
    sys.path.insert(0, str(GENERATOR.parent))
    try:
        import prometheusrule  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(GENERATOR.parent))
    text = RULES.read_text()
    assert yaml.safe_load(prometheusrule.render(text))["spec"] == yaml.safe_load(text)
    edited = text.replace("> 0.9", "> 0.8")
    assert prometheusrule.render(edited) != OPERATOR_RULES.read_text()


def metrics_port() -> tuple[str, int]:
    """The metrics port's name and number in the DaemonSet, checked against the ConfigMap."""
    cfg = yaml.safe_load(find("ConfigMap", "lbctl-config")["data"]["config.yaml"])
    _, bound = config.parse_bind_address(cfg["metricsBindAddress"]) or ("", 0)
    (port,) = [p for p in agent_container()["ports"] if p["containerPort"] == bound]
    return port["name"], int(port["containerPort"])


def test_the_scrape_annotations_and_podmonitor_agree_with_the_daemonset() -> None:
    daemonset = find("DaemonSet", "lbctl")
    template = daemonset["spec"]["template"]["metadata"]
    name, number = metrics_port()
    # the annotations an annotation-driven scrape config reads
    notes = template["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(number)
    assert (
        notes["prometheus.io/path"] == "/metrics"
    )  # the agent's route (lbctl/agent/http/server.py)
    assert pod_spec(daemonset)["hostNetwork"] is True  # the pod's address is the node's

    monitor = load(PODMONITOR)
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    spec = monitor["spec"]
    assert set(spec) <= {"jobLabel", "selector", "namespaceSelector", "podMetricsEndpoints"}
    assert spec["selector"]["matchLabels"].items() <= template["labels"].items()
    assert spec["namespaceSelector"]["matchNames"] == [daemonset["metadata"]["namespace"]]
    (endpoint,) = spec["podMetricsEndpoints"]
    allowed = {"port", "path", "interval", "honorLabels", "relabelings"}
    assert set(endpoint) <= allowed, set(endpoint) - allowed
    assert endpoint["port"] == name and endpoint["path"] == notes["prometheus.io/path"]
    # per-Service series carry the Service's namespace, which must win over the pod's
    assert endpoint["honorLabels"] is True
    for relabel in endpoint["relabelings"]:
        assert set(relabel) <= {"sourceLabels", "targetLabel", "action", "regex", "replacement"}

    # the job the PodMonitor gives the targets is the one every `up` of the rules selects
    job = template["labels"][spec["jobLabel"]]
    jobs = set(re.findall(r'up\{job="([^"]+)"\}', RULES.read_text()))
    assert jobs == {job}, (jobs, job)


def test_kubectl_apply_k_deploy_needs_no_operator() -> None:
    main = load(DEPLOY / "kustomization.yaml")
    for resource in main["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / resource).read_text()):
            assert not doc["apiVersion"].startswith("monitoring.coreos.com/"), resource
    monitoring = load(MONITORING / "kustomization.yaml")
    assert sorted(monitoring["resources"]) == ["podmonitor.yaml", "prometheusrule.yaml"]
    for resource in monitoring["resources"]:
        doc = load(MONITORING / resource)
        assert doc["apiVersion"] == "monitoring.coreos.com/v1", resource
        assert doc["metadata"]["namespace"] == "kube-system", resource


def pod_discovery(pod: Doc, name: str, node: str) -> list[Doc]:
    """The targets Kubernetes pod discovery makes of a pod: one per container port."""

    def meta(kind: str, items: dict[str, str]) -> dict[str, str]:
        return {f"__meta_kubernetes_pod_{kind}_{re.sub(r'[^A-Za-z0-9_]', '_', k)}": v
                for k, v in items.items()}  # fmt: skip

    labels = {
        **meta("label", pod["metadata"].get("labels", {})),
        **meta("annotation", pod["metadata"].get("annotations", {})),
        "__meta_kubernetes_pod_name": name,
        "__meta_kubernetes_pod_node_name": node,
        "__meta_kubernetes_namespace": "kube-system",
    }
    ports = [p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])]
    return [{"targets": [f"{NODE_IP}:{port}" for port in ports], "labels": labels}]


def test_the_annotation_scrape_job_finds_the_agent(tmp_path: Path) -> None:
    (job,) = load(SCRAPE_CONFIG)["scrape_configs"]
    jobs = set(re.findall(r'up\{job="([^"]+)"\}', RULES.read_text()))
    assert {job["job_name"]} == jobs and job["honor_labels"] is True
    (sd,) = job.pop("kubernetes_sd_configs")
    assert sd["role"] == "pod"
    pod = find("DaemonSet", "lbctl")["spec"]["template"]
    bare = json_copy(pod)  # the same pod without the annotations: not scraped
    del bare["metadata"]["annotations"]
    other = json_copy(pod)  # another annotated pod: not ours
    other["metadata"]["labels"] = {"k8s-app": "kube-dns"}
    job["static_configs"] = [
        *pod_discovery(pod, "lbctl-x1", "node-a"),
        *pod_discovery(bare, "lbctl-x2", "node-b"),
        *pod_discovery(other, "coredns-x3", "node-c"),
    ]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump({"scrape_configs": [job]}))
    found = promtool("check", "service-discovery", "--timeout=2s", str(path), job["job_name"])
    assert found.returncode == 0, found.stdout + found.stderr
    targets = [t["labels"] for t in json.loads(found.stdout) if t["labels"]]  # {}: dropped
    assert len(targets) == 1, targets  # both container ports end at the metrics port
    (target,) = targets
    _, number = metrics_port()
    assert target["__address__"] == f"{NODE_IP}:{number}"
    assert target["__metrics_path__"] == "/metrics" and target["instance"] == "node-a"
    assert target["job"] == job["job_name"] and target["pod"] == "lbctl-x1"


def json_copy(doc: Doc) -> Doc:
    copied: Doc = json.loads(json.dumps(doc))
    return copied
