"""The data-plane benchmark's smoke run: N=100, one repetition, short runs.

It proves `make bench-dataplane` still works end to end (topologies, nginx and
the load generator, the kube-proxy rule sets, both lbctl agents, the report,
JSON and chart), and that every variant really balanced the traffic: both
backends answered through the VIP or NodePort, which only the variant under
test can translate, with no error, and lbctl's XDP variant was served by XDP.
No figure is judged here: performance is `make bench`'s business.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PODS = {"10.244.0.20", "10.244.0.21"}


def test_smoke_run_balances_every_variant_and_writes_its_results(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "dataplane.py"),
            "--sizes",
            "100",
            "--repetitions",
            "1",
            "--seconds",
            "0.3",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "## 100 services" in done.stdout and "x base" in done.stdout
    # the verdict on the targets: one row per lbctl variant and scenario it serves
    verdicts = done.stdout.split("## targets", 1)[1].splitlines()[2:5]
    assert [row.split()[:3] for row in verdicts] == [
        ["100", "clusterip", "lbctl-tc"],
        ["100", "nodeport", "lbctl-tc"],
        ["100", "nodeport", "lbctl-xdp"],
    ], verdicts
    assert (tmp_path / "dataplane.txt").read_text() in done.stdout  # the printed report, kept
    results = json.loads((tmp_path / "dataplane.json").read_text())
    table = results["sizes"]["100"]
    for scenario, variants in [
        ("clusterip", {"baseline", "iptables", "nftables", "lbctl-tc"}),
        ("nodeport", {"baseline", "iptables", "nftables", "lbctl-tc", "lbctl-xdp"}),
    ]:
        for metric in ("crr", "rr", "udp"):
            got = table[scenario][metric]
            assert set(got) == variants, (scenario, metric)
            for variant, figures in got.items():
                where = f"{scenario}/{metric}/{variant}"
                assert figures["errors"] == 0, where
                assert figures["ok"] > 0 and figures["rate"] > 0, where
                assert set(figures["replies"]) == PODS, where
                assert min(figures["replies"].values()) > 0, where
                assert figures["latency_p99_us"] >= figures["latency_p50_us"] > 0, where
                if metric == "crr":  # connect time: the SYN's round trip through the node
                    assert figures["connect_p99_us"] >= figures["connect_p50_us"] > 0, where
    counters = results["lbctl_counters"]["100"]
    assert counters["lbctl-tc"]["new_flows"] > 0
    assert counters["lbctl-tc"]["xdp_redirected"] == 0
    assert counters["lbctl-xdp"]["xdp_redirected"] > 0  # NodePort went through XDP
    assert counters["lbctl-tc"]["nat_exhausted"] == 0
    # the agents' own CPU while traffic ran: recorded, and no busy loop
    agent_cpu = results["agent_cpu"]["100"]
    assert set(agent_cpu) == {"lbctl-tc", "lbctl-xdp"}
    assert all(0 <= share < 0.5 for share in agent_cpu.values()), agent_cpu
    png = (tmp_path / "dataplane.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
