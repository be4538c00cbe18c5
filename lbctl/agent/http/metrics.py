"""The metrics that go beyond lbctl's own gauges (lbctl/agent/http/server.py registers them).

- kube-proxy's metrics, under kube-proxy's names, where the meaning is the
  same: rule sync durations (a full reconcile of the maps, or a diff), the
  network programming latency from an EndpointSlice's
  endpoints.kubernetes.io/last-change-trigger-time to the maps holding the
  change, the time of the last successful sync, and Service and
  EndpointSlice changes (applied and pending);
- the API source: failed requests and watch restarts per resource;
- per-Service datapath counters, read from lb_fe_stats at scrape time: every
  series of a Service port, each drop reason included, from the moment its
  first frontend is programmed (at 0) until its last frontend goes, so a
  rate() over them is 0 rather than missing until a first drop (ten series
  per Service port per node);
- conntrack, NAT and affinity map fill (exported with lbctl_map_entries),
  counted in the kernel maps with batch lookups at most every
  `FILL_CACHE_S` seconds (a scrape of a million entries must not stall the
  next ones);
- the datapath mode, and the mode the configuration asked for (auto, ebpf,
  ipvs), so auto falling back to IPVS tells from IPVS chosen on purpose.

Every label has a bounded set of values: resources, fixed reasons, and the
Service ports of the cluster (which `metrics.perService: false` turns off).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from lbctl.agent.http.nodeport_health import HealthChecks
from lbctl.agent.loop import Agent
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.datapath.ebpf.servicecounters import DROP_REASONS
from lbctl.model import ServiceRef
from lbctl.sources.kube import SERVICE, SLICE, KubeSource

log = logging.getLogger(__name__)

# kube-proxy's buckets: 1 ms doubling to 16 s for syncs; 0.25 s to 5 min for
# network programming
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
PROGRAMMING_BUCKETS = (
    0.25,
    0.5,
    *(float(s) for s in (*range(1, 60), *range(60, 120, 5), *range(120, 301, 30))),
)
FILL_CACHE_S = 10.0
SERVICE_LABELS = ["namespace", "service", "port", "protocol"]
HELP = {
    "kubeproxy_sync_proxy_rules_duration_seconds": "SyncProxyRules latency in seconds: "
    "each write of the plan to the BPF maps, full or partial.",
    "kubeproxy_sync_full_proxy_rules_duration_seconds": "SyncProxyRules latency in seconds "
    "for full resyncs: the maps reconciled with the whole plan.",
    "kubeproxy_sync_partial_proxy_rules_duration_seconds": "SyncProxyRules latency in seconds "
    "for partial resyncs: the changed frontends written.",
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds": "The last time proxy rules were "
    "successfully synced (every frontend programmed).",
    "kubeproxy_network_programming_duration_seconds": "In Cluster Network Programming Latency "
    "in seconds: from an EndpointSlice's last-change-trigger-time to the maps holding it.",
    "kubeproxy_sync_proxy_rules_endpoint_changes_total": "Cumulative EndpointSlice changes "
    "applied.",
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending": "EndpointSlice changes received "
    "and not applied yet.",
    "kubeproxy_sync_proxy_rules_service_changes_total": "Cumulative Service changes applied.",
    "kubeproxy_sync_proxy_rules_service_changes_pending": "Service changes received and not "
    "applied yet.",
    "lbctl_source_api_errors_total": "Failed LIST and WATCH requests and watch ERROR events, "
    "by resource.",
    "lbctl_source_watch_restarts_total": "Watches that ended and were started again, by "
    "resource and why: closed by the server, expired (410, listed again), error.",
    "lbctl_service_packets_total": "Packets the BPF programs translated for the Service port, "
    "by direction: request (client to service) or reply (backend to client).",
    "lbctl_service_bytes_total": "IP bytes of lbctl_service_packets_total.",
    "lbctl_service_new_connections_total": "Connections (UDP flows) started to the Service port.",
    "lbctl_service_drops_total": "Packets to the Service port dropped or refused, by reason: "
    + ", ".join(DROP_REASONS)
    + " (every reason from the Service port's start, at 0 until it happens).",
    "lbctl_mode": "The datapath this agent runs (1 for its mode), and the mode its "
    "configuration asked for (configured: auto, ebpf or ipvs).",
    "lbctl_health_check_node_ports": "healthCheckNodePort servers of LoadBalancer Services with "
    "externalTrafficPolicy Local: serving, or failed (the port cannot be bound; retried).",
}


class KubeProxyMetrics:
    """kube-proxy's sync and programming metrics, observed from the agent thread."""

    def __init__(self, agent: Agent, registry: CollectorRegistry) -> None:
        self.agent = agent

        def histogram(name: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, HELP[name], buckets=buckets, registry=registry)

        self.sync = histogram("kubeproxy_sync_proxy_rules_duration_seconds", SYNC_BUCKETS)
        self.full = histogram("kubeproxy_sync_full_proxy_rules_duration_seconds", SYNC_BUCKETS)
        self.partial = histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds", SYNC_BUCKETS
        )
        self.programming = histogram(
            "kubeproxy_network_programming_duration_seconds", PROGRAMMING_BUCKETS
        )
        name = "kubeproxy_sync_proxy_rules_last_timestamp_seconds"
        self.last = Gauge(name, HELP[name], registry=registry)

    def synced(self, seconds: float, full: bool, errors: int) -> None:
        self.sync.observe(seconds)
        (self.full if full else self.partial).observe(seconds)
        if not errors:
            self.last.set(time.time())

    def programmed(self, refs: set[ServiceRef]) -> None:
        """The last poll's EndpointSlice changes are in the maps."""
        source = self.agent.source
        if not isinstance(source, KubeSource):
            return
        now = time.time()
        for triggered in source.triggers:
            self.programming.observe(max(0.0, now - triggered))

    def attach(self) -> None:
        if self.synced not in self.agent.sync_observers:
            self.agent.sync_observers.append(self.synced)
        if self.programmed not in self.agent.poll_observers:
            self.agent.poll_observers.append(self.programmed)

    def detach(self) -> None:
        if self.synced in self.agent.sync_observers:
            self.agent.sync_observers.remove(self.synced)
        if self.programmed in self.agent.poll_observers:
            self.agent.poll_observers.remove(self.programmed)


def _family(name: str, labels: list[str]) -> CounterMetricFamily | GaugeMetricFamily:
    kind = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
    return kind(name, HELP[name], labels=labels)


class FlowMapFill:
    """Entries of the flow maps, counted in the kernel, cached `FILL_CACHE_S` seconds."""

    def __init__(self) -> None:
        self._fill: dict[str, tuple[int, int]] = {}
        self._at = -FILL_CACHE_S
        self._lock = threading.Lock()

    def read(self, dp: BpfDatapath) -> dict[str, tuple[int, int]]:
        """Map label -> (entries, capacity) of conntrack, nat and affinity."""
        with self._lock:  # one count at a time; scrapes meanwhile wait for its result
            if time.monotonic() - self._at >= FILL_CACHE_S:
                maps = {"conntrack": dp.maps.ct4, "nat": dp.maps.nat4}
                maps["affinity"] = dp.maps.lb4_affinity
                self._fill = {n: (m.count(), m.max_entries) for n, m in maps.items()}
                self._at = time.monotonic()
            return dict(self._fill)


class ExtraCollector:
    """Source, per-Service and mode metrics, read at scrape time."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.health_checks: HealthChecks | None = None

    def collect(self) -> Iterator[Metric]:
        mode = _family("lbctl_mode", ["mode", "configured"])
        mode.add_metric([str(self.agent.datapath.mode), self.agent.options.configured_mode], 1.0)
        yield mode
        checks = self.health_checks
        if checks is not None:
            ports = _family("lbctl_health_check_node_ports", ["state"])
            ports.add_metric(["serving"], len(checks.serving))
            ports.add_metric(["failed"], len(dict(checks.errors)))
            yield ports
        source = self.agent.source
        if isinstance(source, KubeSource):
            yield from self._source(source)
        dp = self.agent.datapath
        if isinstance(dp, BpfDatapath) and dp.loaded and dp.table.counters.enabled:
            try:
                yield from self._services(dp)
            except OSError as err:  # the datapath is closing
                log.warning("reading the per-Service counters: %s", err)

    def _source(self, source: KubeSource) -> Iterator[Metric]:
        changes = dict(source.changes_total)
        pending = source.pending()
        for what, kind in (("endpoint", SLICE), ("service", SERVICE)):
            name = f"kubeproxy_sync_proxy_rules_{what}_changes_total"
            yield CounterMetricFamily(name, HELP[name], value=changes[kind])
            name = f"kubeproxy_sync_proxy_rules_{what}_changes_pending"
            yield GaugeMetricFamily(name, HELP[name], value=pending[kind])
        errors = _family("lbctl_source_api_errors_total", ["resource"])
        restarts = _family("lbctl_source_watch_restarts_total", ["resource", "reason"])
        for kind, reflector in dict(source.reflectors).items():
            errors.add_metric([kind], reflector.api_errors)
            for reason, count in dict(reflector.watch_restarts).items():
                restarts.add_metric([kind, reason], count)
        yield errors
        yield restarts

    def _services(self, dp: BpfDatapath) -> Iterator[Metric]:
        counts = dp.table.counters.read(dp.table.service_labels())
        packets = _family("lbctl_service_packets_total", [*SERVICE_LABELS, "direction"])
        octets = _family("lbctl_service_bytes_total", [*SERVICE_LABELS, "direction"])
        new = _family("lbctl_service_new_connections_total", SERVICE_LABELS)
        drops = _family("lbctl_service_drops_total", [*SERVICE_LABELS, "reason"])
        for labels, c in sorted(counts.items()):
            key = list(labels)
            packets.add_metric([*key, "request"], c["packets"])
            packets.add_metric([*key, "reply"], c["reply_packets"])
            octets.add_metric([*key, "request"], c["bytes"])
            octets.add_metric([*key, "reply"], c["reply_bytes"])
            new.add_metric(key, c["new_flows"])
            for reason, field in DROP_REASONS.items():  # a fixed set: zeros included
                drops.add_metric([*key, reason], c[field])
        yield from (packets, octets, new, drops)
