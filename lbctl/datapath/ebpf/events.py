"""The programs' event stream: the lb_monitor switch and the lb_events ring buffer.

The programs emit a `struct lb_event` (bpf/lbctl.h) at each event site
(bpf/events.h) only while lb_monitor's mask has the event's type and its
stamp is fresh (LB_MONITOR_STALE_NS).  `Switch` turns the stream on for one
reader, keeps the stamp fresh and turns it off again; `Ring` reads the ring
buffer through libbpf's ring_buffer__new (cffi), from the pinned map.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lbctl.datapath.ebpf import layout, libbpf
from lbctl.datapath.ebpf.libbpf import BpfMap, ffi

# LB_EV_* -> the name `lbctl monitor` prints and filters by
TYPE_NAMES = {
    layout.const("LB_EV_DROP"): "drop",
    layout.const("LB_EV_REJECT"): "reject",
    layout.const("LB_EV_NEW_FLOW"): "new-flow",
    layout.const("LB_EV_NAT"): "nat",
    layout.const("LB_EV_NAT_EXHAUSTED"): "nat-exhausted",
    layout.const("LB_EV_ICMP"): "icmp",
}
TYPES = {name: number for number, name in TYPE_NAMES.items()}
HOOK_NAMES = {
    layout.const("LB_HOOK_TC_INGRESS"): "tc-ingress",
    layout.const("LB_HOOK_TC_EGRESS"): "tc-egress",
    layout.const("LB_HOOK_XDP"): "xdp",
}
STALE_S = layout.const("LB_MONITOR_STALE_NS") / 1e9
EVENT_SIZE = layout.sizeof("struct lb_event")


def mask_of(types: list[str]) -> int:
    out = 0
    for name in types:
        out |= 1 << TYPES[name]
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MonitorBusy(RuntimeError):
    pass


class Switch:
    """lb_monitor, held by this process while it reads events.

    One reader at a time: a ring buffer hands each record to one consumer,
    so a second monitor would see part of the events.  A holder whose stamp
    went stale (killed with SIGKILL) no longer counts; the programs stopped
    emitting for it already."""

    def __init__(self, pin_dir: Path, mask: int) -> None:
        self.map = BpfMap.open_pinned(str(pin_dir / "lb_monitor"), "__u32", "struct lb_monitor")
        self.key = ffi.new("__u32 *", 0)
        self.mask = mask
        self.pid = os.getpid()
        held = self.map.lookup(self.key)
        if held is not None and held.mask and held.pid != self.pid:
            age = time.monotonic_ns() - int(held.alive_ns)
            if age < STALE_S * 1e9 and _alive(int(held.pid)):
                self.map.close()
                raise MonitorBusy(
                    f"another lbctl monitor (pid {held.pid}) is reading the events of "
                    f"{pin_dir}: a ring buffer has one reader; stop it first, or wait for "
                    f"it to end (its --count or --duration)"
                )
        self.refresh()

    def refresh(self) -> None:
        """Mask on, stamp now: call it at least every STALE_S / 3 seconds."""
        value = layout.new(
            "struct lb_monitor", alive_ns=time.monotonic_ns(), mask=self.mask, pid=self.pid
        )
        self.map.update(self.key, value)

    def clear(self) -> None:
        """Events off (the programs go back to one lookup per site)."""
        if self.map.fd < 0:
            return
        held = self.map.lookup(self.key)
        if held is None or held.pid == self.pid:
            self.map.update(self.key, layout.new("struct lb_monitor"))
        self.map.close()


@dataclasses.dataclass(frozen=True)
class Event:
    ts_ns: int
    type: str
    reason: int  # LB_STAT_* index
    proto: int
    hook: str
    frontend_id: int
    backend_id: int
    client: tuple[str, int]
    destination: tuple[str, int]
    nat: tuple[str, int] | None

    @classmethod
    def decode(cls, raw: Any) -> Event:
        ev = ffi.cast("struct lb_event *", raw)
        nat = None
        if ev.nat_addr:
            nat = (layout.ip4_str(ev.nat_addr), layout.port_num(ev.nat_port))
        return cls(
            ts_ns=int(ev.ts_ns),
            type=TYPE_NAMES.get(ev.type, str(ev.type)),
            reason=int(ev.reason),
            proto=int(ev.proto),
            hook=HOOK_NAMES.get(ev.hook, str(ev.hook)),
            frontend_id=int(ev.frontend_id),
            backend_id=int(ev.backend_id),
            client=(layout.ip4_str(ev.saddr), layout.port_num(ev.sport)),
            destination=(layout.ip4_str(ev.daddr), layout.port_num(ev.dport)),
            nat=nat,
        )


class Ring:
    """The pinned lb_events ring buffer; `poll` hands each record to `on_event`."""

    def __init__(self, pin_dir: Path, on_event: Callable[[Event], None]) -> None:
        self.fd = libbpf.obj_get(str(pin_dir / "lb_events"))
        self._on_event = on_event
        self.error: Exception | None = None

        def sample(_ctx: Any, data: Any, size: int) -> int:
            if size < EVENT_SIZE:
                return 0
            try:
                on_event(Event.decode(data))
            except Exception as err:  # raised again by poll()
                self.error = err
                return -1
            return 0

        self._sample = ffi.callback("int(void *, void *, size_t)", sample)  # lives with the ring
        self._rb = libbpf._lib.ring_buffer__new(self.fd, self._sample, ffi.NULL, ffi.NULL)
        if self._rb == ffi.NULL:
            os.close(self.fd)
            raise OSError(errno.EINVAL, f"cannot read the ring buffer {pin_dir / 'lb_events'}")

    def poll(self, timeout_ms: int) -> None:
        rc = libbpf._lib.ring_buffer__poll(self._rb, timeout_ms)
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        if rc < 0 and rc != -errno.EINTR:
            raise OSError(-rc, f"reading lb_events: {os.strerror(-rc)}")

    def close(self) -> None:
        if self._rb is not None:
            libbpf._lib.ring_buffer__free(self._rb)
            self._rb = None
            os.close(self.fd)
