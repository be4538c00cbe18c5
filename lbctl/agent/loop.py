"""The agent loop: sources -> model -> plan -> datapath, one direction.

Each tick polls the source for changes, re-plans only the services they
touched and hands the datapath the diff.  Interfaces that appear (a new
pod's veth) are attached when the agent runs on all interfaces.  Frontends
that failed to program (a full map) are retried on a slower tick.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import gc
import ipaddress
import logging
import threading
import time
from collections.abc import Callable

from lbctl.agent import node as addresses
from lbctl.agent.node import AddressPolicy
from lbctl.datapath import Datapath, NodeConfig
from lbctl.datapath.ebpf import cgroup, tc
from lbctl.model import ServiceRef, ServiceTable
from lbctl.plan.planner import NodeContext, PlanDiff, Planner
from lbctl.sources import Source

log = logging.getLogger(__name__)

# The parts an operator may ask for that can be off while the rest runs (Agent.off).
SOCKET_HOOKS, INTERFACES, XDP = "socket hooks", "interfaces", "XDP fast path"


@dataclasses.dataclass
class AgentOptions:
    interfaces: list[str] | None = None  # None: every non-loopback interface
    poll_interval_s: float = 0.2  # the longest wait for the source between two ticks
    link_scan_interval_s: float = 1.0
    retry_interval_s: float = 5.0
    sync_period_s: float = 30.0  # a full reconcile of the maps with the plan
    gc_interval_s: float = 2.0  # the flow tables' sweep, at most 10 % of a CPU
    ready_timeout_s: float = 60.0  # how long the first sync waits for the whole source
    node_name: str | None = None  # for endpoint locality (external/internalTrafficPolicy Local)
    addresses: AddressPolicy = dataclasses.field(default_factory=AddressPolicy)
    node: NodeConfig = dataclasses.field(default_factory=NodeConfig)  # its snat_address is chosen
    xdp: str = "off"  # off, generic, native
    cgroup_path: str | None = ""  # None: the cgroup2 mount; "": no socket hooks
    scheduler: str = "random"  # the default of Services without lbctl.io/scheduler
    mode_reason: str = ""  # why this datapath (mode) was chosen, for `lbctl status`
    configured_mode: str = "auto"  # the mode asked for (auto, ebpf, ipvs), for metrics


@dataclasses.dataclass(frozen=True)
class SyncRecord:
    """One write of the plan to the datapath, for `lbctl status`."""

    at: float  # wall-clock time (time.time) it finished
    seconds: float  # how long it took
    what: str  # "first sync", "periodic sync" or what a change applied
    errors: tuple[str, ...] = ()


class Agent:
    def __init__(self, source: Source, datapath: Datapath, options: AgentOptions) -> None:
        self.source = source
        self.datapath = datapath
        self.options = options
        self.table = ServiceTable()
        self.planner = Planner(options.scheduler)
        self.errors: list[str] = []
        self.synced = threading.Event()
        self._missing_links: list[str] = []
        self._missing_external: list[str] = []
        self._xdp_errors: list[str] = []
        self._xdp_cleared = False
        # Parts the operator asked for that do not work now, and why: the socket
        # hooks, named interfaces, the XDP fast path.  With `errors` (Services
        # left unprogrammed), what keeps the agent from being ready (`ready`).
        self.off: dict[str, list[str]] = {}
        self._sweep_pending = False
        self.sync_seconds: float | None = None  # how long the first sync took
        # Seconds from a change reaching lbctl to the maps holding it, newest last.
        self.latencies: collections.deque[float] = collections.deque(maxlen=100_000)
        self.observers: list[Callable[[float], None]] = []  # called with each latency
        # Called with (seconds, full, errors) after each write of the plan to the
        # datapath: a full reconcile (full) or a diff; and with the services a
        # poll touched once their changes are in the datapath.
        self.sync_observers: list[Callable[[float, bool, int], None]] = []
        self.poll_observers: list[Callable[[set[ServiceRef]], None]] = []
        self.last_tick = time.monotonic()  # the loop's heartbeat, for health checks
        self.node_config: NodeConfig | None = None  # as last written to the datapath
        self._netns_cookie = cgroup.netns_cookie()  # the socket hooks act in this namespace only
        self.last_sync: SyncRecord | None = None  # the last full sync (first or periodic)
        self.last_change: SyncRecord | None = None  # the last change applied as a diff
        # The newest distinct errors, whatever reported them, and when each last happened
        # (time.time); oldest first.  A retried error moves to the end instead of repeating.
        self.recent_errors: dict[str, float] = {}

    def sync(self, stop: threading.Event | None = None) -> None:
        """First sync: load everything, make the maps match, then attach."""
        started = time.monotonic()
        deadline = started + self.options.ready_timeout_s
        ready = False
        while not ready and time.monotonic() < deadline and not (stop and stop.is_set()):
            ready = self.source.wait_ready(min(0.2, max(deadline - time.monotonic(), 0)))
        if stop is not None and stop.is_set():
            return
        if not ready:
            log.warning(
                "the source was not read whole within %.0f s; programming what is known",
                self.options.ready_timeout_s,
            )
        # Hundreds of thousands of objects are made here and all live on:
        # the cyclic collector would scan them over and over for nothing.
        gc.disable()
        try:
            self._first_sync()
        finally:
            gc.freeze()  # what the first sync built is never scanned again
            gc.enable()
            _release_free_memory()
        self.sync_seconds = time.monotonic() - started
        self.last_sync = SyncRecord(time.time(), self.sync_seconds, "first sync", (*self.errors,))
        frontends = self.planner.frontends()
        log.info(
            "synced: %d services, %d frontends, %d backends in %.2f s; %d errors",
            len(self.planner.plans),
            len(frontends),
            sum(len(fe.backends) for fe in frontends.values()),
            self.sync_seconds,
            len(self.errors),
        )
        self.synced.set()

    def _first_sync(self) -> None:
        refs = self.source.poll(self.table)
        context, conf = self._node_view()
        self.planner.node = context
        self.planner.update(self.table, refs)
        self.datapath.load()  # the compiler ran meanwhile
        self._configure(conf)  # before any frontend: new flows masquerade right away
        # Adopted frontends that the source no longer lists are stale, unless
        # part of the source could not be read: then they may be in that part,
        # and are kept until it reads again.
        self._sweep_pending = not self.source.complete
        if self._sweep_pending:
            log.warning("part of the source is unreadable: keeping adopted frontends it may hold")
        remove_stale = not self._sweep_pending
        begun = time.monotonic()
        errors = self.datapath.reconcile(self.planner.frontends(), remove_stale)
        self._synced(time.monotonic() - begun, True, errors)
        self._record(errors)
        for hook in self.poll_observers:
            hook(refs)
        self._attach()
        self._attach_hooks()

    def step(self, node_scan: bool = False) -> PlanDiff:
        refs = self.source.poll(self.table)
        change = self.planner.update(self.table, refs) if refs else PlanDiff()
        if node_scan:
            context, conf = self._node_view()
            self._configure(conf)
            moved = self.planner.set_node(self.table, context)
            change.upserts += moved.upserts
            change.removals += moved.removals
        if change:
            started = time.monotonic()
            errors = self.datapath.apply(change)
            done = time.monotonic()
            self._synced(done - started, False, errors)
            self._record(errors)
            what = f"{len(change.upserts)} frontend updates, {len(change.removals)} removals"
            self.last_change = SyncRecord(time.time(), done - started, what, (*errors,))
            arrived = self.source.arrived
            latency = done - arrived if arrived is not None else None
            if latency is not None:
                self.latencies.append(latency)
                for observe in self.observers:
                    observe(latency)
            log.info(
                "applied %d frontend updates and %d removals in %.2f ms%s",
                len(change.upserts),
                len(change.removals),
                (done - started) * 1000,
                f", {latency * 1000:.2f} ms after the change arrived"
                if latency is not None
                else "",
            )
        if refs:
            for hook in self.poll_observers:
                hook(refs)
        if self._sweep_pending and self.source.complete:
            self._sweep_pending = False
            log.info("the whole source reads again: removing stale frontends")
            self._record(self.datapath.reconcile(self.planner.frontends()))
        return change

    def run(self, stop: threading.Event) -> None:
        self.source.start()
        try:
            self.sync(stop)
            self._loop(stop)
        finally:
            self.source.stop()

    def _loop(self, stop: threading.Event) -> None:
        opts = self.options
        now = time.monotonic()
        next_links = next_retry = next_gc = now
        next_resync = now + opts.sync_period_s
        while not stop.is_set():
            self.source.wait(opts.poll_interval_s)
            if stop.is_set():
                return
            self.last_tick = time.monotonic()
            try:
                now = time.monotonic()
                scan = now >= next_links
                self.step(node_scan=scan)
                if scan:
                    next_links = now + opts.link_scan_interval_s
                    self._attach()
                if (self.errors and now >= next_retry) or now >= next_resync:
                    what = "periodic sync" if now >= next_resync else "retry of failed frontends"
                    next_retry = now + opts.retry_interval_s
                    next_resync = now + opts.sync_period_s
                    desired = self.planner.frontends()
                    remove_stale = not self._sweep_pending
                    begun = time.monotonic()
                    errors = self.datapath.reconcile(desired, remove_stale)
                    seconds = time.monotonic() - begun
                    self._synced(seconds, True, errors)
                    # in one step: readiness never sees the old errors gone, the new not in
                    self._record(errors, replace=True)
                    self.last_sync = SyncRecord(time.time(), seconds, what, (*errors,))
                    self._repair_hooks()
                    if what == "periodic sync" and SOCKET_HOOKS in self.off:
                        self._attach_hooks()  # e.g. the cgroup is mounted by now
                if time.monotonic() >= next_gc:
                    # Often, as a full flow table refuses new flows until swept
                    # (conntrack_gc.py); a sweep of a big table waits ten times its length.
                    begun = time.monotonic()
                    for message in self.datapath.collect_garbage():
                        self._remember(message)
                    took = time.monotonic() - begun
                    next_gc = time.monotonic() + max(opts.gc_interval_s, 10 * took)
            except Exception as err:  # one bad tick must not take the agent down
                log.exception("agent loop error; continuing")
                self._remember(f"agent loop error: {err}")

    def _node_view(self) -> tuple[NodeContext, NodeConfig]:
        """Where NodePorts answer, the node's zone and which address masquerades, as of now."""
        policy = self.options.addresses
        local = addresses.local_ipv4()
        node = self.table.node
        api = node.addresses if node else ()
        context = NodeContext(
            self.options.node_name,
            policy.node_port_addresses(local),
            node.zone if node else None,
        )
        conf = dataclasses.replace(
            self.options.node,
            snat_address=policy.snat_address(local, api),
            netns_cookie=self._netns_cookie,
            host_addresses=frozenset(a.address for a in local),
        )
        if not conf.cluster_cidrs and node is not None:
            # No cluster CIDR: this node's own pod ranges tell its pods
            # (kube-proxy's NodeCIDR detector), see docs/datapath.md.
            own = tuple(c for c in node.pod_cidrs if isinstance(c, ipaddress.IPv4Network))
            if own:
                conf = dataclasses.replace(conf, cluster_cidrs=own, node_cidrs=True)
        return context, conf

    def _configure(self, conf: NodeConfig) -> None:
        if conf == self.node_config:
            return
        if conf.snat_address is None:
            log.warning("no IPv4 address on this node: traffic that needs masquerading is not")
        elif self.node_config is None or self.node_config.snat_address != conf.snat_address:
            log.info("masquerading with %s", conf.snat_address)
        before = self.node_config
        if before is None or (before.cluster_cidrs, before.node_cidrs) != (
            conf.cluster_cidrs,
            conf.node_cidrs,
        ):
            self._report_pod_network(conf)
        self.datapath.configure(conf)
        self.node_config = conf

    def _report_pod_network(self, conf: NodeConfig) -> None:
        if self.datapath.mode != "ebpf":
            return  # IPVS: the node's netfilter, with the CNI's rules, carries the traffic
        cidrs = ", ".join(str(c) for c in conf.cluster_cidrs)
        if conf.node_cidrs:
            log.info(
                "pod network: this node's spec.podCIDRs %s (no --cluster-cidr): pods' flows "
                "to endpoints outside them, pods of other nodes included, are masqueraded",
                cidrs,
            )
        elif cidrs:
            log.info(
                "pod network: --cluster-cidr %s: pods' flows to endpoints outside it are "
                "masqueraded",
                cidrs,
            )
        else:
            log.warning(
                "pod network unknown: no --cluster-cidr and the Node has no spec.podCIDRs; "
                "pods' flows to endpoints outside the pod network (the API server's, for "
                "one) are not masqueraded and time out where those hosts cannot route back "
                "to pods: set --cluster-cidr (clusterCIDR) to the cluster's pod CIDRs"
            )

    def _attach(self) -> None:
        if self.options.interfaces is not None:
            wanted, missing = tc.find_interfaces(self.options.interfaces)
            if missing != self._missing_links:  # report each change once, not every scan
                self._record(missing)
                self._missing_links = missing
            self._part(INTERFACES, missing)
        else:
            wanted = tc.list_interfaces()
        self.datapath.forget_missing(wanted)
        self._record(self.datapath.attach(wanted))
        if self.options.xdp != "off":
            errors = self.datapath.attach_xdp(self._external_links(), self.options.xdp)
            self._part(XDP, self._missing_external + errors)
            if errors != self._xdp_errors:  # report each change once, not every scan
                self._record(errors)
                self._xdp_errors = errors
        elif not self._xdp_cleared and self.options.interfaces != []:
            # an earlier run's XDP program must not linger (interfaces=[]: touch nothing)
            self._xdp_cleared = True
            self._record(self.datapath.attach_xdp([], "off"))

    def _attach_hooks(self) -> None:
        errors = self.datapath.attach_cgroup(self.options.cgroup_path)
        self._part(SOCKET_HOOKS, errors)
        self._record(errors)

    def _part(self, part: str, errors: list[str]) -> None:
        if errors:
            self.off[part] = list(errors)
        else:
            self.off.pop(part, None)

    def ready(self) -> tuple[bool, list[str]]:
        """Whether every part asked for works and every Service is programmed; why not.

        For readiness (/readyz), apart from the agent's health: a datapath that
        runs with a part off keeps serving the rest."""
        off = dict(self.off)
        why = [f"{part} asked for but off: {'; '.join(reasons)}" for part, reasons in off.items()]
        said = {reason for reasons in off.values() for reason in reasons}
        errors = [e for e in self.errors if e not in said]
        if errors:
            why.append(
                f"{len(errors)} {'error' if len(errors) == 1 else 'errors'} at the last attempt "
                f"to program the datapath (a Service left unprogrammed, e.g. a full map; "
                f"retried every {self.options.retry_interval_s:.0f} s): {errors[0]}"
            )
        return not why, why

    def _repair_hooks(self) -> None:
        """A program detached by hand (or by another tool) is put back at the
        periodic sync, as the maps are."""
        gone = self.datapath.forget_detached()
        if gone:
            self._remember(
                f"lbctl's program was removed from {', '.join(gone)} by something else; "
                "attached again (find what removes it: traffic bypassed lbctl meanwhile)"
            )
            log.warning("program removed from %s behind lbctl's back; re-attaching", gone)
            self._attach()

    def _external_links(self) -> list[tc.Link]:
        """The external interfaces, or else the one that holds the node's address."""
        names = self.options.addresses.interfaces
        if names is None:
            snat = self.node_config.snat_address if self.node_config else None
            names = tuple(a.interface for a in addresses.local_ipv4() if a.address == snat)
        links, missing = tc.find_interfaces(names)
        if missing != self._missing_external:
            self._record(missing)
            self._missing_external = missing
        return links

    def _synced(self, seconds: float, full: bool, errors: list[str]) -> None:
        for observe in self.sync_observers:
            observe(seconds, full, len(errors))

    def _record(self, errors: list[str], replace: bool = False) -> None:
        """Log and keep `errors`; `replace`: they are all that is current now."""
        for message in errors:
            log.error("%s", message)
            self._remember(message)
        self.errors = list(errors) if replace else self.errors + errors

    def _remember(self, message: str) -> None:
        self.recent_errors.pop(message, None)
        self.recent_errors[message] = time.time()
        while len(self.recent_errors) > 50:
            del self.recent_errors[next(iter(self.recent_errors))]


def _release_free_memory() -> None:
    """Hand the heap the first sync freed (LIST bodies, the compiler's) back to the OS."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: reused, not returned
        ctypes.CDLL("libc.so.6").malloc_trim(0)
