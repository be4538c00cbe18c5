"""What the event sites (`lbctl monitor`) cost when nobody listens: part of `make bench-program`.

Issue 21: with no monitor running, an event site must cost one map read
(lb_monitor) and produce nothing, within 2% of the per-packet cost without
it.  bench/program.py compiles a second datapath at its smallest N with the
event sites compiled out (BpfSettings.events=False: lb_watched() is a
constant 0, so the compiler drops the lookup and the event code) and
programs it identically.  Here both run the same paths, alternating
batch by batch (the order rotating per repetition), through
bench/program.py's `batch`, which checks every run's verdict, counters and
translated frame:

- paths that cross an event site: a new ClusterIP flow (one site), a new
  masqueraded NodePort flow (the new-flow and NAT events: one lookup), a
  rejected flow (a Service without endpoints), the XDP drop of a source
  outside loadBalancerSourceRanges;
- paths that cross none, as controls: established flows and replies (tc),
  a new NodePort flow through XDP.

A path's time is the median over repetitions of each batch's median (raw
ns: the whole BPF_PROG_TEST_RUN run, as bench/program.py's raw column).
Its ratio is with events / without, so 1.02 is the goal's limit: the
median over repetitions of the ratio of the two batches, which ran back to
back (a shared machine has slower and faster phases that the two sides'
separate medians would catch unevenly); the fastest batches' ratio is shown
too.  The kernel's clock steps by about 10 ns, so on the cheapest path (an
XDP drop, about 360 ns) one step is 3%.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import statistics
from collections.abc import Callable
from typing import Any

REJECT_VIP = "10.99.2.1"  # a ClusterIP without endpoints
RANGED_LB = "203.0.113.9"  # a LoadBalancer IP open to 192.0.2.128/25 only
REJECT_VERDICT = 7  # TC_ACT_REDIRECT: the reset goes back out of the interface
XDP_DROP = 1

COMPARED = {
    "clusterip-new": "event site: new flow",
    "nodeport-new": "event sites: new flow + NAT port (one lookup)",
    "reject": "event site: reject (no endpoints)",
    "xdp-drop-source-range": "event site: XDP drop (source range)",
    "clusterip-established": "control, no site: established",
    "clusterip-reply": "control, no site: reply",
    "nodeport-established": "control, no site: NodePort established",
    "xdp-nodeport-new": "control, no site: XDP new flow",
}


def compare(
    with_events: Any,
    without: Any,
    batch: Callable[[Any, Any], dict[str, Any]],
    repetitions: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Each compared path on both targets, alternating; medians and ratios."""
    got: dict[str, dict[str, list[float]]] = {p: {"events": [], "baseline": []} for p in COMPARED}
    pairs = [("events", with_events), ("baseline", without)]
    paths = list(COMPARED)
    for rep in range(repetitions):
        shift = rep % len(paths)
        for path in paths[shift:] + paths[:shift]:
            for label, target in pairs if rep % 2 == 0 else pairs[::-1]:
                got[path][label].append(batch(target, target.cases[path])["median_ns"])
        log(f"monitor-off comparison: repetition {rep + 1}/{repetitions}")
    out: dict[str, Any] = {}
    for path, both in got.items():
        ev, base = statistics.median(both["events"]), statistics.median(both["baseline"])
        # the two batches of a repetition run back to back: their ratio cancels the
        # machine's slower and faster phases, which the medians of each side do not
        paired = [e / b for e, b in zip(both["events"], both["baseline"], strict=True)]
        out[path] = {
            "what": COMPARED[path],
            "events_ns": ev,
            "baseline_ns": base,
            "ratio": statistics.median(paired),
            "paired_ratios": paired,
            "ratio_of_medians": ev / base,
            "ratio_of_minimums": min(both["events"]) / min(both["baseline"]),
            "events_batches_ns": both["events"],
            "baseline_batches_ns": both["baseline"],
        }
    sited = [v["ratio"] for p, v in out.items() if not COMPARED[p].startswith("control")]
    return {"paths": out, "worst_site_ratio": max(sited), "repetitions": repetitions}


def report(result: dict[str, Any], size: int) -> list[str]:
    lines = [
        f"## event sites, nobody listening (N={size:,}): with events / compiled out",
        f"{'path':<24} {'events':>7} {'baseline':>8} {'ratio':>6} {'fastest':>7}  what",
    ]
    for path, v in result["paths"].items():
        lines.append(
            f"{path:<24} {v['events_ns']:7.0f} {v['baseline_ns']:8.0f} {v['ratio']:6.3f} "
            f"{v['ratio_of_minimums']:7.3f}  {v['what']}"
        )
    lines.append(
        f"worst ratio on a path with an event site: {result['worst_site_ratio']:.3f} "
        "(goal: at most 1.02)"
    )
    lines.append(
        "(events, baseline: raw ns, median of the repetitions' batch medians; ratio: median "
        "over the repetitions of events / baseline, the two batches back to back; fastest: "
        f"the fastest batches' ratio; {result['repetitions']} repetitions)"
    )
    return lines


def add_cases(target: Any, fib: Any, runs: int, program: Any) -> None:
    """The drop and reject paths (bench/program.py has none): a ClusterIP
    without endpoints, and a LoadBalancer IP open to one source range only."""
    p = program
    rejecting = p.service("no-endpoints", REJECT_VIP, 80, [])
    ranged = p.service("ranged", RANGED_LB, 80, list(p.SERVICE_BACKENDS), kind="LoadBalancer")
    ranged = dataclasses.replace(ranged, source_ranges=(ipaddress.ip_network("192.0.2.128/25"),))
    errors = target.dp.reconcile(
        {**p.services(target.size), **{fe.key: fe for fe in [rejecting, ranged]}}
    )
    if errors:
        raise RuntimeError(f"programming the monitor-cost services failed: {errors[:3]}")
    target.cases["reject"] = p.Case(
        "reject", "tc", target.dp.prog_fd, p.syns(p.CLIENT, REJECT_VIP, 80, runs), fib.out0,
        REJECT_VERDICT, {"rejected_no_backend": 1},
    )  # fmt: skip
    target.cases["xdp-drop-source-range"] = p.Case(
        "xdp-drop-source-range", "xdp", target.dp.prog_fds["lbctl_xdp"],
        p.syns(p.OUTSIDE, RANGED_LB, 80, runs), fib.in0, XDP_DROP, {"drop_source_range": 1},
    )  # fmt: skip
