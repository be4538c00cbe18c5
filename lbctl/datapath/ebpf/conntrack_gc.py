"""Conntrack, NAT and session-affinity garbage collection.

The programs judge a flow alive by its forward entry's last_seen and the
timeouts of BpfSettings; a dead entry is ignored by them at once, but stays
in its LRU map until evicted.  This sweep deletes them, so the maps' fill
(in `lbctl maps dump` and the metrics) counts live flows and a NAT port is
free again for sure.  Reverse and NAT entries live and die with their
forward twin.

Least connections: the programs count flows opened and closed (a FIN or
RST) in lb_conns; flows that just stop, or whose entry the LRU evicted, are
never closed there.  The sweep sets lb_conns_expired to the difference
between what lb_conns says is open and the live forward entries still
counted, so the count heals on every sweep whatever went missing.
Affinity entries go when their timeout has passed or their backend left
the frontend.

ct4 and nat4 are plain hash maps: when one is full the programs refuse new
flows (counted as conntrack_full and nat_exhausted) rather than evict an
established flow's entry, as an LRU map would.  So the sweep also keeps
room for new flows: when a table is more than `HIGH` full of live flows, it
ends flows until it is back to `LOW`: idle ones first, longest idle first
(UDP idle `IDLE_UDP_S`, TCP idle `IDLE_TCP_S`), then flows that are not
established (not `assured`: the client never spoke after a reply, as a SYN
flood's half-open connections and one-shot datagrams), newest first.  An
established TCP connection in use is never ended to make room, as
netfilter's conntrack never early-drops an assured connection: a table full
of them refuses new flows, counted and reported, until flows end or the
operator raises its size.  UDP has no connection to break: a flow idle for
ten seconds that loses its entry is balanced again by its next datagram.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection, Mapping
from typing import Any

from lbctl.datapath.ebpf import layout
from lbctl.datapath.ebpf.maps import Maps
from lbctl.datapath.ebpf.settings import SECOND_NS, BpfSettings

_FORWARD = layout.const("CT_DIR_FORWARD")
_F_SEEN_REPLY = layout.const("CT_F_SEEN_REPLY")
_F_CLOSING = layout.const("CT_F_CLOSING")
_F_CLOSED = layout.const("CT_F_CLOSED")
_F_LC = layout.const("CT_F_LC")
_REVERSE = layout.const("CT_DIR_REVERSE")
_TCP = 6
HIGH, LOW = 0.9, 0.75  # table fill that makes the sweep end live flows, and its goal
IDLE_UDP_S = 10  # UDP flows idle this long go first when a table is nearly full,
IDLE_TCP_S = 600  # and TCP connections idle this long (established or not)
# A reverse or NAT entry whose forward entry the walk did not see is an orphan,
# unless it was made during the walk: a hash map's walk misses entries put in
# buckets it has passed, and the NAT walk comes after the conntrack walk.
# Entries this young are left for the next sweep.
ORPHAN_GRACE_NS = 2 * SECOND_NS


def now_ns() -> int:
    """bpf_ktime_get_ns()'s clock."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def lifetime_s(settings: BpfSettings, proto: int, flags: int) -> int:
    """The same rule as ct_lifetime() in bpf/conntrack.h."""
    if proto != _TCP:
        return settings.ct_udp_timeout_s
    if flags & _F_CLOSING:
        return settings.ct_tcp_closing_timeout_s
    if not flags & _F_SEEN_REPLY:
        return settings.ct_tcp_syn_timeout_s
    return settings.ct_tcp_timeout_s


@dataclasses.dataclass
class Swept:
    conntrack: int = 0
    nat: int = 0
    affinity: int = 0
    evicted: int = 0  # live flows ended to make room (a table over HIGH)
    # entries left, for the full-table report (not what was swept)
    conntrack_used: int = dataclasses.field(default=0, compare=False)
    nat_used: int = dataclasses.field(default=0, compare=False)
    affinity_used: int = dataclasses.field(default=0, compare=False)


@dataclasses.dataclass(frozen=True)
class Affinity:
    """What the sweep needs of a frontend with ClientIP affinity."""

    timeout_s: int
    backend_ids: frozenset[int]


Tuple = tuple[int, int, int, int, int]  # saddr, daddr, sport, dport, proto (raw fields)


def _alive(settings: BpfSettings, key: Any, e: Any, now: int) -> bool:
    return bool(now - e.last_seen_ns <= lifetime_s(settings, key.proto, e.flags) * SECOND_NS)


def sweep(
    maps: Maps,
    settings: BpfSettings,
    now: int | None = None,
    affinity: Mapping[int, Affinity] | None = None,
) -> Swept:
    """Delete dead flows' entries; one pass over ct4 and nat4 (and lb4_affinity,
    given the frontends with affinity by id)."""
    now = now_ns() if now is None else now
    out = Swept()
    forward: dict[Tuple, Any] = {}
    reverse, dead = [], []
    # lc counts first: a flow opened during the walk then counts as open
    # (not as expired) until the next sweep.
    counted = {int(k[0]): int(v.opened) - int(v.closed) for k, v in maps.lb_conns.items()}
    live_open: dict[int, int] = {}
    live: list[tuple[Any, Any]] = []
    walked = 0
    # Read everything first: deleting while walking restarts the kernel's walk.
    for key, e in maps.ct4.items():
        walked += 1
        if key.dir != _FORWARD:
            reverse.append((key, e))
        elif _alive(settings, key, e, now):
            forward[(key.saddr, key.daddr, key.sport, key.dport, key.proto)] = e
            live.append((key, e))
            if e.flags & _F_LC and e.open:
                live_open[e.backend_id] = live_open.get(e.backend_id, 0) + 1
        else:
            dead.append((key, e))
    _set_expired(maps, counted, live_open)
    young = now - ORPHAN_GRACE_NS
    for key, e in reverse:
        if e.created_ns >= young:
            continue
        fwd = forward.get((key.daddr, e.nat_addr, key.dport, e.nat_port, key.proto))
        if fwd is None or fwd.snat_addr or (fwd.nat_addr, fwd.nat_port) != (key.saddr, key.sport):
            dead.append((key, e))
    out.conntrack = sum(_delete_unchanged(maps.ct4, key, e) for key, e in dead)
    unbound = []
    nat_walked = 0
    for key, e in maps.nat4.items():
        nat_walked += 1
        if e.created_ns >= young:
            continue
        fwd = forward.get((e.client_addr, e.vip, e.client_port, e.vport, key.proto))
        bound = (key.daddr, key.dport, key.saddr, key.sport)
        if fwd is None or (fwd.snat_addr, fwd.snat_port, fwd.nat_addr, fwd.nat_port) != bound:
            unbound.append((key, e))
    out.nat = sum(_delete_unchanged(maps.nat4, key, e) for key, e in unbound)
    out.conntrack_used, out.nat_used = walked - out.conntrack, nat_walked - out.nat
    _relieve(maps, live, now, out)
    if affinity is not None:
        out.affinity = _sweep_affinity(maps, affinity, now, out)
    return out


def _relieve(maps: Maps, live: list[tuple[Any, Any]], now: int, out: Swept) -> None:
    """End live flows while a table is over HIGH, until both are at LOW:
    idle ones first (longest idle first), then those not established, newest
    first; never an established TCP connection in use."""
    ct_cap, nat_cap = maps.ct4.max_entries, maps.nat4.max_entries
    if out.conntrack_used < HIGH * ct_cap and out.nat_used < HIGH * nat_cap:
        return

    def idle(item: tuple[Any, Any]) -> bool:
        limit = IDLE_TCP_S if item[0].proto == _TCP else IDLE_UDP_S
        return bool(now - item[1].last_seen_ns >= limit * SECOND_NS)

    def order(item: tuple[Any, Any]) -> tuple[int, int]:
        if idle(item):
            return (0, item[1].last_seen_ns)
        return (1, -item[1].created_ns)

    def endable(item: tuple[Any, Any]) -> bool:
        return not item[1].assured or idle(item)

    for key, e in sorted(filter(endable, live), key=order):
        ct_over = out.conntrack_used > LOW * ct_cap
        nat_over = out.nat_used > LOW * nat_cap
        if not ct_over and not (nat_over and e.snat_addr):
            if not ct_over and not nat_over:
                return
            continue  # only NAT is short: only masqueraded flows help
        # whether or not it moved since the walk: a flood's half-open flows
        # keep moving (the backends resend their SYN-ACKs for a minute)
        if not maps.ct4.delete(key):
            continue
        out.evicted += 1
        out.conntrack_used -= 1
        twin = layout.new(
            "struct ct4_key",
            saddr=e.nat_addr,
            daddr=e.snat_addr if e.snat_addr else key.saddr,
            sport=e.nat_port,
            dport=e.snat_port if e.snat_addr else key.sport,
            proto=key.proto,
            dir=_REVERSE,
        )
        if e.snat_addr:
            out.nat_used -= maps.nat4.delete(twin)
        else:
            out.conntrack_used -= maps.ct4.delete(twin)


def _delete_unchanged(bpf_map: Any, key: Any, seen: Any) -> bool:
    """Delete an entry the walk judged dead, unless the programs have written
    it since: a NAT port a new flow took over in the meantime (1 ms after the
    old flow's last ACK), or a flow restarted on its old tuple.  Deleting
    those would cut a live flow's translation; the window left is the
    microseconds between this lookup and the delete, not the whole walk."""
    now_held = bpf_map.lookup(key)
    if now_held is None or bytes(layout.ffi.buffer(now_held)) != bytes(layout.ffi.buffer(seen)):
        return False
    return bool(bpf_map.delete(key))


def _set_expired(maps: Maps, counted: Mapping[int, int], live_open: Mapping[int, int]) -> None:
    """lb_conns_expired := counted as open - really open (the agent is its
    only writer)."""
    key = layout.ffi.new("__u32 *")
    value = layout.ffi.new("__u64 *")
    for backend_id, n in counted.items():
        key[0] = backend_id
        gone = max(0, n - live_open.get(backend_id, 0))
        old = maps.lb_conns_expired.lookup(key)
        if (int(old[0]) if old is not None else 0) == gone:
            continue
        if maps.lb_conns.lookup(key) is None:
            continue  # the backend went meanwhile, and its counts with it
        value[0] = gone
        maps.lb_conns_expired.update(key, value)


def _sweep_affinity(maps: Maps, frontends: Mapping[int, Affinity], now: int, out: Swept) -> int:
    gone = []
    for key, a in maps.lb4_affinity.items():
        out.affinity_used += 1
        fe = frontends.get(key.frontend_id)
        if (
            fe is None
            or a.backend_id not in fe.backend_ids
            or now - a.last_seen_ns > fe.timeout_s * SECOND_NS
        ):
            gone.append(key)
    deleted = sum(bool(maps.lb4_affinity.delete(key)) for key in gone)
    out.affinity_used -= deleted
    return deleted


def _state(flags: int) -> str:
    if flags & _F_CLOSED == _F_CLOSED:
        return "closed"  # both sides sent FIN, or one RST
    if flags & _F_CLOSING:
        return "closing"
    return "established" if flags & _F_SEEN_REPLY else "opening"


def flows(
    maps: Maps, limit: int = 1000, frontend_ids: Collection[int] | None = None
) -> list[dict[str, Any]]:
    """Balanced flows (forward entries), newest first, for `lbctl maps dump`;
    only those of `frontend_ids` when given.

    Entries past their timeout until the agent's next sweep are included;
    their idle time tells them apart."""
    now = now_ns()
    rows = []
    for key, e in maps.ct4.items():
        if key.dir != _FORWARD or (frontend_ids is not None and e.frontend_id not in frontend_ids):
            continue
        rows.append(
            {
                "client": f"{layout.ip4_str(key.saddr)}:{layout.port_num(key.sport)}",
                "frontend": f"{layout.ip4_str(key.daddr)}:{layout.port_num(key.dport)}",
                "backend": f"{layout.ip4_str(e.nat_addr)}:{layout.port_num(e.nat_port)}",
                "protocol": "TCP" if key.proto == _TCP else "UDP",
                "frontend_id": e.frontend_id,
                "masquerade": f"{layout.ip4_str(e.snat_addr)}:{layout.port_num(e.snat_port)}"
                if e.snat_addr
                else None,
                "age_s": round((now - e.created_ns) / SECOND_NS, 1),
                "idle_s": round((now - e.last_seen_ns) / SECOND_NS, 1),
                "state": _state(e.flags),
            }
        )
    rows.sort(key=lambda r: float(r["age_s"]))
    return rows[:limit]
