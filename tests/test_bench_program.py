"""The program-cost benchmark's smoke run: two small N, few runs, end to end.

It proves `make bench-program` still works (compiles, programs N services,
times every path, writes its report, JSON and text) and, independently of the
benchmark's own checks, that every path took the path its name says: the
verdicts and the lb_stats counters the benchmark recorded must be exactly
those this test expects of that path, once per frame.  No figure is judged:
speed is `make bench`'s business.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES, REPETITIONS, RUNS = (100, 200), 2, 40

TC_ACT_OK, TC_ACT_REDIRECT = 0, 7
XDP_PASS, XDP_REDIRECT = 2, 4
FORWARD = {"redirected": 1}

# path: (verdict of every run, counters that move per frame; nothing else may move)
EXPECTED: dict[str, tuple[int, dict[str, int]]] = {
    "empty-tc": (TC_ACT_OK, {}),
    "no-service": (TC_ACT_OK, {"passed": 1}),
    "clusterip-established": (TC_ACT_REDIRECT, {"established": 1, **FORWARD}),
    "clusterip-established-spread": (TC_ACT_REDIRECT, {"established": 1, **FORWARD}),
    "clusterip-established-many": (TC_ACT_REDIRECT, {"established": 1, **FORWARD}),
    "clusterip-reply": (TC_ACT_REDIRECT, {"reverse_nat": 1, **FORWARD}),
    "clusterip-new": (TC_ACT_REDIRECT, {"new_flows": 1, **FORWARD}),
    "nodeport-new": (TC_ACT_REDIRECT, {"new_flows": 1, "snat_new": 1, **FORWARD}),
    "nodeport-established": (TC_ACT_REDIRECT, {"established": 1, **FORWARD}),
    "nodeport-reply": (TC_ACT_REDIRECT, {"snat_reverse": 1, **FORWARD}),
    "empty-xdp": (XDP_PASS, {}),
    "xdp-no-service": (XDP_PASS, {"xdp_passed": 1}),
    "xdp-nodeport-new": (
        XDP_REDIRECT,
        {"new_flows": 1, "snat_new": 1, "xdp_redirected": 1},
    ),
    "xdp-nodeport-established": (XDP_REDIRECT, {"established": 1, "xdp_redirected": 1}),
    "egress-forwarded": (TC_ACT_OK, {}),
    "egress-own-traffic": (TC_ACT_OK, {}),
    "egress-reply": (TC_ACT_OK, {"reverse_nat": 1, "egress_reverse_nat": 1}),
    **{
        f"sched-{name}": (TC_ACT_REDIRECT, {"new_flows": 1, **FORWARD})
        for name in ("random-10", "maglev-10", "sh-10", "rr-10", "lc-10", "lc-100", "lc-1000")
    },
    "sched-affinity-hit-10": (
        TC_ACT_REDIRECT,
        {"new_flows": 1, "affinity_followed": 1, **FORWARD},
    ),
}


def test_smoke_run_times_every_path_and_each_took_its_path(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "program.py"),
            "--sizes",
            ",".join(map(str, SIZES)),
            "--repetitions",
            str(REPETITIONS),
            "--runs",
            str(RUNS),
            "--repeat",
            "1000",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "## program cost per packet" in done.stdout and "## method check" in done.stdout
    assert (tmp_path / "program.txt").read_text().startswith("machine: ")
    results = json.loads((tmp_path / "program.json").read_text())
    assert set(results["paths"]) == set(EXPECTED)
    assert set(results["sizes"]) == {str(n) for n in SIZES}
    runs = REPETITIONS * RUNS
    for size in SIZES:
        per = results["sizes"][str(size)]
        assert set(per) == set(EXPECTED)
        for path, (verdict, counters) in EXPECTED.items():
            fig, where = per[path], f"{path} at {size}"
            assert fig["runs"] == runs, where
            assert fig["verdicts"] == {str(verdict): runs}, where
            assert fig["counters"] == {k: v * runs for k, v in counters.items()}, where
            assert len(fig["batch_medians_ns"]) == REPETITIONS, where
            assert fig["ns"] > 0 and fig["p90_ns"] >= fig["p10_ns"] > 0, where
            if not path.startswith("empty-"):
                assert fig["x_no_service"] is not None, where
        for path in ("empty-tc", "no-service", "empty-xdp", "xdp-no-service"):
            assert per[path]["repeat_ns"] > 0, path
    # every path's cost at the larger N is set against the smaller's
    assert set(results["flatness"]) == {p for p in EXPECTED if not p.startswith("empty-")}
    for path, against in results["flatness"].items():
        assert set(against) == {str(SIZES[1])}, path
    # the evidence for timing once per run: repeat re-runs a NAT path on its own output
    trap = results["method_check"]["counters"]
    assert trap.get("established", 0) + trap.get("passed", 0) == 1000
    # the event sites against the same program with them compiled out, at the smaller N
    # (each batch checked its verdicts and counters; drop and reject paths included)
    assert "## event sites, nobody listening" in done.stdout
    off = results["events_off"]
    assert set(off["paths"]) >= {"clusterip-new", "nodeport-new", "reject", "xdp-drop-source-range"}
    for path, fig in off["paths"].items():
        assert len(fig["events_batches_ns"]) == len(fig["baseline_batches_ns"]) == REPETITIONS
        both = zip(fig["events_batches_ns"], fig["baseline_batches_ns"], strict=True)
        paired = [e / b for e, b in both]
        assert fig["ratio"] == statistics.median(paired), path
    assert off["worst_site_ratio"] == max(
        f["ratio"] for f in off["paths"].values() if not f["what"].startswith("control")
    )
