"""The agent loop: sources -> model -> plan -> datapath, one direction.

Each tick polls the source for changes, re-plans only the services they
touched and hands the datapath the diff.  Interfaces that appear (a new
pod's veth) are attached when the agent runs on all interfaces.  Frontends
that failed to program (a full map) are retried on a slower tick.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Protocol

from lbctl.datapath import tc
from lbctl.model import ServiceRef, ServiceTable
from lbctl.plan import Frontend, FrontendKey, PlanDiff, Planner

log = logging.getLogger(__name__)


class Source(Protocol):
    @property
    def complete(self) -> bool:
        """False while part of the source cannot be read (its content is unknown)."""
        ...

    def poll(self, table: ServiceTable) -> set[ServiceRef]: ...


class Datapath(Protocol):
    mode: str

    def reconcile(
        self, desired: dict[FrontendKey, Frontend], remove_stale: bool = True
    ) -> list[str]: ...

    def apply(self, change: PlanDiff) -> list[str]: ...

    def attach(self, links: list[tc.Link]) -> list[str]: ...

    def forget_missing(self, present: list[tc.Link]) -> None: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class AgentOptions:
    interfaces: list[str] | None = None  # None: every non-loopback interface
    poll_interval_s: float = 0.2
    link_scan_interval_s: float = 1.0
    retry_interval_s: float = 5.0


class Agent:
    def __init__(self, source: Source, datapath: Datapath, options: AgentOptions) -> None:
        self.source = source
        self.datapath = datapath
        self.options = options
        self.table = ServiceTable()
        self.planner = Planner()
        self.errors: list[str] = []
        self.synced = threading.Event()
        self._missing_links: list[str] = []
        self._sweep_pending = False

    def sync(self) -> None:
        """First sync: load everything, make the maps match, then attach."""
        refs = self.source.poll(self.table)
        self.planner.update(self.table, refs)
        # Adopted frontends that the source no longer lists are stale, unless
        # part of the source could not be read: then they may be in that part,
        # and are kept until it reads again.
        self._sweep_pending = not self.source.complete
        if self._sweep_pending:
            log.warning("part of the source is unreadable: keeping adopted frontends it may hold")
        remove_stale = not self._sweep_pending
        self._record(self.datapath.reconcile(self.planner.frontends(), remove_stale))
        self._attach()
        frontends = self.planner.frontends()
        log.info(
            "synced: %d services, %d frontends, %d backends; %d errors",
            len(self.planner.plans),
            len(frontends),
            sum(len(fe.backends) for fe in frontends.values()),
            len(self.errors),
        )
        self.synced.set()

    def step(self) -> PlanDiff:
        refs = self.source.poll(self.table)
        change = self.planner.update(self.table, refs) if refs else PlanDiff()
        if change:
            started = time.monotonic()
            errors = self.datapath.apply(change)
            self._record(errors)
            log.info(
                "applied %d frontend updates and %d removals in %.1f ms",
                len(change.upserts),
                len(change.removals),
                (time.monotonic() - started) * 1000,
            )
        if self._sweep_pending and self.source.complete:
            self._sweep_pending = False
            log.info("the whole source reads again: removing stale frontends")
            self._record(self.datapath.reconcile(self.planner.frontends()))
        return change

    def run(self, stop: threading.Event) -> None:
        self.sync()
        next_links = next_retry = time.monotonic()
        while not stop.wait(self.options.poll_interval_s):
            try:
                self.step()
                now = time.monotonic()
                if now >= next_links:
                    next_links = now + self.options.link_scan_interval_s
                    self._attach()
                if self.errors and now >= next_retry:
                    next_retry = now + self.options.retry_interval_s
                    self.errors = []
                    desired = self.planner.frontends()
                    remove_stale = not self._sweep_pending
                    self._record(self.datapath.reconcile(desired, remove_stale))
            except Exception:  # one bad tick must not take the agent down
                log.exception("agent loop error; continuing")

    def _attach(self) -> None:
        if self.options.interfaces is not None:
            wanted, missing = tc.find_interfaces(self.options.interfaces)
            if missing != self._missing_links:  # report each change once, not every scan
                self._record(missing)
                self._missing_links = missing
        else:
            wanted = tc.list_interfaces()
        self.datapath.forget_missing(wanted)
        self._record(self.datapath.attach(wanted))

    def _record(self, errors: list[str]) -> None:
        for message in errors:
            log.error("%s", message)
        self.errors += errors
