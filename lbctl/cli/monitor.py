"""`lbctl monitor`: what the programs do with real packets, live, one line an event.

Drops and rejects by reason, new flows, NAT ports given and missing, ICMP
errors translated (lbctl/datapath/ebpf/events.py reads them), named with the
Service port they were sent to and the backend chosen.  Events stream
only while a monitor runs; it ends on SIGINT or SIGTERM, after --count
events or --duration seconds, and prints a summary of counts on stderr.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from lbctl.datapath.ebpf import events, layout
from lbctl.datapath.ebpf.inspect import STAT_NAMES
from lbctl.datapath.ebpf.libbpf import BpfMap
from lbctl.datapath.ebpf.maps import MAP_TYPES
from lbctl.model import Protocol

REASONS = {layout.const(name): label for name, label in STAT_NAMES.items()}
PROTOS = {int(p.value): p.name.lower() for p in Protocol}
REFRESH_S = 1.0


class Names:
    """Frontend and backend ids as the maps name them, read again when an id is
    new (a Service made after the monitor started), an unknown one once a second."""

    def __init__(self, pin_dir: Path) -> None:
        self._maps = {
            name: BpfMap.open_pinned(str(pin_dir / name), *MAP_TYPES[name])
            for name in ("lb4_services", "lb_frontend_meta", "lb4_backends")
        }
        self.frontends: dict[int, str] = {}
        self.services: dict[int, str] = {}  # frontend id -> namespace/name
        self.backends: dict[int, str] = {}
        self._read_at = 0.0
        self._tried: set[int] = set()
        self.read()

    def read(self) -> None:
        self._read_at = time.monotonic()
        meta = {int(k[0]): v for k, v in self._maps["lb_frontend_meta"].items()}
        for key, svc in self._maps["lb4_services"].items():
            fid = int(svc.frontend_id)
            m = meta.get(fid)
            name = f"{layout.c_string(m.namespace)}/{layout.c_string(m.name)}" if m else "?"
            proto = PROTOS.get(int(key.proto), str(key.proto))
            self.services[fid] = name
            self.frontends[fid] = f"{name}:{layout.port_num(key.port)}/{proto}"
        for key, be in self._maps["lb4_backends"].items():
            self.backends[int(key[0])] = f"{layout.ip4_str(be.addr)}:{layout.port_num(be.port)}"

    def _fresh(self, table: dict[int, str], ident: int) -> str | None:
        # a new id: read again; one still unknown after that, once a second
        stale = ident not in self._tried or time.monotonic() - self._read_at >= 1.0
        if ident and ident not in table and stale:
            self._tried.add(ident)
            self.read()
        return table.get(ident)

    def frontend(self, ident: int) -> str:
        return self._fresh(self.frontends, ident) or ("-" if not ident else f"frontend#{ident}")

    def service(self, ident: int) -> str:
        return self._fresh(self.services, ident) or "-"

    def backend(self, ident: int) -> str:
        return self._fresh(self.backends, ident) or ("-" if not ident else f"backend#{ident}")

    def close(self) -> None:
        for m in self._maps.values():
            m.close()


class Filter:
    def __init__(
        self,
        service: str | None,
        reasons: list[str],
        client: str | None,
    ) -> None:
        if service is not None and service.count("/") != 1:
            raise ValueError(f"--service {service!r} must be NAMESPACE/NAME, e.g. default/web")
        unknown = [r for r in reasons if r not in REASONS.values()]
        if unknown:
            raise ValueError(
                f"--reason {','.join(unknown)}: no such reason; choose among "
                f"{', '.join(sorted(set(REASONS.values())))}"
            )
        self.service = service
        self.reasons = set(reasons)
        try:
            self.client = ipaddress.IPv4Network(client) if client else None
        except ValueError as err:
            raise ValueError(f"--client {client!r}: {err}; give an IPv4 address or CIDR") from err

    def wants(self, ev: events.Event, names: Names) -> bool:
        if self.reasons and REASONS.get(ev.reason) not in self.reasons:
            return False
        if self.client and ipaddress.IPv4Address(ev.client[0]) not in self.client:
            return False
        return not self.service or names.service(ev.frontend_id) == self.service


def _where(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}" if addr[1] else addr[0]  # an ICMP error has no ports


def describe(ev: events.Event, names: Names, wall: float) -> dict[str, Any]:
    """The event as `-o json` prints it (and the table's columns)."""
    out: dict[str, Any] = {
        "time": wall,
        "type": ev.type,
        "reason": REASONS.get(ev.reason, str(ev.reason)),
        "proto": PROTOS.get(ev.proto, str(ev.proto)),
        "client": _where(ev.client),
        "destination": _where(ev.destination),
        "service": names.frontend(ev.frontend_id),
        "backend": names.backend(ev.backend_id),
        "hook": ev.hook,
    }
    if ev.nat is not None:
        out["nat"] = f"{ev.nat[0]}:{ev.nat[1]}" if ev.nat[1] else ev.nat[0]
    return out


def line(doc: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(doc["time"]))
    stamp += f".{int(doc['time'] % 1 * 1e6):06d}"
    nat = f" nat={doc['nat']}" if "nat" in doc else ""
    return (
        f"{stamp} {doc['type']:<13} {doc['reason']:<22} {doc['proto']:<3} "
        f"{doc['client']} -> {doc['destination']} service={doc['service']} "
        f"backend={doc['backend']}{nat} hook={doc['hook']}"
    )


class Monitor:
    def __init__(
        self,
        pin_dir: Path,
        types: list[str],
        filt: Filter,
        output: str,
        rate: int,
        out: TextIO,
    ) -> None:
        self.filt, self.output, self.rate, self.out = filt, output, rate, out
        self.counts: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.filtered = self.limited = self.printed = 0
        self._window, self._in_window = 0, 0
        self.limit: int | None = None  # --count
        self.names = Names(pin_dir)
        self.switch: events.Switch | None = None
        self.ring: events.Ring | None = None
        try:
            self.ring = events.Ring(pin_dir, self._on_event)
            self.switch = events.Switch(pin_dir, events.mask_of(types))
        except BaseException:
            self.close()
            raise

    def _on_event(self, ev: events.Event) -> None:
        if self.limit is not None and self.printed >= self.limit:
            return  # --count reached within one poll: the rest are not ours
        if not self.filt.wants(ev, self.names):
            self.filtered += 1
            return
        self.counts[ev.type] += 1
        if ev.type in ("drop", "reject", "nat-exhausted"):
            self.reasons[REASONS.get(ev.reason, str(ev.reason))] += 1
        second = int(time.monotonic())
        if second != self._window:
            self._window, self._in_window = second, 0
        if self.rate and self._in_window >= self.rate:
            self.limited += 1
            return
        self._in_window += 1
        wall = time.time() - (time.monotonic_ns() - ev.ts_ns) / 1e9
        doc = describe(ev, self.names, wall)
        text = json.dumps(doc, sort_keys=True) if self.output == "json" else line(doc)
        self.out.write(text + "\n")
        self.out.flush()
        self.printed += 1

    def run(self, count: int | None, duration: float | None) -> None:
        assert self.ring is not None and self.switch is not None
        stop: list[int] = []
        self.limit = count

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            stop.append(signum)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            end = time.monotonic() + duration if duration is not None else None
            refreshed = time.monotonic()
            while not stop and (count is None or self.printed < count):
                now = time.monotonic()
                if end is not None and now >= end:
                    break
                if now - refreshed >= REFRESH_S:
                    self.switch.refresh()
                    refreshed = now
                self.ring.poll(100)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def summary(self) -> str:
        total = sum(self.counts.values())
        kinds = ", ".join(f"{t} {n}" for t, n in sorted(self.counts.items())) or "none"
        text = f"lbctl monitor: {total} events ({kinds})"
        if self.reasons:
            text += "; by reason: " + ", ".join(f"{r} {n}" for r, n in sorted(self.reasons.items()))
        return text + f"; {self.filtered} filtered out, {self.limited} over the rate limit"

    def close(self) -> None:
        if self.switch is not None:
            self.switch.clear()
            self.switch = None
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        self.names.close()


def main(
    pin_dir: Path,
    types: list[str],
    service: str | None,
    reasons: list[str],
    client: str | None,
    output: str,
    rate: int,
    count: int | None,
    duration: float | None,
) -> int:
    filt = Filter(service, reasons, client)
    if not (pin_dir / "lb_events").exists():
        if (pin_dir / "lb4_services").exists():
            raise FileNotFoundError(
                f"the maps under {pin_dir} have no event stream (lb_events): the agent that "
                "made them is older than this lbctl; restart it with this version (its start "
                "adds the map, flows are kept)"
            )
        raise FileNotFoundError(
            f"no lbctl maps under {pin_dir}: is the agent running in eBPF mode? (--bpffs)"
        )
    mon = Monitor(pin_dir, types, filt, output, rate, sys.stdout)
    try:
        print(f"lbctl monitor: watching {', '.join(types)} events of {pin_dir}", file=sys.stderr)
        try:
            mon.run(count, duration)
            # what the programs emitted before the mask went off
            assert mon.ring is not None
            if count is None or mon.printed < count:
                mon.ring.poll(0)
        except BrokenPipeError:  # `lbctl monitor | head`: the reader has had enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        mon.close()
        print(mon.summary(), file=sys.stderr)
    return 0
