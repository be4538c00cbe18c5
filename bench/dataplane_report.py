"""The data-plane benchmark's figures: medians, the table, the verdict on the
targets and the chart (bench/dataplane.py measures; this only reads results)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

VARIANTS = ["baseline", "iptables", "nftables", "lbctl-tc", "lbctl-xdp"]
SCENARIOS = {"clusterip": "ClusterIP from a pod", "nodeport": "NodePort from outside"}
METRICS = {"crr": "new connections", "rr": "requests, established", "udp": "UDP request/reply"}

FIGURES = ["rate", "connect_p50_us", "connect_p99_us", "latency_p50_us", "latency_p99_us"]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the runs' figures; errors, stalls and replies per backend summed."""
    out: dict[str, Any] = {name: statistics.median(run[name] for run in runs) for name in FIGURES}
    out["errors"] = sum(run["errors"] for run in runs)
    out["stalls"] = sum(run["stalls"] for run in runs)
    out["ok"] = sum(run["ok"] for run in runs)
    replies: dict[str, int] = {}
    for run in runs:
        for tag, count in run["replies"].items():
            replies[tag] = replies.get(tag, 0) + count
    out["replies"] = replies
    out["runs"] = len(runs)
    out["rate_runs"] = [run["rate"] for run in runs]
    return out


def spread(values: list[float]) -> float:
    """The interquartile range relative to the median: how far apart two
    measurements of the same thing land on this machine now."""
    if len(values) < 2 or statistics.median(values) <= 0:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(values)


def pair(runs: list[dict[str, Any]], base_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure against the baseline's run of the same repetition, which ran
    minutes apart at most, so the machine's slow swings of load cancel: the
    median of those ratios (`x_base`) and their spread (`x_base_spread`)."""
    ratios: dict[str, list[float]] = {name: [] for name in FIGURES}
    for run, base in zip(runs, base_runs, strict=True):
        for name in FIGURES:
            if base[name] > 0 and run[name] >= 0:
                ratios[name].append(run[name] / base[name])
    return {
        "x_base": {n: statistics.median(r) if r else None for n, r in ratios.items()},
        "x_base_spread": {n: spread(r) for n, r in ratios.items()},
    }


def _crr_ratios(x: dict[str, Any]) -> tuple[float, float, float, float]:
    return (
        x["x_base"]["rate"] or 0.0,
        x["x_base"]["connect_p99_us"] or 0.0,
        x["x_base_spread"]["rate"],
        x["x_base_spread"]["connect_p99_us"],
    )


def targets(results: dict[str, Any]) -> list[str]:
    """Issue 7's targets against the figures: new connections and connect p99
    within 10% of no load balancer at every N (or missed by less than the
    noise), the same within noise at the smallest and the largest N, and at
    the largest N ahead of the iptables shape and level with the nftables one."""
    lines = ["## targets: new connections (rate and connect p99) against no load balancer"]
    lines.append(
        f"{'N':>6} {'scenario':<10} {'variant':<10} {'rate':>6} {'±':>5} {'p99':>6} {'±':>5}"
        "  verdict"
    )
    sizes = sorted(results["sizes"], key=int)
    for size in sizes:
        for scenario, metrics in results["sizes"][size].items():
            crr = metrics.get("crr", {})
            for variant, got in crr.items():
                if not variant.startswith("lbctl") or "x_base" not in got:
                    continue
                rate, p99, rate_noise, p99_noise = _crr_ratios(got)
                ok = rate >= 0.9 and p99 <= 1.1
                verdict = "within 10%" if ok else "MISSED"
                if not ok and rate >= 0.9 - rate_noise and p99 <= 1.1 + p99_noise:
                    verdict = "missed by less than the noise"
                if size == sizes[-1]:
                    for rival in ("iptables", "nftables"):
                        other = crr.get(rival)
                        if other is None:
                            continue
                        o_rate, o_p99, *_ = _crr_ratios(other)
                        ahead = rate >= o_rate and p99 <= o_p99
                        level = rate >= o_rate - rate_noise and p99 <= o_p99 + p99_noise
                        word = "ahead of" if ahead else "level with" if level else "BEHIND"
                        verdict += f"; {word} {rival}"
                lines.append(
                    f"{size:>6} {scenario:<10} {variant:<10} {rate:6.2f} {rate_noise:5.2f} "
                    f"{p99:6.2f} {p99_noise:5.2f}  {verdict}"
                )
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        lines.append(f"## flat in N: {large} services against {small}, new connections")
        for scenario, metrics in results["sizes"][large].items():
            for variant, got in metrics.get("crr", {}).items():
                before = results["sizes"][small][scenario]["crr"].get(variant)
                if not variant.startswith("lbctl") or before is None or "x_base" not in got:
                    continue
                a, b = _crr_ratios(before), _crr_ratios(got)
                same = abs(b[0] - a[0]) <= max(a[2], b[2], 0.1) and abs(b[1] - a[1]) <= max(
                    a[3], b[3], 0.1
                )
                lines.append(
                    f"{scenario:<10} {variant:<10} rate x base {a[0]:.2f} -> {b[0]:.2f}, "
                    f"p99 x base {a[1]:.2f} -> {b[1]:.2f}: "
                    + ("the same within noise" if same else "DIFFERENT")
                )
    lines.append(
        "(x base: median over repetitions of the ratio to the baseline's run of the same"
        " repetition; ±: interquartile range of those ratios over their median, the noise)"
    )
    return lines


def ratio(x: dict[str, Any], name: str) -> str:
    value = x.get("x_base", {}).get(name)
    return f"{value:6.2f}" if value is not None else "     -"


def report(size: int, table: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    lines = [f"## {size} services"]
    for scenario, metrics in table.items():
        for metric, variants in metrics.items():
            lat = "connect" if metric == "crr" else "latency"
            lines.append(
                f"{SCENARIOS[scenario]}, {METRICS[metric]}: "
                f"{'variant':<10} {'per s':>9} {'x base':>6} {lat + ' p50 us':>15} "
                f"{'x base':>6} {lat + ' p99 us':>15} {'x base':>6} {'errors':>6} {'stalls':>6}"
            )
            for variant, got in variants.items():
                rate, p50, p99 = got["rate"], got[f"{lat}_p50_us"], got[f"{lat}_p99_us"]
                lines.append(
                    f"{'':{len(SCENARIOS[scenario]) + len(METRICS[metric]) + 3}}"
                    f"{variant:<10} {rate:>9.0f} {ratio(got, 'rate')} {p50:>15.0f} "
                    f"{ratio(got, f'{lat}_p50_us')} {p99:>15.0f} "
                    f"{ratio(got, f'{lat}_p99_us')} {got['errors']:>6} {got['stalls']:>6}"
                )
    return lines


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(n) for n in results["sizes"])
    panels = [
        (scenario, metric, key, label)
        for scenario in SCENARIOS
        for metric, key, label in [
            ("crr", "rate", "new connections/s"),
            ("crr", "connect_p99_us", "connect p99 (us)"),
            ("rr", "rate", "requests/s (established)"),
            ("udp", "rate", "UDP replies/s"),
        ]
    ]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8), squeeze=False)
    for ax, (scenario, metric, key, label) in zip(axes.flat, panels, strict=True):
        for variant in VARIANTS:
            points = [
                (n, results["sizes"][str(n)][scenario][metric][variant][key])
                for n in sizes
                if variant in results["sizes"][str(n)][scenario][metric]
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=variant)
        ax.set_xscale("log")
        ax.set_xlabel("services")
        ax.set_title(f"{SCENARIOS[scenario]}: {label}", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes.flat[len(panels) // 2].legend(fontsize=8)  # NodePort's panels have every variant
    info = results["machine"]
    fig.suptitle(
        f"lbctl data plane, median of {results['repetitions']} runs of {results['seconds']} s; "
        f"{info['cpus']} CPUs ({info['cpu']}), kernel {info['kernel']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
