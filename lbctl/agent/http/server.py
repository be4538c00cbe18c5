"""The agent's health check and Prometheus metrics servers (kube-proxy's :10256, :10249).

Health (`/healthz`, `/livez`): 200 once the first sync is done and while the
loop keeps ticking, else 503: the agent itself, for liveness, so a working
datapath is never restarted for a part that is off.  Trouble with the source
(an unreachable API server) is reported in the body but does not fail the
check: the maps keep serving.  Readiness (`/readyz`): healthy, and every part
the operator asked for works (socket hooks attached, named interfaces there,
the XDP fast path on) and no Service is left unprogrammed (Agent.ready).
Metrics are read at scrape time from the agent and the Python mirror of the
maps; only the small per-CPU counters map is read from the kernel.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from lbctl.agent.http import metrics
from lbctl.agent.http.nodeport_health import HealthChecks
from lbctl.agent.http.status import document as status_document
from lbctl.agent.http.status import retry as _retry
from lbctl.agent.http.status import rfc3339 as _rfc3339
from lbctl.agent.http.trace import QueryError
from lbctl.agent.http.trace import document as trace_document
from lbctl.agent.loop import Agent
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.datapath.ebpf.inspect import read_counters
from lbctl.model import ServiceRef
from lbctl.sources.kube import KubeSource
from lbctl.sources.manifests import ManifestSource

log = logging.getLogger(__name__)

Reply = tuple[int, str, bytes]  # status, content type, body
Routes = dict[str, Callable[[], Reply]]
QueryRoutes = dict[str, Callable[[dict[str, list[str]]], Reply]]  # given the parsed query
# 0.1 ms .. 10 s: one map write, a thousand, a full re-sync of a large cluster
LATENCY_BUCKETS: tuple[float, ...] = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025)
LATENCY_BUCKETS += (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HELP = {  # every metric lbctl exports; a name ending in _total is a counter
    "lbctl_change_apply_latency_seconds": "Seconds from a change reaching lbctl to the maps.",
    "lbctl_first_sync_seconds": "Seconds the first sync (read all, program the maps) took.",
    "lbctl_frontends": "Service frontends (VIP, port, protocol) planned.",
    "lbctl_backends": "Backends of the planned frontends, summed over frontends.",
    "lbctl_frontend_errors": "Frontends that fail to program (e.g. a full map); retried.",
    "lbctl_last_tick_age_seconds": "Seconds since the agent loop last ticked.",
    "lbctl_invalid_objects": "Invalid source objects or manifest files (last valid kept).",
    "lbctl_source_up": "1 once the resource is listed and while it is followed, else 0.",
    "lbctl_source_lists_total": "Complete LISTs of the resource (re-LISTs follow outages).",
    "lbctl_map_capacity": "Entries the BPF map can hold.",
    "lbctl_map_entries": "Entries of the BPF map in use: services, backends, slots from "
    "lbctl's mirror of the maps; conntrack (two per flow), nat (one per masqueraded flow), "
    "affinity (one per ClientIP affinity client) counted in the kernel at most every "
    f"{metrics.FILL_CACHE_S:.0f} s.",
    "lbctl_map_operations_total": "BPF map writes and deletes made by lbctl.",
    "lbctl_verdicts_total": "Packets by the verdict of the BPF program.",
}


def _metric(name: str, values: float | Mapping[str, float], label: str = "") -> Metric:
    kind = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
    if not isinstance(values, Mapping):
        return kind(name, HELP[name], value=values)
    family = kind(name, HELP[name], labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


class _AgentCollector:
    """Gauges and counters read from the agent when Prometheus scrapes."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.fill = metrics.FlowMapFill()

    def collect(self) -> Iterator[Metric]:
        agent, source, dp = self.agent, self.agent.source, self.agent.datapath
        if agent.sync_seconds is not None:
            yield _metric("lbctl_first_sync_seconds", agent.sync_seconds)
        planned = _retry(lambda: list(agent.planner.frontends().values()))
        yield _metric("lbctl_frontends", len(planned))
        yield _metric("lbctl_backends", sum(len(fe.backends) for fe in planned))
        yield _metric("lbctl_frontend_errors", len(agent.errors))
        yield _metric("lbctl_last_tick_age_seconds", time.monotonic() - agent.last_tick)
        if isinstance(source, KubeSource):
            yield _metric("lbctl_invalid_objects", len(source.problems))
            trouble, reflectors = dict(source.trouble_by_kind), dict(source.reflectors)
            up = {
                kind: 1.0 if r.lists and kind not in trouble else 0.0
                for kind, r in reflectors.items()
            }
            yield _metric("lbctl_source_up", up, "resource")
            lists = {kind: float(r.lists) for kind, r in reflectors.items()}
            yield _metric("lbctl_source_lists_total", lists, "resource")
        elif isinstance(source, ManifestSource):
            found = sum(len(errors) for errors in list(source.errors.values()))
            yield _metric("lbctl_invalid_objects", found)
        if isinstance(dp, BpfDatapath) and dp.loaded:
            yield from self._maps(dp)

    def _maps(self, dp: BpfDatapath) -> Iterator[Metric]:
        table, s = dp.table, dp.settings
        slots = sum(len(fe.slots) for fe in list(table.frontends.values()))
        size = {"services": s.max_services, "backends": s.max_backends, "slots": s.max_slots}
        used = {"services": len(table.frontends), "backends": len(table.backends), "slots": slots}
        try:
            for name, (entries, capacity) in self.fill.read(dp).items():
                used[name], size[name] = entries, capacity
        except OSError as err:  # the datapath is closing
            log.warning("counting flow map entries: %s", err)
        yield _metric("lbctl_map_capacity", size, "map")
        yield _metric("lbctl_map_entries", used, "map")
        yield _metric("lbctl_map_operations_total", table.map_ops)
        try:
            yield _metric(
                "lbctl_verdicts_total",
                {k: float(v) for k, v in read_counters(dp.maps).items()},
                "verdict",
            )
        except OSError as err:  # the datapath is closing
            log.warning("reading lb_stats: %s", err)


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[Routes] = {}
    query_routes: ClassVar[QueryRoutes] = {}
    timeout = 10  # a silent client holds stop() for 10 s at most

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        route = self.routes.get(path)
        asked = self.query_routes.get(path)
        try:
            if asked is not None:
                status, ctype, body = asked(urllib.parse.parse_qs(query))
            else:
                status, ctype, body = route() if route else (404, "text/plain", b"not found\n")
        except Exception:
            log.exception("serving %s", self.path)
            status, ctype, body = 500, "text/plain", b"internal error\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the request threads

    def __init__(
        self, address: tuple[str, int], routes: Routes, query_routes: QueryRoutes | None = None
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        handler = {"routes": routes, "query_routes": query_routes or {}}
        super().__init__(address, type("Handler", (_Handler,), handler))


class Observability:
    def __init__(self, agent: Agent, *, health_timeout_s: float = 30.0) -> None:
        self.agent = agent
        self.health_timeout_s = health_timeout_s
        self.registry = CollectorRegistry()  # private: agents in one process never clash
        self.registry.register(_AgentCollector(agent))
        self.extra = metrics.ExtraCollector(agent)
        self.registry.register(self.extra)
        self.health_checks: HealthChecks | None = None
        self.kube_proxy = metrics.KubeProxyMetrics(agent, self.registry)
        name = "lbctl_change_apply_latency_seconds"
        self.latency = Histogram(name, HELP[name], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._servers: dict[str, tuple[_Server, threading.Thread]] = {}

    def health(self) -> tuple[bool, dict[str, Any]]:
        agent, source, wall = self.agent, self.agent.source, time.time()
        age = time.monotonic() - agent.last_tick
        trouble = dict(source.trouble_by_kind) if isinstance(source, KubeSource) else {}
        problems = [f"{kind}: {why}" for kind, why in sorted(trouble.items())]
        if isinstance(source, ManifestSource):  # unreadable files (bad objects are metrics)
            found = sorted(dict(source.errors).items())
            problems += [f"{p}: {m}" for p, ms in found for m in ms if m.startswith("cannot parse")]
        body = {
            "lastUpdated": _rfc3339(wall - age),
            "currentTime": _rfc3339(wall),
            "synced": agent.synced.is_set(),
            "mode": agent.datapath.mode,
            "problems": problems,
            "frontendErrors": len(agent.errors),
        }
        return agent.synced.is_set() and age <= self.health_timeout_s, body

    def _healthz(self) -> Reply:
        healthy, body = self.health()
        return 200 if healthy else 503, "application/json", json.dumps(body).encode() + b"\n"

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        healthy, body = self.health()
        ready, why = self.agent.ready()
        if not healthy:
            why.insert(0, "the agent is not healthy (see /healthz): not synced yet, or stuck")
        return healthy and ready, body | {"ready": healthy and ready, "notReady": why}

    def _readyz(self) -> Reply:
        ready, body = self.readiness()
        return 200 if ready else 503, "application/json", json.dumps(body).encode() + b"\n"

    def _statusz(self) -> Reply:
        healthy, body = self.health()
        status = status_document(self.agent, healthy, body["problems"])
        return 200, "application/json", json.dumps(status, indent=1).encode() + b"\n"

    def _tracez(self, query: dict[str, list[str]]) -> Reply:
        try:
            doc = trace_document(self.agent, query)
        except QueryError as err:
            return 400, "text/plain", f"/tracez: {err}\n".encode()
        return 200, "application/json", json.dumps(doc, indent=1).encode() + b"\n"

    def _metrics(self) -> Reply:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)

    def start(
        self,
        metrics_address: tuple[str, int] | None,
        healthz_address: tuple[str, int] | None,
        health_check_node_ports: bool = True,
    ) -> list[str]:
        """Start the servers asked for; one message per server that could not bind.

        With `health_check_node_ports`, the healthCheckNodePort servers of
        LoadBalancer Services with externalTrafficPolicy Local follow the
        agent's model from now on (lbctl/agent/http/nodeport_health.py)."""
        mode = (200, "text/plain", f"{self.agent.datapath.mode}\n".encode())
        metrics: Routes = {"/metrics": self._metrics, "/healthz": self._healthz}
        metrics["/proxyMode"] = lambda: mode
        health: Routes = {"/healthz": self._healthz, "/livez": self._healthz}
        metrics["/readyz"] = health["/readyz"] = self._readyz
        metrics["/statusz"] = health["/statusz"] = self._statusz  # for `lbctl status`
        problems = []
        for name, flag, address, routes in [
            ("metrics", "metricsBindAddress/--metrics-bind-address", metrics_address, metrics),
            ("healthz", "healthzBindAddress/--healthz-bind-address", healthz_address, health),
        ]:
            if address is None:
                continue
            host, port = address
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            try:
                server = _Server(address, routes, {"/tracez": self._tracez})  # lbctl trace
            except OSError as err:
                why = "address in use" if err.errno == errno.EADDRINUSE else err.strerror
                problems.append(
                    f'{name} server on {shown}: {why}; set {flag} to another port or "" to disable'
                )
                continue
            # a short poll interval: shutdown() waits for the loop to notice it
            thread = threading.Thread(
                target=server.serve_forever, args=(0.1,), name=f"lbctl-{name}"
            )
            thread.start()
            self._servers[name] = (server, thread)
            log.info("%s server listening on %s", name, shown)
        if self.latency.observe not in self.agent.observers:
            self.agent.observers.append(self.latency.observe)
        self.kube_proxy.attach()
        if health_check_node_ports and self.health_checks is None:
            self.health_checks = HealthChecks(
                lambda: self.health()[0], self.agent.options.node_name, self._node_addresses
            )
            self.extra.health_checks = self.health_checks
            self.agent.poll_observers.append(self._follow_health_checks)
        return problems

    def _follow_health_checks(self, refs: set[ServiceRef]) -> None:
        if self.health_checks is not None:
            self.health_checks.update(self.agent.table, refs)

    def _node_addresses(self) -> list[str]:
        """Where health check ports listen: every address, or the NodePort addresses."""
        if self.agent.options.addresses.node_port_cidrs is None:
            return ["0.0.0.0"]
        found = self.agent.planner.node.node_port_addresses
        return [str(a) for a in found if a.version == 4 and not a.is_loopback]

    def stop(self) -> None:
        """Shut the servers down and wait for their threads."""
        for server, thread in self._servers.values():
            server.shutdown()
            server.server_close()
            thread.join()
        self._servers = {}
        if self.latency.observe in self.agent.observers:
            self.agent.observers.remove(self.latency.observe)
        self.kube_proxy.detach()
        if self.health_checks is not None:
            if self._follow_health_checks in self.agent.poll_observers:
                self.agent.poll_observers.remove(self._follow_health_checks)
            self.health_checks.close()
            self.health_checks = None
            self.extra.health_checks = None

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        """Where each running server is bound (a port 0 resolved)."""
        return {
            n: cast(tuple[str, int], s.server_address[:2]) for n, (s, _) in self._servers.items()
        }
