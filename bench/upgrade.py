"""Upgrades in place: what they cost and what they keep, `make bench-upgrade`.

Two parts, both written to bench/results/upgrade.{json,txt}:

1. Maps (no traffic).  A datapath is compiled with the default capacities
   and its conntrack and NAT tables filled with N synthetic flows (10,000,
   100,000 and 250,000 conntrack entries, half as many NAT entries); then a
   second datapath starts with both capacities doubled, so both maps are
   copied into new ones.  Reported: the upgrade's own time (planning, copy,
   deltas, swap, commit; the BPF compile is not part of it) and entries per
   second.  A layout change converts every entry field by field in Python:
   its cost is measured on the same N by copying a conntrack map of layout 1
   into one whose ct4_entry has a field added in front (all fields move).

2. Flows (real agents, real packets; the world of tests/extlab.py).  The
   previous release (6e1a90b, from git) starts and FLOWS established flows
   are opened through the NodePort and the ClusterIP (TCP and UDP, from
   outside, masqueraded, and from a pod); a client opens new TCP
   connections to the NodePort all along.  Then one agent replaces the other:
   this version on the previous release's maps, a capacity change, a layout
   change (this version with a changed lbctl.h) and back.  Reported for each:
   established flows kept (same pod, same peer address: the NAT entry
   survived), new connections that failed while the agents were replaced,
   and the upgrade's own time from the agent's log.

Everything runs in network namespaces and bpffs directories this script
creates and removes.  The machine is shared: read the times as orders of
magnitude; the flow counts are exact.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.datapath.ebpf.settings import BpfSettings
from lbctl.datapath.ebpf.upgrade import convert, migrate, rawmap, record
from lbctl.datapath.ebpf.upgrade.mapspec import MapSpec
from lbctl.datapath.ebpf.upgrade.structs import Layout
from tests.netlab import Lab, RequestError, tcp_request
from tests.upgradelab import (
    BASE,
    NODE_IP,
    NODE_PORT,
    Flows,
    Node,
    next_layout_tree,
    previous_tree,
)

RESULTS = Path(__file__).resolve().parent / "results"
BPFFS = Path("/sys/fs/bpf")
DONE = re.compile(r"hooks swapped; done in ([0-9.]+) s")


# -- part 1: maps ------------------------------------------------------------------


def _fill(pin_dir: Path, flows: int) -> None:
    """`flows` conntrack entries (forward) and half as many NAT entries, as bytes."""
    lay = Layout.current()
    now = time.monotonic_ns()
    ct = rawmap.RawMap.open(str(pin_dir / "ct4"))
    nat = rawmap.RawMap.open(str(pin_dir / "nat4"))
    try:
        for start in range(0, flows, 4096):
            batch, nats = [], []
            for i in range(start, min(start + 4096, flows)):
                key: Any = lay.ffi.new("struct ct4_key *")
                key.saddr, key.daddr, key.sport, key.proto = i, 0x0A600001, i & 0xFFFF, 6
                entry: Any = lay.ffi.new("struct ct4_entry *")
                entry.created_ns = entry.last_seen_ns = now
                entry.nat_addr, entry.nat_port, entry.backend_id, entry.frontend_id = 7, 8080, 1, 1
                batch.append((bytes(lay.ffi.buffer(key)), bytes(lay.ffi.buffer(entry))))
                if i % 2 == 0:
                    back: Any = lay.ffi.new("struct nat4_entry *")
                    back.created_ns, back.client_addr = now, i
                    nats.append((batch[-1][0], bytes(lay.ffi.buffer(back))))
            assert ct.write(batch) == [] and nat.write(nats) == []
    finally:
        ct.close()
        nat.close()


def bench_maps(sizes: list[int]) -> list[dict[str, Any]]:
    out = []
    base = BpfSettings()
    for n in sizes:
        pin_dir = BPFFS / f"lbctl-bench-upgrade-{os.getpid()}"
        try:
            BpfDatapath(dataclasses.replace(base, pin_dir=pin_dir)).close()
            _fill(pin_dir, n)
            bigger = dataclasses.replace(
                base, pin_dir=pin_dir, ct_size=base.ct_size * 2, nat_size=base.nat_size * 2
            )
            dp = BpfDatapath(bigger)
            report = dp.upgrade_report
            dp.close()
            assert report is not None and report.action == "migrated", report
            written = {m["name"]: m["written"] for m in report.maps}
            assert written == {"ct4": n, "nat4": (n + 1) // 2}, written
            convert_s = _convert(n)
            out.append(
                {
                    "conntrack": n,
                    "nat": (n + 1) // 2,
                    "upgradeSeconds": round(report.seconds, 3),
                    "entriesPerSecond": round((n + (n + 1) // 2) / report.seconds),
                    "layoutChangeSeconds": round(convert_s, 3),
                    "layoutChangeEntriesPerSecond": round(n / convert_s),
                }
            )
            print(out[-1], flush=True)
        finally:
            shutil.rmtree(pin_dir, ignore_errors=True)
    return out


def _convert(n: int) -> float:
    """Seconds to copy n conntrack entries of layout 1 into a layout with a field added
    in front of struct ct4_entry (every field moves): the per-entry conversion."""
    old = record.layout_1()
    header = old.header.replace("struct ct4_entry {", "struct ct4_entry {\n\t__u64 zone;")
    new = Layout("bench", header, old.declarations_text)
    key, old_value = old.describe("struct ct4_key"), old.describe("struct ct4_entry")
    new_value = new.describe("struct ct4_entry")
    size = 1 << max(n - 1, 1).bit_length()
    src = rawmap.RawMap(rawmap.create("hash", "src", key.size, old_value.size, size), "src")
    dst = rawmap.RawMap(rawmap.create("hash", "dst", key.size, new_value.size, size), "dst")
    try:
        entry = bytes(old_value.size)
        for start in range(0, n, 4096):
            keys = range(start, min(start + 4096, n))
            assert src.write([(struct.pack("=I12x", i), entry) for i in keys]) == []
        spec = MapSpec("ct4", "hash", key, new_value, size, 0, str(size))
        move = migrate.MapMove(spec, dst)
        source = migrate.Source(src, convert.plan(key, key), convert.plan(old_value, new_value))
        started = time.monotonic()
        counts = move.copy(source, fresh=True, prefer_source=False)
        took = time.monotonic() - started
        assert counts.written == n, counts
        return took
    finally:
        src.close()
        dst.close()


# -- part 2: flows -----------------------------------------------------------------


class NewConnections:
    """New TCP connections to the NodePort, one after another, until stopped."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.results: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                tcp_request(self.node.world.client, NODE_IP, NODE_PORT, timeout=1.0)
                ok = True
            except RequestError:
                ok = False
            self.results.append((time.monotonic(), ok))
            time.sleep(0.01)

    def between(self, start: float, end: float) -> tuple[int, int]:
        window = [ok for at, ok in self.results if start <= at <= end]
        return len(window), window.count(False)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def bench_flows(flows_per_kind: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lbctl-bench-")))
        pin_dir = BPFFS / f"lbctl-bench-upgrade-{os.getpid()}"
        stack.callback(shutil.rmtree, pin_dir, True)
        lab = stack.enter_context(Lab())
        node = Node(lab, tmp, pin_dir)
        stack.callback(node.stop_all)
        previous = stack.enter_context(previous_tree(tmp))
        upcoming = stack.enter_context(next_layout_tree(tmp))
        node.start(BASE, tree=previous)
        flows = Flows(node.world, nodeport=flows_per_kind, clusterip=flows_per_kind // 2)
        stack.callback(flows.close)
        newer = NewConnections(node)
        stack.callback(newer.stop)
        steps: list[tuple[str, dict[str, Any], Path | None]] = [
            ("previous release (6e1a90b, layout 1) -> this version", BASE, None),
            ("capacity: --conntrack-size and --nat-size doubled", _doubled(), None),
            ("layout change: ct4_entry, nat4_entry, lb_service", _doubled(), upcoming),
            ("layout change back", _doubled(), None),
        ]
        for what, sizes, tree in steps:
            time.sleep(1.0)  # new connections before the change
            started = time.monotonic()
            node.agents[-1].terminate()
            agent = node.start(sizes, tree=tree)
            ended = time.monotonic()
            time.sleep(1.0)
            lost = flows.lost(what)
            tried, failed = newer.between(started, ended + 1.0)
            done = DONE.search(agent.log_text())
            rows.append(
                {
                    "upgrade": what,
                    "flows": len(flows.flows),
                    "flowsKept": len(flows.flows) - len(lost),
                    "lost": lost[:5],
                    "newConnections": tried,
                    "newConnectionsFailed": failed,
                    "upgradeSeconds": float(done.group(1)) if done else None,
                    "agentsReplacedSeconds": round(ended - started, 2),
                }
            )
            print(rows[-1], flush=True)
    return rows


def _doubled() -> dict[str, Any]:
    return {**BASE, "--conntrack-size": int(BASE["--conntrack-size"]) * 2,
            "--nat-size": int(BASE["--nat-size"]) * 2}  # fmt: skip


def render(result: dict[str, Any]) -> str:
    lines = [f"machine: {result['machine']}", "", "maps (no traffic):"]
    lines.append(
        f"  {'conntrack':>10} {'nat':>8} {'upgrade s':>10} {'entries/s':>10} "
        f"{'layout change s':>16} {'entries/s':>10}"
    )
    for m in result["maps"]:
        lines.append(
            f"  {m['conntrack']:>10} {m['nat']:>8} {m['upgradeSeconds']:>10} "
            f"{m['entriesPerSecond']:>10} {m['layoutChangeSeconds']:>16} "
            f"{m['layoutChangeEntriesPerSecond']:>10}"
        )
    lines += ["", "flows (real agents, traffic):"]
    for f in result["flows"]:
        lines.append(
            f"  {f['upgrade']}: {f['flowsKept']}/{f['flows']} established flows kept; "
            f"{f['newConnectionsFailed']}/{f['newConnections']} new connections failed while "
            f"the agents were replaced ({f['agentsReplacedSeconds']} s); "
            + (
                f"upgrade {f['upgradeSeconds']} s"
                if f["upgradeSeconds"] is not None
                else "the maps were adopted as they were (same layout and capacities)"
            )
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,250000")
    parser.add_argument("--flows", type=int, default=40, help="flows per kind through the NodePort")
    args = parser.parse_args()
    result = {
        "machine": machine(),
        "maps": bench_maps([int(n) for n in args.sizes.split(",")]),
        "flows": bench_flows(args.flows),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "upgrade.json").write_text(json.dumps(result, indent=1) + "\n")
    text = render(result)
    (RESULTS / "upgrade.txt").write_text(text)
    sys.stdout.write(text)
    return 0 if all(f["flowsKept"] == f["flows"] for f in result["flows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
