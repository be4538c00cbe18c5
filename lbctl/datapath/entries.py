"""What one frontend is made of in the maps: the Python records that mirror
the entries, and the encoders that turn them into lbctl.h structs.

FrontendTable (frontends.py) decides what to write and in which order; this
module only says what the bytes are.  `Batch` gathers many entries of one map
into the contiguous arrays a batched write takes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from lbctl.datapath import layout
from lbctl.datapath.libbpf import BpfMap, MapError
from lbctl.model import Protocol, ServiceRef
from lbctl.plan import Backend, FrontendKey

log = logging.getLogger(__name__)

Target = tuple[Any, int, Protocol]  # (address, port, protocol)

_F_READY = layout.const("LB_BACKEND_F_READY")
_F_SERVING = layout.const("LB_BACKEND_F_SERVING")
_F_TERMINATING = layout.const("LB_BACKEND_F_TERMINATING")
_SVC_F_CLUSTER_IP = layout.const("LB_SVC_F_CLUSTER_IP")

MAX_BACKENDS_PER_FRONTEND = 0xFFFF  # lb_service.count is a __u16


def backend_flags(b: Backend) -> int:
    return (
        (_F_READY if b.ready else 0)
        | (_F_SERVING if b.serving else 0)
        | (_F_TERMINATING if b.terminating else 0)
    )


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


@dataclasses.dataclass
class ProgrammedFrontend:
    ident: int
    service: ServiceRef
    port_name: str
    slots: list[Target]  # slots[0] is slot 1


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


def header(ident: int, count: int) -> Any:
    value = layout.new("struct lb_service")
    _fill_header(value, ident, count)
    return value


def _fill_header(value: Any, ident: int, count: int) -> None:
    value.frontend_id = ident
    value.count = count
    value.flags = _SVC_F_CLUSTER_IP


def slot_key(ident: int, slot: int) -> Any:
    return layout.new("struct lb_slot_key", frontend_id=ident, slot=slot)


def slot(backend_id: int) -> Any:
    return layout.new("struct lb_slot", backend_id=backend_id)


def member_key(frontend_id: int, backend_id: int) -> Any:
    return layout.new("struct lb_member_key", frontend_id=frontend_id, backend_id=backend_id)


def member() -> Any:
    return layout.new("struct lb_member")


def meta(ref: ServiceRef, port_name: str) -> Any:
    value = layout.new("struct lb_frontend_meta")
    _fill_meta(value, ref, port_name)
    return value


def _fill_meta(value: Any, ref: ServiceRef, port_name: str) -> None:
    value.namespace = ref.namespace.encode()[:63]
    value.name = ref.name.encode()[:63]
    value.port_name = port_name.encode()[:15]


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

    def add_meta(self, ident: int, ref: ServiceRef, port_name: str) -> None:
        i = self._next()
        self.keys[i] = ident
        _fill_meta(self.values[i], ref, port_name)

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

    def add_header(self, fkey: FrontendKey, ident: int, count: int) -> None:
        i = self._next()
        _fill_service_key(self.keys[i], fkey)
        _fill_header(self.values[i], ident, count)

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
