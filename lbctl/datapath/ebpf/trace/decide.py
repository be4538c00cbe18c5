"""`lbctl trace`: where the datapath would send a packet, and why.

`trace()` follows flow4_decide() of bpf/flow.h (shared by the tc and XDP
programs) step by step, in its order, over the live maps:

  1. conntrack: a live forward entry of the exact tuple keeps its backend
     (a TCP SYN restarts on it, a UDP packet follows it) while that backend
     is still in the service and the flow holds its NAT binding;
  2. the frontend: lb4_services at (destination, port, protocol); a frontend
     with externalTrafficPolicy Local sends clients outside the cluster CIDRs
     to its external-scope entry (this node's endpoints);
  3. loadBalancerSourceRanges (lb4_source_ranges);
  4. sessionAffinity ClientIP: the client's lb4_affinity entry, if it is
     within its timeout and its backend still in the frontend;
  5. the scheduler (bpf/sched.h): maglev and sh are computed here with the
     same hashes (lbctl.plan.scheduling), rr and wrr from the frontend's next turn
     (lb_rr), lc from the open flows (lb_conns), random among the slots;
  6. no backend: rejected, or dropped when the backends are on other nodes;
  7. the masquerade (lbctl/datapath/ebpf/trace/masquerade.py): the frontend's rule, then the
     backend's place (an address of this node is never masqueraded, its
     replies translated by the egress hook; a pod reaching an endpoint
     outside the pod network always is).

It only reads: nothing is sent through the programs, so no conntrack,
NAT, affinity or turn is taken.  The packet traced is a flow's first packet
(a SYN for TCP) arriving on an interface lbctl is attached to (a pod's veth
or an external interface); the node's own sockets are translated at connect
time with a random source port instead (bpf/lbctl_sock.c).

The maps hold only the backends the plan made eligible; why the other
endpoints are not there comes from the agent's `/tracez` (lbctl/agent/http/trace.py)
when it answers.

Exit codes: 0 a backend would get the packet, 1 the command failed, 2 usage,
3 no frontend matches (the packet passes untouched), 4 a frontend matches
but the packet would be dropped or rejected.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lbctl.datapath.ebpf import layout
from lbctl.datapath.ebpf.entries import SCHED_NAMES, describe_flags
from lbctl.datapath.ebpf.settings import SECOND_NS, BpfSettings
from lbctl.datapath.ebpf.trace import masquerade
from lbctl.datapath.ebpf.trace.view import Be, Ct, MapView, Packet, Svc
from lbctl.model import Protocol
from lbctl.plan import scheduling
from lbctl.plan.planner import SCOPE_ALL, SCOPE_EXTERNAL

FORWARD, FAILED, USAGE, PASS, DROP = 0, 1, 2, 3, 4
VERDICT_CODES = {"forward": FORWARD, "pass": PASS, "drop": DROP, "reject": DROP}

_C = layout.const
_SVC_F_EXTERNAL = _C("LB_SVC_F_EXTERNAL")
_SVC_F_LOCAL = _C("LB_SVC_F_LOCAL")
_SVC_F_SOURCE_RANGES = _C("LB_SVC_F_SOURCE_RANGES")
_SVC_F_DROP_EMPTY = _C("LB_SVC_F_DROP_EMPTY")
_CFG_F_DETECTOR = _C("LB_CFG_F_DETECTOR")
_F_SEEN_REPLY = _C("CT_F_SEEN_REPLY")
_F_CLOSING = _C("CT_F_CLOSING")
_F_CLOSED = _C("CT_F_CLOSED")
_MASK32 = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class Knobs:
    """What the programs were compiled with (BpfSettings), as far as a trace needs."""

    tcp_established_s: int
    tcp_syn_s: int
    tcp_closing_s: int
    udp_s: int
    table_size: int
    lc_scan: int
    source: str  # where these came from

    @classmethod
    def defaults(cls, why: str) -> Knobs:
        s = BpfSettings()
        return cls(
            s.ct_tcp_timeout_s,
            s.ct_tcp_syn_timeout_s,
            s.ct_tcp_closing_timeout_s,
            s.ct_udp_timeout_s,
            s.table_size,
            s.lc_scan,
            f"lbctl's defaults ({why})",
        )

    @classmethod
    def from_agent(cls, settings: dict[str, Any]) -> Knobs:
        ct = settings["conntrackTimeoutsSeconds"]
        return cls(
            int(ct["tcpEstablished"]),
            int(ct["tcpSyn"]),
            int(ct["tcpClosing"]),
            int(ct["udp"]),
            int(settings["tableSize"]),
            int(settings["lcScan"]),
            "the agent",
        )

    def lifetime_ns(self, proto: int, flags: int) -> int:
        """ct_lifetime() of bpf/conntrack.h."""
        if proto != Protocol.TCP.number:
            seconds = self.udp_s
        elif flags & _F_CLOSING:
            seconds = self.tcp_closing_s
        elif not flags & _F_SEEN_REPLY:
            seconds = self.tcp_syn_s
        else:
            seconds = self.tcp_established_s
        return seconds * SECOND_NS


# -- the decision ---------------------------------------------------------------------


class _Trace:
    """The steps taken so far and the outcome."""

    def __init__(self, p: Packet) -> None:
        self.packet = p
        self.steps: list[dict[str, str]] = []
        self.doc: dict[str, Any] = {
            "packet": {
                "source": str(p.src),
                "sourcePort": p.sport,
                "destination": str(p.dst),
                "destinationPort": p.dport,
                "protocol": p.protocol.name,
            },
            "verdict": None,
            "reason": "",
            "frontend": None,
            "backends": None,  # the slots of the frontend entry, once the trace reads them
            "choice": None,
            "masquerade": None,
            "notes": [],
        }

    def step(self, name: str, text: str) -> None:
        self.steps.append({"step": name, "result": text})

    def note(self, text: str) -> None:
        self.doc["notes"].append(text)

    def end(self, verdict: str, reason: str) -> dict[str, Any]:
        self.doc["verdict"] = verdict
        self.doc["reason"] = reason
        self.doc["exitCode"] = VERDICT_CODES[verdict]
        self.doc["steps"] = self.steps
        return self.doc


def _frontend_doc(svc: Svc, p: Packet, view: MapView) -> dict[str, Any]:
    return {
        "service": svc.service,
        "portName": svc.port_name,
        "kind": svc.kind,
        "address": str(p.dst),
        "port": p.dport,
        "protocol": p.protocol.name,
        "scope": "external" if svc.scope == SCOPE_EXTERNAL else "all",
        "frontendId": svc.frontend_id,
        "flags": describe_flags(svc.flags),
        "scheduler": SCHED_NAMES.get(svc.sched, str(svc.sched)),
        "affinityTimeoutSeconds": svc.affinity_s,
        "sourceRanges": view.source_ranges(p) if svc.flags & _SVC_F_SOURCE_RANGES else [],
    }


def _slots(view: MapView, svc: Svc) -> list[tuple[int, Be | None]]:
    out = []
    for n in range(1, svc.count + 1):
        ident = view.slot(svc.frontend_id, n)
        out.append((n, view.backend(ident) if ident else None))
    return out


def _table_backend(view: MapView, svc: Svc, i: int, knobs: Knobs) -> tuple[int, str]:
    """lb_table_backend(): the backend id entry i selects, and which entry it is."""
    length = svc.table_len
    if svc.table == 0 or length == 0 or length > knobs.table_size:
        return 0, "the frontend has no table"
    entry = (i & _MASK32) % length
    index = (svc.table - 1) * knobs.table_size + entry
    return view.table_entry(index), f"entry {entry} of its {length}-entry table"


def _schedule(
    t: _Trace, view: MapView, svc: Svc, p: Packet, knobs: Knobs, slots: list[tuple[int, Be | None]]
) -> tuple[Be | None, bool, list[Be]]:
    """lb_schedule() and lb4_select()'s fallback: (backend, deterministic, candidates)."""
    sched = SCHED_NAMES.get(svc.sched, scheduling.RANDOM)
    live = [be for _, be in slots if be is not None]
    slot1 = slots[0][1] if slots else None
    saddr = layout.ip4(p.src)

    def fallback(ident: int, how: str) -> Be | None:
        be = view.backend(ident) if ident else None
        if be is None:
            t.step("scheduler", f"{how} names no live backend: slot 1 instead")
            return slot1
        return be

    if sched == scheduling.RR:
        turn = view.turn(svc.frontend_id)
        n = (turn & _MASK32) % svc.count + 1
        be = fallback(view.slot(svc.frontend_id, n), f"turn {turn} (slot {n})")
        t.step(
            "scheduler",
            f"rr: the frontend's next turn is {turn}: slot {n} of {svc.count} -> {be}; "
            "another new flow of this frontend first would take that turn",
        )
        return be, True, [be] if be else []
    if sched == scheduling.WRR:
        turn = view.turn(svc.frontend_id)
        ident, where = _table_backend(view, svc, turn, knobs)
        be = fallback(ident, where)
        t.step(
            "scheduler",
            f"wrr: the frontend's next turn is {turn}: {where} -> {be}; "
            "another new flow of this frontend first would take that turn",
        )
        return be, True, [be] if be else []
    if sched == scheduling.MAGLEV:
        if p.sport is None:
            t.step(
                "scheduler",
                "maglev: hashes the source port too, which was not given: one of the "
                f"{len(live)} backends, the same one for every packet of the flow",
            )
            return None, False, live
        h = scheduling.flow_hash(
            saddr,
            layout.ip4(p.dst),
            layout.port(p.sport),
            layout.port(p.dport),
            p.protocol.number,
        )
        ident, where = _table_backend(view, svc, h, knobs)
        be = fallback(ident, where)
        t.step("scheduler", f"maglev: hash of the 5-tuple {h:#010x} -> {where} -> {be}")
        return be, True, [be] if be else []
    if sched == scheduling.SH:
        h = scheduling.source_hash(saddr)
        ident, where = _table_backend(view, svc, h, knobs)
        be = fallback(ident, where)
        t.step("scheduler", f"sh: hash of the source address {h:#010x} -> {where} -> {be}")
        return be, True, [be] if be else []
    if sched == scheduling.LC:
        opened = {be.ident: view.open_flows(be.ident) for be in live}
        t.doc["openFlows"] = {str(be): opened[be.ident] for be in live}
        least = min(opened.values(), default=0)
        best = [be for be in live if opened[be.ident] == least]
        if svc.count > knobs.lc_scan:
            t.step(
                "scheduler",
                f"lc: the least loaded of {knobs.lc_scan} slots from a random one "
                f"(of {svc.count}); open flows: "
                + ", ".join(f"{be} {opened[be.ident]}" for be in live),
            )
            return None, False, live
        chosen = best[0] if len(best) == 1 else None
        t.step(
            "scheduler",
            f"lc: the backend with the fewest open flows ({least}): "
            + (str(chosen) if chosen else f"one of {len(best)} tied, from a random slot on")
            + "; open flows: "
            + ", ".join(f"{be} {opened[be.ident]}" for be in live),
        )
        return chosen, chosen is not None, best
    t.step("scheduler", f"random: one of the {svc.count} slots, each as likely")
    return None, False, live


def trace(view: MapView, p: Packet, now_ns: int, knobs: Knobs) -> dict[str, Any]:
    """What flow4_decide() and flow4_new() do with the first packet of flow p."""
    t = _Trace(p)
    proto = p.protocol.number
    cfg = view.config()
    if cfg is None:
        t.note("lb4_config is empty: the agent has not configured this node yet")

    # 1. conntrack
    if p.sport is None:
        t.step(
            "conntrack",
            "not looked up (no source port given): a new flow from a fresh port is assumed",
        )
    else:
        ct = view.conntrack(p)
        if ct is None:
            t.step("conntrack", "no entry for this tuple: a new flow")
        else:
            followed = _follow(t, view, p, ct, now_ns, knobs, proto)
            if followed is not None:
                return followed

    # 2. the frontend
    svc = view.service(p, SCOPE_ALL)
    if svc is None:
        t.step("frontend", f"no frontend at {p.dst}:{p.dport}/{p.protocol.name}")
        if p.sport is not None:
            _direct(t, view, p, now_ns, knobs)
        return t.end("pass", "no Service frontend matches: the packet passes untouched")
    t.doc["frontend"] = _frontend_doc(svc, p, view)
    t.step(
        "frontend",
        f"{svc.kind} {p.dst}:{p.dport}/{p.protocol.name} of Service {svc.service}"
        + (f" (port {svc.port_name})" if svc.port_name else ""),
    )

    # 3. source ranges
    if svc.flags & _SVC_F_SOURCE_RANGES:
        ranges = ", ".join(view.source_ranges(p)) or "none"
        if not view.source_allowed(p):
            t.step("source ranges", f"{p.src} is in none of {ranges}: dropped")
            return t.end("drop", f"{p.src} is outside the loadBalancerSourceRanges ({ranges})")
        t.step("source ranges", f"{p.src} is in {ranges}: allowed")

    detector = cfg is not None and bool(cfg.flags & _CFG_F_DETECTOR)
    internal = detector and view.in_cluster_cidrs(p.src)
    net = masquerade.pod_network(cfg)
    if svc.flags & _SVC_F_EXTERNAL and svc.flags & _SVC_F_LOCAL:
        if internal:
            t.step(
                "traffic policy",
                f"{p.src} is in {net}: a pod uses every endpoint, as under "
                "externalTrafficPolicy Cluster",
            )
        else:
            why = f"outside {net}" if detector else "not told apart (no cluster CIDRs)"
            external = view.service(p, SCOPE_EXTERNAL)
            if external is None:
                t.step("traffic policy", f"{p.src} is {why}, and no external-scope entry exists")
                return t.end("pass", "the frontend's external-scope entry is missing")
            t.step(
                "traffic policy",
                f"{p.src} is {why}: externalTrafficPolicy Local, this node's endpoints only",
            )
            svc = external
            t.doc["frontend"] = _frontend_doc(svc, p, view)

    slots = _slots(view, svc)
    t.doc["backends"] = [
        {"slot": n, **be.describe()} if be else {"slot": n, "missing": True} for n, be in slots
    ]

    # 4. ClientIP affinity
    if svc.affinity_s:
        entry = view.affinity(svc.frontend_id, p.src)
        if entry is None:
            t.step("affinity", f"ClientIP, {svc.affinity_s} s: no entry for {p.src} yet")
        else:
            last_seen, ident = entry
            idle = _age_ns(now_ns, last_seen) / SECOND_NS
            be = view.backend(ident)
            if idle > svc.affinity_s:
                t.step(
                    "affinity",
                    f"{p.src}'s entry (backend {be or ident}) expired: idle {idle:.0f} s "
                    f"> {svc.affinity_s} s",
                )
            elif not view.member(svc.frontend_id, ident) or be is None:
                t.step("affinity", f"{p.src}'s backend (id {ident}) left the frontend")
            else:
                t.step(
                    "affinity",
                    f"{p.src} goes to {be}, idle {idle:.0f} s of {svc.affinity_s} s",
                )
                t.doc["choice"] = {
                    "by": "affinity",
                    "backend": be.describe(),
                    "deterministic": True,
                    "candidates": [be.describe()],
                }
                masquerade.record(t, svc, cfg, internal, [be], p)
                return t.end("forward", f"ClientIP affinity: to {be}")

    # 5. the scheduler, 6. no backend
    if svc.count == 0 or not slots:
        return _empty(t, svc, p)
    be, deterministic, candidates = _schedule(t, view, svc, p, knobs, slots)
    if svc.affinity_s:
        t.note("the choice becomes the client's affinity entry for later flows")
    if be is None and not candidates:
        return _empty(t, svc, p)
    t.doc["choice"] = {
        "by": "scheduler",
        "scheduler": SCHED_NAMES.get(svc.sched, str(svc.sched)),
        "backend": be.describe() if be and deterministic else None,
        "deterministic": deterministic and be is not None,
        "candidates": [c.describe() for c in candidates],
    }
    if be is not None and deterministic:
        masquerade.record(t, svc, cfg, internal, [be], p)
        return t.end("forward", f"{t.doc['choice']['scheduler']}: to {be}")
    masquerade.record(t, svc, cfg, internal, candidates, p)
    return t.end(
        "forward",
        f"{t.doc['choice']['scheduler']}: to one of {', '.join(str(c) for c in candidates)}",
    )


def _empty(t: _Trace, svc: Svc, p: Packet) -> dict[str, Any]:
    if svc.flags & _SVC_F_DROP_EMPTY:
        t.step("backends", "none on this node, some elsewhere: new flows are dropped")
        return t.end("drop", "no backend on this node (its endpoints are on other nodes)")
    t.step(
        "backends",
        "none: "
        + ("a TCP reset" if p.protocol is Protocol.TCP else "an ICMP port unreachable")
        + " rejects the flow",
    )
    return t.end("reject", "the Service has no eligible backend")


def _age_ns(now_ns: int, then_ns: int) -> int:
    """The programs' age_ns: a stamp later than the clock read (another CPU's) is age 0."""
    return max(0, now_ns - then_ns)


def _direct(t: _Trace, view: MapView, p: Packet, now_ns: int, knobs: Knobs) -> None:
    """flow4_direct() of bpf/flow.h: does this packet, straight to a backend, take
    over the reply tuple of a balanced flow of the same client port?"""
    held = view.reply_holder(p)
    if held is None:
        return
    vip, vport = held
    fwd = view.conntrack(Packet(p.src, p.sport, vip, vport, p.protocol))
    flow = f"the balanced flow {p.src}:{p.sport} -> {vip}:{vport}"
    alive = (
        fwd is not None
        and fwd.snat_addr is None
        and (fwd.nat_addr, fwd.nat_port) == (p.dst, p.dport)
        and _age_ns(now_ns, fwd.last_seen_ns) <= knobs.lifetime_ns(p.protocol.number, fwd.flags)
    )
    if not alive:
        t.step("reply tuple", f"a leftover reverse entry of {flow}: removed, the replies stay")
    elif p.protocol is Protocol.TCP and not (fwd is not None and fwd.flags & _F_CLOSING):
        t.step(
            "reply tuple",
            f"held by {flow}, still open: it keeps it (the backend answers that connection, "
            "not this SYN)",
        )
    else:
        t.step(
            "reply tuple",
            f"held by {flow}"
            + (", closing" if p.protocol is Protocol.TCP else "")
            + ": this flow takes it over, its replies stay untouched",
        )


def _follow(
    t: _Trace, view: MapView, p: Packet, ct: Ct, now_ns: int, knobs: Knobs, proto: int
) -> dict[str, Any] | None:
    """A live conntrack entry whose backend is still a member keeps the flow there."""
    idle = _age_ns(now_ns, ct.last_seen_ns) / SECOND_NS
    lifetime = knobs.lifetime_ns(proto, ct.flags)
    target = f"{ct.nat_addr}:{ct.nat_port}"
    if _age_ns(now_ns, ct.last_seen_ns) > lifetime:
        t.step(
            "conntrack",
            f"an entry to {target} expired (idle {idle:.0f} s > {lifetime // SECOND_NS} s): "
            "a new flow",
        )
        return None
    be = view.backend(ct.backend_id)
    member = (
        view.member(ct.frontend_id, ct.backend_id)
        and be is not None
        and (be.address, be.port) == (ct.nat_addr, ct.nat_port)
    )
    held = True
    if ct.snat_addr is not None and ct.flags & _F_CLOSED == _F_CLOSED:
        nat = view.nat_client(ct, proto)
        held = nat == (str(p.src), p.sport, str(p.dst), p.dport)
    if p.protocol is Protocol.TCP:
        t.note(f"packets of an established connection on this tuple (not a SYN) go to {target}")
    if not member:
        t.step("conntrack", f"a live entry to {target}, whose backend left the service: a new flow")
        return None
    if not held:
        t.step("conntrack", f"a closed flow to {target} whose NAT port went to another flow")
        return None
    what = "a SYN restarts on" if p.protocol is Protocol.TCP else "the flow follows"
    t.step("conntrack", f"a live entry (idle {idle:.0f} s): {what} {target}")
    svc = view.service(p, SCOPE_ALL)
    if svc is not None:
        if svc.frontend_id != ct.frontend_id:
            svc = view.service(p, SCOPE_EXTERNAL) or svc
        t.doc["frontend"] = _frontend_doc(svc, p, view)
        t.doc["backends"] = [
            {"slot": n, **b.describe()} if b else {"slot": n, "missing": True}
            for n, b in _slots(view, svc)
        ]
    assert be is not None
    t.doc["choice"] = {
        "by": "conntrack",
        "backend": be.describe(),
        "deterministic": True,
        "candidates": [be.describe()],
    }
    t.doc["masquerade"] = {
        "applies": ct.snat_addr is not None,
        "address": f"{ct.snat_addr}:{ct.snat_port}" if ct.snat_addr else None,
        "why": "as the flow was when it started",
    }
    if masquerade.on_this_node(be):
        t.note(
            f"{be} is an address of this node: the flow's replies leave through the tc "
            "egress hook (lbctl_tc_egress), which gives them the Service's address back"
        )
    return t.end("forward", f"an existing flow: to {be}")
