"""What one frontend is made of in the maps: the Python records that mirror
the entries, and the encoders that turn them into lbctl.h structs.

FrontendWriter (frontends.py) decides what to write and in which order; this
module only says what the bytes are.  `Batch` gathers many entries of one map
into the contiguous arrays a batched write takes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from lbctl.datapath.ebpf import layout
from lbctl.datapath.ebpf.libbpf import BpfMap, MapError
from lbctl.model import Protocol, ServiceRef
from lbctl.plan import scheduling
from lbctl.plan.planner import CLUSTER_IP, Backend, Frontend, FrontendKey

log = logging.getLogger(__name__)

Target = tuple[Any, int, Protocol]  # (address, port, protocol)

_F_READY = layout.const("LB_BACKEND_F_READY")
_F_SERVING = layout.const("LB_BACKEND_F_SERVING")
_F_TERMINATING = layout.const("LB_BACKEND_F_TERMINATING")
_SVC_F_CLUSTER_IP = layout.const("LB_SVC_F_CLUSTER_IP")
_SVC_F_EXTERNAL = layout.const("LB_SVC_F_EXTERNAL")
_SVC_F_LOCAL = layout.const("LB_SVC_F_LOCAL")
_SVC_F_SOURCE_RANGES = layout.const("LB_SVC_F_SOURCE_RANGES")
_SVC_F_DROP_EMPTY = layout.const("LB_SVC_F_DROP_EMPTY")

MAX_BACKENDS_PER_FRONTEND = 0xFFFF  # lb_service.count is a __u16

# lb_service.sched of each scheduler name, and back.
SCHED_CODES = {
    scheduling.RANDOM: layout.const("LB_SCHED_RANDOM"),
    scheduling.RR: layout.const("LB_SCHED_RR"),
    scheduling.WRR: layout.const("LB_SCHED_WRR"),
    scheduling.MAGLEV: layout.const("LB_SCHED_MAGLEV"),
    scheduling.SH: layout.const("LB_SCHED_SH"),
    scheduling.LC: layout.const("LB_SCHED_LC"),
}
SCHED_NAMES = {code: name for name, code in SCHED_CODES.items()}


def backend_flags(b: Backend) -> int:
    return (
        (_F_READY if b.ready else 0)
        | (_F_SERVING if b.serving else 0)
        | (_F_TERMINATING if b.terminating else 0)
    )


def frontend_flags(fe: Frontend) -> int:
    """lb_service.flags of a frontend: how the datapath treats its traffic."""
    flags = _SVC_F_CLUSTER_IP if fe.kind == CLUSTER_IP else _SVC_F_EXTERNAL
    if fe.local:
        flags |= _SVC_F_LOCAL
    if fe.source_ranges:
        flags |= _SVC_F_SOURCE_RANGES
    if fe.drop_empty:
        flags |= _SVC_F_DROP_EMPTY
    return flags


def has_source_ranges(fe: ProgrammedFrontend) -> bool:
    return bool(fe.flags & _SVC_F_SOURCE_RANGES)


def describe_flags(flags: int) -> list[str]:
    """Names of lb_service flags, for `lbctl maps dump`."""
    names = {
        _SVC_F_LOCAL: "local",
        _SVC_F_SOURCE_RANGES: "source-ranges",
        _SVC_F_DROP_EMPTY: "drop-when-empty",
    }
    return [name for bit, name in names.items() if flags & bit]


def flags_backend(target: Target, flags: int) -> Backend:
    address, port, protocol = target
    return Backend(
        address,
        port,
        protocol,
        ready=bool(flags & _F_READY),
        serving=bool(flags & _F_SERVING),
        terminating=bool(flags & _F_TERMINATING),
    )


class IdPool:
    """Integer ids from 1, handed out in increasing order.

    An id is not reused until the 32-bit space wraps, so a conntrack entry
    that names a removed frontend or backend can never match a new one.
    """

    LIMIT = 0xFFFFFFFF

    def __init__(self) -> None:
        self._next = 1
        self._used: set[int] = set()

    def take(self, wanted: int | None = None) -> int:
        if wanted is not None:
            self._used.add(wanted)
            self._next = max(self._next, wanted + 1)
            return wanted
        while self._next in self._used or self._next > self.LIMIT:
            self._next = 1 if self._next > self.LIMIT else self._next + 1
        ident = self._next
        self._next += 1
        self._used.add(ident)
        return ident

    def release(self, ident: int) -> None:
        self._used.discard(ident)


@dataclasses.dataclass
class ProgrammedBackend:
    ident: int
    flags: int
    refs: int = 0


# What a table row is built from: the kind of table (wrr, or maglev for both
# maglev and sh) and the (target, weight) pairs, sorted.
TableSpec = tuple[str, tuple[tuple[Target, int], ...]]


def table_spec(fe: Frontend) -> TableSpec | None:
    """What the frontend's table is built from; None when its scheduler uses none."""
    if fe.scheduler not in scheduling.TABLE_SCHEDULERS:
        return None
    wrr = fe.scheduler == scheduling.WRR
    pairs = sorted(((b.target, b.weight if wrr else 1) for b in fe.backends), key=_order)
    return (scheduling.WRR if wrr else scheduling.MAGLEV, tuple(pairs))


def _order(item: tuple[Target, int]) -> tuple[int, int, int, int]:
    (address, port, protocol), _ = item
    return (address.version, int(address), port, protocol.number)


def backend_name(target: Target) -> str:
    """How the Maglev permutation knows a backend: the same on every node."""
    address, port, protocol = target
    return f"{address}:{port}/{protocol.name}"


@dataclasses.dataclass
class ProgrammedFrontend:
    ident: int
    service: ServiceRef
    port_name: str
    slots: list[Target]  # slots[0] is slot 1
    flags: int = 0  # lb_service.flags
    kind: str = ""
    sched: int = 0  # lb_service.sched
    affinity_s: int = 0
    table: int = 0  # lb_tables row, 0: none
    row: list[int] = dataclasses.field(default_factory=list)  # backend ids of the row
    spec: TableSpec | None = None  # what the row was built from (None: unknown)
    written: tuple[int, ...] = ()  # the header last written, as header_state()

    def header_state(self) -> tuple[int, ...]:
        """The header this frontend needs, as header_fields() reads one."""
        return (
            len(self.slots),
            self.flags,
            self.sched,
            self.table,
            len(self.row) if self.table else 0,
            self.affinity_s,
        )

    def describes(self, fe: Frontend) -> bool:
        """Do the header and metadata say what `fe` says (backends aside)?"""
        return (
            self.service,
            self.port_name,
            self.kind,
            self.flags,
            self.sched,
            self.affinity_s,
        ) == (
            fe.service,
            fe.port_name,
            fe.kind,
            frontend_flags(fe),
            SCHED_CODES[fe.scheduler],
            fe.affinity_timeout,
        )


class Undo:
    """Actions that revert the writes made so far, run in reverse order."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], None]] = []

    def push(self, step: Callable[[], None]) -> None:
        self._steps.append(step)

    def run(self) -> None:
        for step in reversed(self._steps):
            try:
                step()
            except OSError as err:  # keep undoing the rest
                log.error("could not undo a partial map write: %s", err)
        self._steps.clear()


# -- encoders: one per kind of entry -------------------------------------------


def service_key(key: FrontendKey) -> Any:
    value = layout.new("struct lb4_key")
    _fill_service_key(value, key)
    return value


def _fill_service_key(value: Any, key: FrontendKey) -> None:
    value.addr = layout.ip4(key.address)  # type: ignore[arg-type]
    value.port = layout.port(key.port)
    value.proto = key.protocol.number
    value.scope = key.scope


def header(fe: ProgrammedFrontend) -> Any:
    value = layout.new("struct lb_service")
    _fill_header(value, fe)
    return value


def _fill_header(value: Any, fe: ProgrammedFrontend) -> None:
    value.frontend_id = fe.ident
    value.count = len(fe.slots)
    value.flags = fe.flags
    value.sched = fe.sched
    value.table = fe.table
    value.table_len = len(fe.row) if fe.table else 0
    value.affinity_s = fe.affinity_s


def header_fields(value: Any) -> tuple[int, ...]:
    """A struct lb_service as ProgrammedFrontend.header_state() says it (the
    frontend id aside), to tell whether a header needs writing."""
    return (
        value.count,
        value.flags,
        value.sched,
        value.table,
        value.table_len,
        value.affinity_s,
    )


def slot_key(ident: int, slot: int) -> Any:
    return layout.new("struct lb_slot_key", frontend_id=ident, slot=slot)


def slot(backend_id: int) -> Any:
    return layout.new("struct lb_slot", backend_id=backend_id)


def member_key(frontend_id: int, backend_id: int) -> Any:
    return layout.new("struct lb_member_key", frontend_id=frontend_id, backend_id=backend_id)


def member() -> Any:
    return layout.new("struct lb_member")


def meta(ref: ServiceRef, port_name: str, kind: str) -> Any:
    value = layout.new("struct lb_frontend_meta")
    _fill_meta(value, ref, port_name, kind)
    return value


def _fill_meta(value: Any, ref: ServiceRef, port_name: str, kind: str) -> None:
    value.namespace = ref.namespace.encode()[:63]
    value.name = ref.name.encode()[:63]
    value.port_name = port_name.encode()[:15]
    value.kind = kind.encode()[:15]


def backend(target: Target, flags: int) -> Any:
    value = layout.new("struct lb4_backend")
    _fill_backend(value, target, flags)
    return value


def _fill_backend(value: Any, target: Target, flags: int) -> None:
    address, port, protocol = target
    value.addr = layout.ip4(address)
    value.port = layout.port(port)
    value.proto = protocol.number
    value.flags = flags


def id_key(ident: int) -> Any:
    return layout.ffi.new("__u32 *", ident)


def ipv4(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(layout.ip4_str(value))


# -- many entries of one map at once -------------------------------------------


class Batch:
    """Entries of one map in two contiguous arrays, written with one call."""

    def __init__(self, bpf_map: BpfMap, size: int) -> None:
        self.map = bpf_map
        self.keys = layout.ffi.new(f"{bpf_map.key_type}[]", max(size, 1))
        self.values = layout.ffi.new(f"{bpf_map.value_type}[]", max(size, 1))
        self.count = 0
        self.written = 0  # how many reached the map

    def _next(self) -> int:
        i = self.count
        self.count += 1
        return i

    def add_backend(self, ident: int, target: Target, flags: int) -> None:
        i = self._next()
        self.keys[i] = ident
        _fill_backend(self.values[i], target, flags)

    def add_meta(self, ident: int, ref: ServiceRef, port_name: str, kind: str) -> None:
        i = self._next()
        self.keys[i] = ident
        _fill_meta(self.values[i], ref, port_name, kind)

    def add_member(self, frontend_id: int, backend_id: int) -> None:
        key = self.keys[self._next()]
        key.frontend_id = frontend_id
        key.backend_id = backend_id

    def add_slot(self, frontend_id: int, n: int, backend_id: int) -> None:
        i = self._next()
        key = self.keys[i]
        key.frontend_id = frontend_id
        key.slot = n
        self.values[i].backend_id = backend_id

    def add_header(self, fkey: FrontendKey, fe: ProgrammedFrontend) -> None:
        i = self._next()
        _fill_service_key(self.keys[i], fkey)
        _fill_header(self.values[i], fe)

    def write(self) -> None:
        try:
            self.map.update_batch(self.keys, self.values, self.count)
        except MapError as err:
            self.written = err.done
            raise
        self.written = self.count

    def unwrite(self) -> None:
        """Delete what `write` put in the map (the batch path's rollback)."""
        for i in range(self.written):
            try:
                self.map.delete(self.keys + i)
            except OSError as err:  # keep removing the rest
                log.error("could not roll back an entry of map %s: %s", self.map.name, err)
        self.written = 0
