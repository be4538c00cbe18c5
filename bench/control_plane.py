"""Control-plane benchmark: `make bench-control-plane`.

For 100, 1,000 and 10,000 Services of 10 endpoints each, served by the test
API server (tests/apiserver.py; no kube-apiserver can be installed here):

- start: from launching `lbctl run --kubeconfig` to the agent's "synced"
  log line (all maps programmed), and the agent's own sync time (LIST,
  parse, plan and write, without Python start-up and the BPF compile);
- the agent's RSS after the sync;
- latency from an EndpointSlice change arriving on the watch to the maps
  updated, as the agent logs it, p50 and p99 over CHANGES changes;
- as the reference, in the same run: `iptables-restore` of the equivalent
  kube-proxy-shaped nat table (KUBE-SERVICES / KUBE-SVC-* / KUBE-SEP-*
  chains, generated here from kube-proxy's documented rule layout), full
  load and one endpoint change (kube-proxy rewrites the service's chains).

Then the cold sync against real-shaped objects (issue 20; `--cold-sizes`,
default 10,000 Services x 10 endpoints), built by tests/k8s_payloads.py as a
real cluster holds them (managedFields, last-applied-configuration, targetRef...)
and served in pages, measured in the same run, median of `--cold-runs`:

- the floor: LIST every page (limit=500, the continue token) of Services and
  EndpointSlices and `json.loads` each, nothing else, in this process;
- launch -> synced: from launching `lbctl run` to its "synced:" log line, and
  to its /healthz answering 200; the ratio of each to the floor;
- the agent's RSS after the sync.

The goals (issue 20): launch -> synced <= 2 s and <= 1.5x the floor.

Everything runs inside network namespaces this script creates and deletes.
The machine is shared and noisy: read the figures as ratios within one run.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine
from tests import k8s_payloads
from tests.apiserver import FakeApiServer
from tests.kubeproxy_rules import ServicePort, iptables_rules, iptables_service_rewrite
from tests.netlab import Netns

LBCTL = str(Path(sys.executable).parent / "lbctl")
ENDPOINTS = 10
CLUSTER_CIDR = "10.244.0.0/16"
APPLIED = re.compile(r"applied .* ([0-9.]+) ms after the change arrived")
SYNCED = re.compile(r"synced: .* in ([0-9.]+) s")


def service(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc{i}", "namespace": "bench"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": str(ipaddress.IPv4Address(0x0A600000 + i)),
            "ports": [{"name": "http", "protocol": "TCP", "port": 80}],
        },
    }


def endpoint(i: int, j: int, generation: int = 0) -> str:
    """Endpoint j of service i; generation n > 0 gives a fresh address for change n."""
    if generation:
        return str(ipaddress.IPv4Address(0x0C000000 + generation))
    return str(ipaddress.IPv4Address(0x0B000000 + i * ENDPOINTS + j))


def endpoint_slice(i: int, generation: int = 0) -> dict[str, Any]:
    changed = {ENDPOINTS - 1: generation}  # a change replaces the last endpoint
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"svc{i}-abcde",
            "namespace": "bench",
            "labels": {"kubernetes.io/service-name": f"svc{i}"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": [
            {
                "addresses": [endpoint(i, j, changed.get(j, 0))],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": f"node{j}",
            }
            for j in range(ENDPOINTS)
        ],
    }


def rss_mb(pid: int) -> tuple[float, float]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def wait_for(log: Path, pattern: re.Pattern[str], count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pattern.findall(log.read_text())
        if len(found) >= count:
            return list(found)
        time.sleep(0.002)
    raise TimeoutError(f"{pattern.pattern!r} seen fewer than {count} times:\n{log.read_text()}")


def bench_lbctl(services: int, changes: int, work: Path) -> dict[str, float]:
    ns = Netns.create("bench")
    pins = Path(f"/sys/fs/bpf/lbctl-bench-{os.getpid()}")
    proc: subprocess.Popen[bytes] | None = None
    try:
        sock = ns.open_socket()
        sock.bind(("127.0.0.1", 0))
        server = FakeApiServer(sock, bookmark_interval=5.0).start()
        ns.on_delete(server.stop)
        with server.batch():
            for i in range(services):
                server.create(service(i))
                server.create(endpoint_slice(i))
        kubeconfig = server.write_kubeconfig(work / "kubeconfig")
        log = work / f"agent-{services}.log"
        size = max(1024, services * 2)
        args = [
            "nsenter", f"--net={ns.path}", LBCTL, "run", "--kubeconfig", str(kubeconfig),
            "--hostname-override", "bench-node", "--bpffs", str(pins),
            "--metrics-bind-address", "", "--healthz-bind-address", "",
            "--max-services", str(size), "--max-backends", str(size * ENDPOINTS),
            "--max-slots", str(size * ENDPOINTS),
        ]  # fmt: skip
        with log.open("wb") as sink:
            started = time.monotonic()
            proc = subprocess.Popen(args, stdout=sink, stderr=sink, stdin=subprocess.DEVNULL)
        [agent_sync] = wait_for(log, SYNCED, 1, 120)
        start_s = time.monotonic() - started
        rss, peak = rss_mb(proc.pid)
        for n in range(changes):
            server.apply(endpoint_slice((n * 7919) % services, generation=n + 1))
            wait_for(log, APPLIED, n + 1, 10)
        latencies = sorted(float(ms) for ms in APPLIED.findall(log.read_text()))
        return {
            "start_s": start_s,
            "sync_s": float(agent_sync),
            "rss_mb": rss,
            "peak_mb": peak,
            "p50_ms": statistics.median(latencies),
            "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
        }
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)
            subprocess.run(
                ["nsenter", f"--net={ns.path}", LBCTL, "cleanup", "--bpffs", str(pins)],
                capture_output=True,
                check=False,
            )
        ns.delete()


# -- the cold sync against real-shaped objects ---------------------------------------

COLD_PAGE = 500  # client-go's informers list in pages of 500
COLD_PATHS = ("/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices")


def real_objects(services: int) -> list[dict[str, Any]]:
    objects = []
    for i in range(services):
        name = f"svc{i}"
        objects.append(
            k8s_payloads.service("bench", name, str(ipaddress.IPv4Address(0x0A600000 + i)))
        )
        ips = [endpoint(i, j) for j in range(ENDPOINTS)]
        objects.append(k8s_payloads.endpoint_slice("bench", name, ips))
    return objects


def list_and_decode(ns: Netns, port: int) -> dict[str, float]:
    """The floor: every page of both LISTs fetched and decoded, nothing else."""
    fetch = decode = 0.0
    size = items = 0
    with ns.entered():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            started = time.perf_counter()
            for path in COLD_PATHS:
                token = ""
                while True:
                    query = f"?limit={COLD_PAGE}" + (f"&continue={token}" if token else "")
                    began = time.perf_counter()
                    conn.request("GET", path + query, headers={"Accept": "application/json"})
                    body = conn.getresponse().read()
                    got = time.perf_counter()
                    page = json.loads(body)
                    decode += time.perf_counter() - got
                    fetch += got - began
                    size += len(body)
                    items += len(page["items"])
                    token = page["metadata"].get("continue", "")
                    if not token:
                        break
            total = time.perf_counter() - started
        finally:
            conn.close()
    return {"floor_s": total, "fetch_s": fetch, "decode_s": decode, "mb": size / 1e6,
            "items": items}  # fmt: skip


def healthz_ok(ns: Netns, port: int) -> bool:
    with ns.entered():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()


def bench_cold_sync(services: int, runs: int, work: Path) -> dict[str, Any]:
    """Floor and launch -> synced, alternated `runs` times against one server."""
    ns = Netns.create("cold")
    pins = Path(f"/sys/fs/bpf/lbctl-cold-{os.getpid()}")
    result: dict[str, Any] = {"runs": []}
    try:
        sock = ns.open_socket()
        sock.bind(("127.0.0.1", 0))
        server = FakeApiServer(sock).start()
        ns.on_delete(server.stop)
        with server.batch():
            for obj in real_objects(services):
                server.create(obj)
        kubeconfig = server.write_kubeconfig(work / "kubeconfig-cold")
        size = max(1024, services * 2)
        health = 10257
        for run in range(runs):
            floor = list_and_decode(ns, server.port)
            log = work / f"agent-cold-{services}-{run}.log"
            args = [
                "nsenter", f"--net={ns.path}", LBCTL, "run", "--kubeconfig", str(kubeconfig),
                "--hostname-override", "bench-node", "--bpffs", str(pins),
                "--metrics-bind-address", "", "--healthz-bind-address", f"127.0.0.1:{health}",
                "--max-services", str(size), "--max-backends", str(size * ENDPOINTS),
                "--max-slots", str(size * ENDPOINTS),
            ]  # fmt: skip
            proc: subprocess.Popen[bytes] | None = None
            try:
                with log.open("wb") as sink:
                    started = time.monotonic()
                    proc = subprocess.Popen(
                        args, stdout=sink, stderr=sink, stdin=subprocess.DEVNULL
                    )
                synced_s = healthz_s = None
                deadline = started + 120
                while (synced_s is None or healthz_s is None) and time.monotonic() < deadline:
                    if synced_s is None and SYNCED.search(log.read_text()):
                        synced_s = time.monotonic() - started
                    if healthz_s is None and healthz_ok(ns, health):
                        healthz_s = time.monotonic() - started
                    if proc.poll() is not None:
                        raise RuntimeError(f"lbctl run exited:\n{log.read_text()}")
                    time.sleep(0.005)
                if synced_s is None or healthz_s is None:
                    raise TimeoutError(f"no sync within 120 s:\n{log.read_text()}")
                rss, peak = rss_mb(proc.pid)
                [agent_sync] = SYNCED.findall(log.read_text())
                result["runs"].append({**floor, "synced_s": synced_s, "healthz_s": healthz_s,
                    "agent_sync_s": float(agent_sync), "rss_mb": rss, "peak_mb": peak})  # fmt: skip
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=20)
                subprocess.run(
                    ["nsenter", f"--net={ns.path}", LBCTL, "cleanup", "--bpffs", str(pins)],
                    capture_output=True,
                    check=False,
                )
    finally:
        ns.delete()
    for key in result["runs"][0]:
        result[key] = statistics.median(r[key] for r in result["runs"])
    return result


def print_cold(size: int, cold: dict[str, Any]) -> None:
    synced_x = cold["synced_s"] / cold["floor_s"]
    healthz_x = cold["healthz_s"] / cold["floor_s"]
    print(
        f"{size:>8} {cold['mb']:>6.1f} {cold['floor_s']:>7.2f} ({cold['fetch_s']:.2f} + "
        f"{cold['decode_s']:.2f}) {cold['synced_s']:>8.2f} {synced_x:>6.2f}x "
        f"{cold['healthz_s']:>9.2f} {healthz_x:>6.2f}x {cold['agent_sync_s']:>7.2f} "
        f"{cold['rss_mb']:>7.0f}",
        flush=True,
    )
    goal_s, goal_x = cold["synced_s"] <= 2.0, synced_x <= 1.5
    print(
        f"{'':>8} goals: launch -> synced <= 2 s {'met' if goal_s else 'missed'} "
        f"({cold['synced_s']:.2f} s, {cold['synced_s'] / 2.0:.2f}x the goal); <= 1.5x the floor "
        f"{'met' if goal_x else 'missed'} ({synced_x:.2f}x, {synced_x / 1.5:.2f}x the goal); "
        f"runs: " + ", ".join(f"{r['synced_s']:.2f}/{r['floor_s']:.2f} s" for r in cold["runs"]),
        flush=True,
    )


# -- the kube-proxy reference ----------------------------------------------------------


def service_ports(services: int, generation: int = 0) -> list[ServicePort]:
    """The same Services as kube-proxy sees them; generation n changes one endpoint."""
    return [
        ServicePort(
            "bench",
            f"svc{i}",
            "http",
            str(ipaddress.IPv4Address(0x0A600000 + i)),
            80,
            endpoints=tuple(
                (endpoint(i, j, generation if j == ENDPOINTS - 1 else 0), 8080)
                for j in range(ENDPOINTS)
            ),
        )
        for i in range(services)
    ]


REFERENCE_TIMEOUT_S = 120.0  # iptables-nft needs longer at 10,000 Services; `make bench` has 20 min


def restore(ns: Netns, rules: str) -> float:
    """Seconds iptables-restore takes; infinity when it exceeds REFERENCE_TIMEOUT_S."""
    started = time.monotonic()
    try:
        subprocess.run(
            ["ip", "netns", "exec", ns.name, "iptables-restore", "--noflush"],
            input=rules,
            text=True,
            check=True,
            timeout=REFERENCE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return math.inf
    return time.monotonic() - started


def bench_iptables(services: int) -> dict[str, float]:
    ns = Netns.create("iptref")
    try:
        full = iptables_rules(service_ports(services), CLUSTER_CIDR)
        full_s = restore(ns, full)
        if math.isinf(full_s):
            return {"full_s": full_s, "change_ms": math.nan}
        # One endpoint change: kube-proxy flushes and rewrites the service's chains
        # (its SEP chains keep their names except the changed endpoint's).
        changed = service_ports(services, generation=1)[services // 2]
        change_s = restore(ns, iptables_service_rewrite(changed, CLUSTER_CIDR))
        return {"full_s": full_s, "change_ms": change_s * 1000, "rules": full.count("\n-A")}
    finally:
        ns.delete()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--skip-reference", action="store_true", help="no iptables-restore")
    parser.add_argument("--cold-sizes", default="10000", help="real-shaped cold sync; '' for none")
    parser.add_argument("--cold-runs", type=int, default=3)
    args = parser.parse_args()
    work = Path("/tmp") / f"lbctl-bench-{os.getpid()}"
    work.mkdir(exist_ok=True)
    info = machine()
    print(f"machine: {info['cpus']} CPUs ({info['cpu']}), kernel {info['kernel']}, Python "
          f"{platform.python_version()}")  # fmt: skip
    print(f"{ENDPOINTS} endpoints per service; latency over {args.changes} EndpointSlice changes")
    version = subprocess.run(["iptables", "--version"], capture_output=True, text=True)
    print(f"reference: {version.stdout.strip()}")
    header = (
        f"{'services':>8} {'start s':>8} {'sync s':>7} {'RSS MB':>7} {'peak MB':>8} "
        f"{'p50 ms':>7} {'p99 ms':>7} | {'iptables-restore full s':>23} {'one change ms':>13}"
    )
    print(header)
    print("-" * len(header))
    for size in (int(s) for s in args.sizes.split(",") if s):
        lb = bench_lbctl(size, args.changes, work)
        print(
            f"{size:>8} {lb['start_s']:>8.2f} {lb['sync_s']:>7.2f} {lb['rss_mb']:>7.0f} "
            f"{lb['peak_mb']:>8.0f} {lb['p50_ms']:>7.2f} {lb['p99_ms']:>7.2f} | ",
            end="",
            flush=True,
        )
        if args.skip_reference:
            print("(skipped)")
            continue
        ref = bench_iptables(size)
        if math.isinf(ref["full_s"]):
            print(f"{f'> {REFERENCE_TIMEOUT_S:.0f} (stopped)':>23} {'-':>13}", flush=True)
        else:
            print(f"{ref['full_s']:>23.2f} {ref['change_ms']:>13.1f}", flush=True)
    cold_sizes = [int(s) for s in args.cold_sizes.split(",") if s]
    if cold_sizes:
        print(
            f"\ncold sync, real-shaped objects (tests/k8s_payloads.py), LIST pages of {COLD_PAGE}; "
            f"median of {args.cold_runs} runs, floor and agent alternated"
        )
        header = (
            f"{'services':>8} {'MB':>6} {'floor s (LIST + json.loads)':>27} {'synced s':>8} "
            f"{'/floor':>7} {'healthz s':>9} {'/floor':>7} {'sync s':>7} {'RSS MB':>7}"
        )
        print(header)
        print("-" * len(header))
        for size in cold_sizes:
            print_cold(size, bench_cold_sync(size, args.cold_runs, work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
