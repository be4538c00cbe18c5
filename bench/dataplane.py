"""Data-plane benchmark: `make bench-dataplane`.

Per-packet cost through the node, side by side with what a user would pick
instead, measured the same way in the same run.  One topology per variant, all
alive at once, built only of network namespaces this script creates:

    client pod 10.244.0.10 --lxcclient--+
                                        node (10.244.0.1 on every lxc*, 198.51.100.1 on ext0)
    external client 198.51.100.10 --ext0+--lxcpod0-- pod0 10.244.0.20 (nginx, UDP responder)
                                         +--lxcpod1-- pod1 10.244.0.21 (nginx, UDP responder)

The Service under test (ClusterIP 10.96.255.1, TCP 80 and UDP 9000, NodePorts
30080 and 30090) has the two pods as endpoints.  N-1 decoy ClusterIP Services
with 10 endpoints each fill the tables.  Variants, for each N:

- baseline: no load balancer; the clients take the pods' addresses in turn;
- iptables: kube-proxy's iptables layout (tests/kubeproxy_rules.py) loaded with
  iptables-legacy (iptables-nft would need minutes to load 10,000 services; its
  rules are matched one by one as well).  kube-proxy orders services as its map
  iterates, so the one under test sits halfway down KUBE-SERVICES;
- nftables: kube-proxy's nftables layout (verdict maps);
- lbctl-tc: `lbctl run` with its tc programs (and no netfilter rule at all);
- lbctl-xdp: the same with `--xdp native` on ext0 (NodePort only: XDP serves
  traffic from outside).

No variant has any other netfilter rule: the kube-proxy shapes pay for conntrack,
as they do on a node; baseline and lbctl do not load it.

Measurements (bench/loadgen.c, one client thread with epoll):
- crr: a new TCP connection per HTTP request (the client closes after the
  response); connections/s, and p50/p99 of the connect time (SYN to SYN-ACK
  through the node) and of the whole request;
- rr: HTTP requests on established connections, requests/s and p50/p99;
- udp: request/reply datagrams over many sockets, replies/s and p50/p99;
for ClusterIP from the client pod and for NodePort from the external client.
Operations still in flight when a run ends count with their time so far, and
`stalls` counts operations slower than 200 ms (TCP's least retransmission
timeout: a packet was lost), so a dropped SYN shows in p99 and is counted.

Every figure is the median of REPETITIONS runs; each repetition runs every
variant in turn, starting with a different one each time.  A ratio to the
baseline ("x base") is the median over repetitions of the ratio to the
baseline's run of the same repetition: the two ran close together, so slow
swings of this shared machine's load cancel, and the spread of those ratios
is the noise the verdict on the targets allows for.  Results are printed and
written to bench/results/ as JSON, text and PNG (bench/dataplane_report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dataplane_report import (
    METRICS,
    SCENARIOS,
    VARIANTS,
    chart,
    pair,
    report,
    summarize,
    targets,
)
from bench.machine import machine
from tests import k8s_yaml, netlab
from tests.kubeproxy_rules import (
    ServicePort,
    iptables_rules,
    nftables_base,
    nftables_services,
)
from tests.netlab import Lab, Netns

HERE = Path(__file__).resolve().parent
LBCTL = str(Path(sys.executable).parent / "lbctl")
RESULTS = HERE / "results"

CLUSTER_CIDR = "10.244.0.0/16"
NODE_IP = "198.51.100.1"
EXT_CLIENT_IP = "198.51.100.10"
VIP = "10.96.255.1"
TCP_PORT, UDP_PORT = 80, 9000
TCP_NODEPORT, UDP_NODEPORT = 30080, 30090
DECOY_ENDPOINTS = 10

CONCURRENCY = {"crr": 8, "rr": 8, "udp": 32}
# XDP only sees traffic arriving on the external interface.
APPLIES = {("clusterip", "lbctl-xdp"): False}


def applies(scenario: str, variant: str) -> bool:
    return APPLIES.get((scenario, variant), True)


# -- the services -----------------------------------------------------------------------


def decoy(i: int) -> ServicePort:
    ip = str(IPv4Address(0x0A600001 + i))
    endpoints = tuple(
        (str(IPv4Address(0x0A800000 + i * DECOY_ENDPOINTS + j)), 8080)
        for j in range(DECOY_ENDPOINTS)
    )
    return ServicePort("bench", f"decoy{i}", "http", ip, 80, endpoints=endpoints)


def tested(pods: list[str]) -> list[ServicePort]:
    return [
        ServicePort(
            "bench",
            "tested",
            name,
            VIP,
            port,
            protocol=proto,
            node_port=node_port,
            endpoints=tuple((ip, port) for ip in pods),
        )
        for name, proto, port, node_port in [
            ("http", "tcp", TCP_PORT, TCP_NODEPORT),
            ("udp", "udp", UDP_PORT, UDP_NODEPORT),
        ]
    ]


def ordered(services: int, pods: list[str]) -> list[ServicePort]:
    """N services: decoys with the one under test halfway down."""
    decoys = [decoy(i) for i in range(services - 1)]
    half = len(decoys) // 2
    return [*decoys[:half], *tested(pods), *decoys[half:]]


def manifests(ports: list[ServicePort]) -> list[dict[str, Any]]:
    """Service and EndpointSlice objects for ports of one Service each (or of `tested`)."""
    by_service: dict[str, list[ServicePort]] = {}
    for port in ports:
        by_service.setdefault(port.name, []).append(port)
    objects: list[dict[str, Any]] = []
    for name, svc_ports in by_service.items():
        spec_ports = [(p.port_name, p.protocol.upper(), p.port) for p in svc_ports]
        svc = k8s_yaml.service(name, svc_ports[0].cluster_ip, spec_ports, namespace="bench")
        if any(p.node_port for p in svc_ports):
            svc["spec"]["type"] = "NodePort"
            for spec_port, p in zip(svc["spec"]["ports"], svc_ports, strict=True):
                spec_port["nodePort"] = p.node_port
        objects.append(svc)
        by_port = {(ip, p.port_name): port for p in svc_ports for ip, port in p.endpoints}
        addresses = sorted({ip for ip, _ in by_port})
        slice_ports = [(p.port_name, p.protocol.upper(), p.endpoints[0][1]) for p in svc_ports]
        objects.append(k8s_yaml.endpoint_slice(name, addresses, slice_ports, namespace="bench"))
    return objects


# -- the topology -----------------------------------------------------------------------


@dataclass
class Topology:
    variant: str
    lab: Lab
    node: Netns
    client: Netns
    external: Netns
    pods: list[netlab.Pod]
    work: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    agent: subprocess.Popen[bytes] | None = None
    agent_log: Path | None = None
    services: int = 0
    first: int = 0  # services the agent synced at its start

    @property
    def pod_ips(self) -> list[str]:
        return [pod.ip for pod in self.pods]

    def target(self, scenario: str, metric: str) -> tuple[Netns, str, int]:
        udp = metric == "udp"
        if self.variant == "baseline":
            where = self.client if scenario == "clusterip" else self.external
            return where, ",".join(self.pod_ips), UDP_PORT if udp else TCP_PORT
        if scenario == "clusterip":
            return self.client, VIP, UDP_PORT if udp else TCP_PORT
        return self.external, NODE_IP, UDP_NODEPORT if udp else TCP_NODEPORT


def nsenter(ns: Netns, *args: str) -> list[str]:
    return ["nsenter", f"--net={ns.path}", *args]


def start_backends(topo: Topology, loadgen: Path) -> None:
    for pod in topo.pods:
        conf = topo.work / f"nginx-{pod.name}.conf"
        temp = topo.work / f"nginx-{pod.name}"
        temp.mkdir(exist_ok=True)
        conf.write_text(
            f"""worker_processes 1;
daemon off;
pid {temp}/nginx.pid;
error_log {temp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen {pod.ip}:{TCP_PORT} backlog=4096;
        location / {{ default_type text/plain; return 200 "{pod.ip}\\n"; }}
    }}
}}
"""
        )
        for args in (
            ["nginx", "-c", str(conf), "-p", str(temp)],
            [str(loadgen), "udp-server", pod.ip, str(UDP_PORT), pod.ip],
        ):
            proc = subprocess.Popen(
                nsenter(pod.ns, *args), stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            topo.procs.append(proc)
    deadline = time.monotonic() + 10
    for pod in topo.pods:
        while f":{TCP_PORT} " not in pod.ns.run("ss", "-ltnH").stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx in {pod.name} of {topo.variant} did not start")
            time.sleep(0.05)


def build(variant: str, work: Path) -> Topology:
    lab = Lab()
    try:
        cluster = netlab.build_cluster(lab, pods=2, offload=False, invalid_drop_rule=False)
        node = cluster.node
        external = lab.netns("ext")
        netlab.veth(external, "eth0", node, "ext0")
        external.ip("addr", "add", f"{EXT_CLIENT_IP}/24", "dev", "eth0")
        external.ip("route", "add", "default", "via", NODE_IP)
        node.ip("addr", "add", f"{NODE_IP}/24", "dev", "ext0")
        netlab.tx_checksum_offload(external, "eth0", on=False)  # as frames from a NIC
        for ns in (cluster.client.ns, external):
            ns.sysctl("net.ipv4.tcp_tw_reuse", 1)  # crr closes from the client side
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")
        for pod in cluster.pods:
            # Native XDP redirects into a veth only when its peer runs NAPI; on for all.
            pod.ns.run("ethtool", "-K", "eth0", "gro", "on")
        vdir = work / variant
        vdir.mkdir(parents=True, exist_ok=True)
        return Topology(variant, lab, node, cluster.client.ns, external, cluster.pods, vdir)
    except BaseException:
        lab.close()
        raise


def stop(topo: Topology) -> None:
    procs = [*topo.procs, *([topo.agent] if topo.agent else [])]
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if topo.agent is not None:
        subprocess.run(
            nsenter(topo.node, LBCTL, "cleanup", "--bpffs", str(pin_dir(topo))),
            capture_output=True,
            check=False,
        )
    topo.lab.close()


def pin_dir(topo: Topology) -> Path:
    return Path(f"/sys/fs/bpf/lbctl-bench-{os.getpid()}-{topo.variant}")


# -- loading N services -----------------------------------------------------------------


APPLIED = re.compile(r"applied (\d+) frontend updates")


def load(topo: Topology, services: int) -> float:
    """Program `services` services into the variant; seconds it took."""
    started = time.monotonic()
    if topo.variant == "iptables":
        ports = ordered(services, topo.pod_ips)
        feed(topo.node, iptables_rules(ports, CLUSTER_CIDR), "iptables-legacy-restore")
    elif topo.variant == "nftables":
        feed(topo.node, nftables_base([NODE_IP]), "nft", "-f", "-")
        for batch in nftables_services(ordered(services, topo.pod_ips), CLUSTER_CIDR):
            feed(topo.node, batch, "nft", "-f", "-")
    elif topo.variant.startswith("lbctl"):
        load_lbctl(topo, services)
    topo.services = services
    return time.monotonic() - started


def feed(ns: Netns, text: str, *command: str) -> None:
    done = subprocess.run(nsenter(ns, *command), input=text, text=True, capture_output=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr[-2000:]}")


def load_lbctl(topo: Topology, services: int) -> None:
    """Write the new decoys as one more manifest file; start the agent the first time."""
    mdir = topo.work / "manifests"
    mdir.mkdir(exist_ok=True)
    if topo.agent is None:
        k8s_yaml.write(mdir / "tested.yaml", *manifests(tested(topo.pod_ips)))
    new = [decoy(i) for i in range(max(0, topo.services - 1), services - 1)]
    k8s_yaml.write(mdir / f"decoys-{services:06d}.yaml", *manifests(new))
    if topo.agent is None:
        topo.agent_log = topo.work / "agent.log"
        size = max(1024, services * 2)
        args = [
            LBCTL, "run", "--manifests", str(mdir), "--bpffs", str(pin_dir(topo)),
            "--hostname-override", "bench-node", "--node-ip", NODE_IP,
            "--cluster-cidr", CLUSTER_CIDR, "--external-interfaces", "ext0",
            "--xdp", "native" if topo.variant == "lbctl-xdp" else "off", "--cgroup", "",
            "--metrics-bind-address", "", "--healthz-bind-address", "",
            "--max-services", str(max(16384, size)),
            "--max-backends", str(max(131072, services * DECOY_ENDPOINTS * 2)),
            "--max-slots", str(max(131072, services * DECOY_ENDPOINTS * 2)),
        ]  # fmt: skip
        with topo.agent_log.open("wb") as sink:
            topo.agent = subprocess.Popen(
                nsenter(topo.node, *args), stdout=sink, stderr=sink, stdin=subprocess.DEVNULL
            )
        wait_log(topo, lambda text: "synced:" in text, 300)
        topo.first = services
        return
    added = services - topo.first  # one frontend each
    wait_log(topo, lambda text: sum(map(int, APPLIED.findall(text))) >= added, 300)


def wait_log(topo: Topology, ready: Callable[[str], bool], timeout: float) -> None:
    assert topo.agent is not None and topo.agent_log is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = topo.agent_log.read_text()
        if ready(text):
            return
        if topo.agent.poll() is not None:
            raise RuntimeError(f"lbctl ({topo.variant}) exited:\n{text[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"lbctl ({topo.variant}) not programmed:\n{text[-3000:]}")


# -- measuring --------------------------------------------------------------------------


def measure(
    topo: Topology, scenario: str, metric: str, seconds: float, loadgen: Path
) -> dict[str, Any]:
    where, address, port = topo.target(scenario, metric)
    conc = str(CONCURRENCY[metric])
    args = [str(loadgen), metric, address, str(port), str(seconds), conc]
    done = subprocess.run(
        nsenter(where, *args), capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    if done.returncode:
        raise RuntimeError(f"loadgen {' '.join(args)} ({topo.variant}): {done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def rotate(items: list[str], by: int) -> list[str]:
    by %= len(items)
    return items[by:] + items[:by]


def bench_size(
    topos: dict[str, Topology], repetitions: int, seconds: float, loadgen: Path
) -> dict[str, dict[str, dict[str, Any]]]:
    """results[scenario][metric][variant] for the services loaded now."""
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    variants = list(topos)
    for rep in range(repetitions):
        for scenario in SCENARIOS:
            for metric in METRICS:
                for variant in rotate(variants, rep):
                    if not applies(scenario, variant):
                        continue
                    result = measure(topos[variant], scenario, metric, seconds, loadgen)
                    runs.setdefault((scenario, metric, variant), []).append(result)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for (scenario, metric, variant), got in runs.items():
        summary = summarize(got)
        base = runs.get((scenario, metric, "baseline"))
        if base is not None:
            summary |= pair(got, base)
        table.setdefault(scenario, {}).setdefault(metric, {})[variant] = summary
    return table


# -- reporting --------------------------------------------------------------------------


def versions() -> dict[str, Any]:
    """The machine, and the versions of what the variants run."""
    return {
        **machine(),
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "iptables": subprocess.run(
            ["iptables-legacy", "--version"], capture_output=True, text=True
        ).stdout.strip(),
        "nft": subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip(),
    }


def counters(topo: Topology) -> dict[str, int]:
    """The lbctl datapath's own counters (proof of which program did the work)."""
    done = subprocess.run(
        nsenter(topo.node, LBCTL, "maps", "dump", "-o", "json", "--bpffs", str(pin_dir(topo))),
        capture_output=True,
        text=True,
        check=True,
    )
    got: dict[str, int] = json.loads(done.stdout)["counters"]
    return got


def agent_cpu_s(topo: Topology) -> float:
    """CPU seconds the variant's lbctl agent has used so far (0 without one)."""
    if topo.agent is None:
        return 0.0
    fields = Path(f"/proc/{topo.agent.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def compile_loadgen(work: Path) -> Path:
    out = work / "loadgen"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(HERE / "loadgen.c")], check=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one run")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON, text and PNG go")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if sizes != sorted(sizes) or sizes[0] < 1:
        parser.error("--sizes must grow (services are added, never removed)")
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    work = Path("/tmp") / f"lbctl-bench-dp-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    loadgen = compile_loadgen(work)
    info = versions()
    text: list[str] = []

    def say(*lines: str) -> None:
        print("\n".join(lines), flush=True)
        text.extend(lines)

    say(
        f"machine: {info['cpus']} CPUs ({info['cpu']}), kernel {info['kernel']}",
        f"{info['nginx']}; {info['iptables']}; {info['nft']}",
        f"median of {args.repetitions} runs of {args.seconds} s, variants alternating",
    )
    results: dict[str, Any] = {
        "machine": info,
        "repetitions": args.repetitions,
        "seconds": args.seconds,
        "concurrency": CONCURRENCY,
        "sizes": {},
        "load_seconds": {},
        "lbctl_counters": {},
        "agent_cpu": {},
    }
    with ExitStack() as stack:
        topos: dict[str, Topology] = {}
        for variant in variants:
            topo = build(variant, work)
            stack.callback(stop, topo)
            start_backends(topo, loadgen)
            topos[variant] = topo
        for size in sizes:
            results["load_seconds"][str(size)] = {v: load(t, size) for v, t in topos.items()}
            cpu_before = {v: agent_cpu_s(t) for v, t in topos.items()}
            started = time.monotonic()
            table = bench_size(topos, args.repetitions, args.seconds, loadgen)
            wall = time.monotonic() - started
            results["sizes"][str(size)] = table
            # the agents keep working while every variant is measured (periodic
            # sync, conntrack sweep): their share of the machine, for the record
            results["agent_cpu"][str(size)] = {
                v: round((agent_cpu_s(t) - cpu_before[v]) / wall, 4)
                for v, t in topos.items()
                if v.startswith("lbctl")
            }
            results["lbctl_counters"][str(size)] = {
                v: counters(t) for v, t in topos.items() if v.startswith("lbctl")
            }
            say(*report(size, table))
            share = ", ".join(f"{v} {c:.1%}" for v, c in results["agent_cpu"][str(size)].items())
            say(f"lbctl agents' CPU while measuring, of one CPU: {share}")
    say(*targets(results))
    (args.out / "dataplane.txt").write_text("\n".join(text) + "\n")
    (args.out / "dataplane.json").write_text(json.dumps(results, indent=1) + "\n")
    chart(results, args.out / "dataplane.png")
    print(f"results: {args.out / 'dataplane.json'}, .txt and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
