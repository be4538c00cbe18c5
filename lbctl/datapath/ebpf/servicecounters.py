"""Per-Service datapath counters: the lb_fe_stats map, one entry per frontend.

The agent creates a frontend's entry, zeroed, before the frontend becomes
visible and deletes it after the frontend is gone, so a frontend id never
inherits another's counts; the BPF programs only look entries up.  With the
counters off no entry is made and the programs' lookups miss.

At scrape time the entries are read in batches, summed over CPUs and over
the frontends of one Service port (its ClusterIP, NodePort, load-balancer
and external addresses, and both scopes of externalTrafficPolicy Local), so
the series are bounded by the number of Service ports.  The last counts of
a frontend that went away are kept under its Service port while that port
has frontends, so its counters never go backwards.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping

from lbctl.datapath.ebpf import layout
from lbctl.datapath.ebpf.libbpf import BpfMap

log = logging.getLogger(__name__)

# the fields of struct lb_fe_stats, in order
FIELDS = (
    "packets",
    "bytes",
    "reply_packets",
    "reply_bytes",
    "new_flows",
    "rejected",
    "drop_no_backend",
    "drop_source_range",
    "drop_no_local",
    "drop_nat_exhausted",
)
# drop reason label -> field: a fixed set, whatever the traffic
DROP_REASONS = {
    "no_endpoints_rejected": "rejected",
    "no_endpoints": "drop_no_backend",
    "source_range": "drop_source_range",
    "no_local_endpoints": "drop_no_local",
    "nat_ports_exhausted": "drop_nat_exhausted",
}

# (namespace, service, port name, protocol): one Service port
Labels = tuple[str, str, str, str]
Counts = dict[str, int]


def _zero() -> Counts:
    return dict.fromkeys(FIELDS, 0)


class ServiceCounters:
    def __init__(self, bpf_map: BpfMap, enabled: bool = True) -> None:
        self.map = bpf_map
        self.enabled = enabled
        self._retired: dict[Labels, Counts] = {}  # final counts of removed frontends
        self._lock = threading.Lock()  # the agent removes while a scrape reads

    def create(self, ident: int) -> None:
        """A zeroed entry for a new frontend; a failure costs its counters only."""
        if not self.enabled:
            return
        try:
            self.map.update(_key(ident), self.map.new_value())
        except OSError as err:
            log.warning("frontend %d: no per-Service counters: %s", ident, err)

    def create_many(self, idents: Iterable[int]) -> None:
        for ident in idents:
            self.create(ident)

    def discard(self, ident: int) -> None:
        """Delete an entry made for a frontend that was never programmed."""
        try:
            self.map.delete(_key(ident))
        except OSError as err:
            log.warning("frontend %d: deleting its counters: %s", ident, err)

    def remove(self, ident: int, labels: Labels) -> None:
        """Delete a removed frontend's entry, keeping its last counts for its Service port."""
        key = _key(ident)
        try:
            value = self.map.lookup(key)
            if value is None:
                return
            self.map.delete(key)
        except OSError as err:
            log.warning("frontend %d: reading its last counts: %s", ident, err)
            return
        final = _sum(value, self.map.ncpus)
        with self._lock:
            kept = self._retired.setdefault(labels, _zero())
            for field in FIELDS:
                kept[field] += final[field]

    def sweep(self, live: Iterable[int]) -> None:
        """After a restart: delete the entries of frontends that are not live (or all,
        with the counters off), and make those live frontends lack (older maps)."""
        keep = set(live) if self.enabled else set()
        present = set(self._idents())
        for ident in present - keep:
            self.map.delete(_key(ident))
        self.create_many(keep - present)

    def read(self, labels_of: Mapping[int, Labels]) -> dict[Labels, Counts]:
        """Counts per Service port: live frontends plus what removed ones left."""
        out: dict[Labels, Counts] = {}
        ncpus = self.map.ncpus
        size = len(FIELDS)
        for keys, values, n in self.map.chunks():
            raw = layout.ffi.unpack(layout.ffi.cast("__u64 *", values), n * ncpus * size)
            for i in range(n):
                labels = labels_of.get(int(keys[i]))
                if labels is None:  # created or removed meanwhile
                    continue
                total = out.setdefault(labels, _zero())
                base = i * ncpus * size
                for f, field in enumerate(FIELDS):
                    total[field] += sum(raw[base + c * size + f] for c in range(ncpus))
        with self._lock:
            for labels in list(self._retired):
                if labels not in out:  # the Service port is gone: so are its series
                    del self._retired[labels]
                    continue
                for field, value in self._retired[labels].items():
                    out[labels][field] += value
        return out

    def _idents(self) -> list[int]:
        return [int(keys[i]) for keys, _, n in self.map.chunks() for i in range(n)]


def _key(ident: int) -> object:
    return layout.ffi.new("__u32 *", ident)


def _sum(value: object, ncpus: int) -> Counts:
    per_cpu = [value[c] for c in range(ncpus)]  # type: ignore[index]
    return {field: sum(int(getattr(v, field)) for v in per_cpu) for field in FIELDS}
