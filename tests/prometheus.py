"""A real Prometheus (Debian's `prometheus`) inside a test's network namespace.

It runs with `nsenter --net` in the node namespace it scrapes, listens on
127.0.0.1 there, keeps its storage in the test's temporary directory, and is
stopped by its PID.  `scrape_config` turns the PodMonitor in deploy/prometheus/
into the scrape job prometheus-operator would generate from it, for the one
pod the test runs (no operator, and no Kubernetes service discovery in
Debian's build, can run here: the target and its discovery labels are given
statically, and the PodMonitor's own relabelings are applied by Prometheus).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from tests.netlab import Netns

PROMETHEUS = "/usr/bin/prometheus"
PORT = 9090  # inside the test namespace only
Doc = dict[str, Any]


class PrometheusError(AssertionError):
    pass


def scrape_config(monitor: Doc, pod: Doc, address: str, node_name: str, interval_s: float) -> Doc:
    """The scrape job of a PodMonitor for one pod, as prometheus-operator builds it.

    `pod`: the DaemonSet's pod template (labels, annotations, containers);
    `address`: the pod's IP (hostNetwork: the node's).  The operator's target
    labels: job from `jobLabel`, namespace, pod, container, endpoint (the port's name).
    """
    spec = monitor["spec"]
    (endpoint,) = spec["podMetricsEndpoints"]
    (container,) = pod["spec"]["containers"]
    (port,) = [p for p in container["ports"] if p["name"] == endpoint["port"]]
    labels = pod["metadata"]["labels"]
    relabelings = [
        {
            "source_labels": r["sourceLabels"],
            "target_label": r["targetLabel"],
            "action": r.get("action", "replace"),
            **({"regex": r["regex"]} if "regex" in r else {}),
            **({"replacement": r["replacement"]} if "replacement" in r else {}),
        }
        for r in endpoint.get("relabelings", [])
    ]
    return {
        "job_name": labels[spec["jobLabel"]],
        "honor_labels": bool(endpoint.get("honorLabels", False)),
        "metrics_path": endpoint.get("path", "/metrics"),
        "scrape_interval": f"{interval_s:g}s",
        "scrape_timeout": f"{interval_s:g}s",
        "static_configs": [
            {
                "targets": [f"{address}:{port['containerPort']}"],
                "labels": {
                    "namespace": monitor["metadata"]["namespace"],
                    "pod": "lbctl-test",
                    "container": container["name"],
                    "endpoint": endpoint["port"],
                    "__meta_kubernetes_pod_node_name": node_name,
                },
            }
        ],
        "relabel_configs": relabelings,
    }


class Prometheus:
    """`prometheus` in `ns`, scraping `jobs` and evaluating `rule_files` every `interval_s`."""

    def __init__(
        self, ns: Netns, workdir: Path, jobs: list[Doc], rule_files: list[Path], interval_s: float
    ) -> None:
        self.ns = ns
        self.workdir = workdir
        self.interval_s = interval_s
        self.log = workdir / "prometheus.log"
        self.config = {
            "global": {
                "scrape_interval": f"{interval_s:g}s",
                "evaluation_interval": f"{interval_s:g}s",
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": jobs,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Prometheus:
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(self.config, sort_keys=False))
        checked = subprocess.run(
            ["promtool", "check", "config", str(cfg)], capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [
                    "nsenter",
                    f"--net={self.ns.path}",
                    PROMETHEUS,
                    f"--config.file={cfg}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{PORT}",
                    "--web.enable-lifecycle",
                ],
                stdout=sink,
                stderr=sink,
                stdin=subprocess.DEVNULL,
            )
        self.wait(lambda: self._ready(), "Prometheus ready", timeout)
        return self

    def _ready(self) -> bool:
        try:
            return self.get("/-/ready")[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the Prometheus we started, by its PID."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def get(self, path: str, **params: str | float) -> tuple[int, bytes]:
        query = urllib.parse.urlencode(params)
        with self.ns.entered():
            conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
            try:
                conn.request("GET", f"{path}?{query}" if query else path)
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

    def api(self, path: str, **params: str | float) -> Any:
        """The `data` of an HTTP API answer; a failure names the query and the error."""
        status, body = self.get(f"/api/v1/{path}", **params)
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {}
        if status != 200 or doc.get("status") != "success":
            raise PrometheusError(f"/api/v1/{path} {params}: {status} {body[:500]!r}")
        return doc["data"]

    def query(self, expr: str) -> list[Doc]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[Doc] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Doc]:
        data = self.api("query_range", query=expr, start=start, end=end, step=step)
        result: list[Doc] = data["result"] if data["resultType"] == "matrix" else []
        return result

    def alerts(self) -> list[Doc]:
        """Active alerts: pending (their `for` not over yet) and firing."""
        found: list[Doc] = self.api("alerts")["alerts"]
        return found

    def active(self, name: str, **labels: str) -> list[Doc]:
        return [
            a
            for a in self.alerts()
            if a["labels"].get("alertname") == name
            and all(a["labels"].get(k) == v for k, v in labels.items())
        ]

    def wait(self, check: Any, what: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise PrometheusError(f"never: {what}\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def wait_for_scrapes(self, job: str, after: float, count: int = 3) -> None:
        """Until `count` scrapes of `job` have been taken since the wall-clock time `after`."""

        def scraped() -> bool:
            found = self.query(f'timestamp(up{{job="{job}"}})')
            return bool(found) and float(found[0]["value"][1]) >= after + count * self.interval_s

        self.wait(scraped, f"{count} scrapes of {job} after {after}")

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
