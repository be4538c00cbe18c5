"""The `lbctl` command line.

Exit codes: 0 success, 1 the command failed (the reason is on stderr),
2 the command line itself is wrong.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from lbctl import __version__
from lbctl.datapath.ebpf.settings import DEFAULT_PIN_DIR, BpfSettings

if TYPE_CHECKING:
    from lbctl.agent.config import Config
    from lbctl.sources import Source

log = logging.getLogger("lbctl")


def _interfaces(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one interface name")
    return names


def _parser() -> argparse.ArgumentParser:
    from lbctl.cli.cleanup import parse_node_port_range
    from lbctl.model import SCHEDULERS

    p = argparse.ArgumentParser(
        prog="lbctl",
        description="eBPF load balancer for Kubernetes Services (a kube-proxy replacement).",
    )
    p.add_argument("--version", action="version", version=f"lbctl {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the agent: program the datapath and keep it in sync",
        description="Compile and attach the BPF datapath, program it from the source "
        "(the Kubernetes API or a manifest directory), and apply every change until "
        "stopped. On exit the datapath stays in place (pinned maps, attached programs) so "
        "traffic keeps flowing and a restart adopts it, also a newer lbctl or other "
        "capacity flags: maps of another layout or size are converted in place without "
        "dropping a flow (docs/control-plane.md, Upgrades); `lbctl cleanup` removes it. "
        "Settings come from --config FILE (see examples/lbctl-config.yaml); a flag "
        "overrides the file.",
    )
    run.add_argument("--config", type=Path, metavar="FILE", help="configuration file (YAML)")
    source = run.add_argument_group("source of Services (exactly one)")
    source.add_argument(
        "--kubeconfig", type=Path, metavar="FILE", help="follow the API server of this kubeconfig"
    )
    source.add_argument(
        "--in-cluster",
        action="store_const",
        const=True,
        help="follow the API server with the pod's service account",
    )
    source.add_argument(
        "--manifests",
        type=Path,
        metavar="DIR",
        help="serve and watch a directory of Service and EndpointSlice YAML instead",
    )
    run.add_argument(
        "--hostname-override",
        metavar="NAME",
        help="this node's name in the API (default: $NODE_NAME, else the host name)",
    )
    run.add_argument(
        "--mode",
        choices=["ebpf", "ipvs", "auto"],
        help="datapath: ebpf (fail if the kernel cannot run it), ipvs (the fallback: IPVS "
        "and an nftables table), or auto (ebpf if every BPF feature probed is there, else "
        "ipvs; the default)",
    )
    run.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        help="how Services without an lbctl.io/scheduler annotation pick a backend "
        "(default random)",
    )
    run.add_argument(
        "--interfaces",
        type=_interfaces,
        metavar="IF[,IF...]",
        help="interfaces to attach to (default: every non-loopback Ethernet interface of this "
        "network namespace, including ones that appear later)",
    )
    run.add_argument(
        "--bpffs",
        type=Path,
        metavar="DIR",
        help=f"directory on bpffs for lbctl's pinned maps (default {DEFAULT_PIN_DIR})",
    )
    for flag, what, default in (
        ("--metrics-bind-address", "Prometheus metrics", "127.0.0.1:10249"),
        ("--healthz-bind-address", "health checks", "0.0.0.0:10256"),
    ):
        run.add_argument(
            flag, metavar="HOST:PORT", help=f'serve {what} here (default {default}; "" disables)'
        )
    run.add_argument(
        "--per-service-metrics",
        action=argparse.BooleanOptionalAction,
        help="export datapath counters per Service port (packets, bytes, new connections, "
        "drops by reason); one series set per Service port: turn off for huge clusters "
        "(default on)",
    )
    _node_args(run)
    defaults = BpfSettings()
    for flag, field, what in (
        ("--max-services", "max_services", "service frontends"),
        ("--max-backends", "max_backends", "distinct backends"),
        ("--max-slots", "max_slots", "backend slots over all frontends"),
        ("--conntrack-size", "ct_size", "conntrack entries (two per flow)"),
        ("--nat-size", "nat_size", "NAT entries (one per masqueraded flow)"),
        ("--max-source-ranges", "max_source_ranges", "loadBalancerSourceRanges entries"),
        ("--affinity-size", "affinity_size", "sessionAffinity ClientIP entries"),
        ("--table-size", "table_size", "entries of one wrr/maglev/sh table (a prime)"),
        ("--max-tables", "max_tables", "tables (frontends scheduled by wrr, maglev or sh)"),
    ):
        run.add_argument(
            flag,
            type=int,
            dest=field,
            metavar="N",
            help=f"capacity for {what} (default {getattr(defaults, field)})",
        )

    status = sub.add_parser(
        "status",
        help="is the agent up and healthy, its mode, and what the kernel holds of its datapath",
        description="Show the agent's mode and why, its source, last sync and its result, "
        "counts and errors (from its /statusz on --address), and what the kernel holds: "
        "the BPF programs on each interface of this network namespace (tc, XDP), the socket "
        "hooks and the pinned maps. Exit codes: 0 healthy, 1 the command failed, 2 usage, "
        "3 the agent does not answer, 4 it is unhealthy, 5 the datapath is absent.",
    )
    status.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    _datapath_args(status)

    trace = sub.add_parser(
        "trace",
        help="where the datapath would send a packet, and why",
        description="Follow the BPF program's decision for the first packet of a flow (a "
        "SYN for TCP) arriving on an interface lbctl is attached to, over the live maps, in "
        "the program's order: conntrack, the Service frontend (ClusterIP, NodePort, "
        "externalIP, LoadBalancer IP; the external-scope entry of externalTrafficPolicy "
        "Local for clients outside the cluster CIDRs), loadBalancerSourceRanges, ClientIP "
        "affinity, the scheduler. Nothing is sent and no map is written. Why endpoints are "
        "or are not backends (readiness, terminating, node locality, topology) comes from "
        "the agent's /tracez on --address; without the agent the maps alone are shown. "
        "Exit codes: 0 a backend would get the packet, 1 the command failed, 2 usage, "
        "3 no frontend matches (the packet passes untouched), 4 a frontend matches but the "
        "packet would be dropped or rejected.",
    )
    trace.add_argument(
        "--src",
        required=True,
        metavar="IP[:PORT]",
        help="the client; without a port a fresh one is assumed (conntrack is not looked "
        "up and maglev cannot be computed)",
    )
    trace.add_argument("--dst", required=True, metavar="IP:PORT", help="where the packet is sent")
    trace.add_argument("--proto", choices=["tcp", "udp"], default="tcp", help="default tcp")
    trace.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    _datapath_args(trace, "; also for its plan")

    monitor = sub.add_parser(
        "monitor",
        help="watch what the datapath does with real packets: drops, rejects, new flows, NAT",
        description="Stream the BPF programs' events, one line each: drops and rejects by "
        "reason (the names of lbctl_verdicts_total), new flows with the backend chosen, NAT "
        "ports given (nat) and missing (nat-exhausted), ICMP errors translated; each with "
        "the Service port (namespace/name:port/proto) and backend. The programs emit only "
        "while a monitor runs (one at a time per node); it ends on SIGINT or SIGTERM, after "
        "--count events or --duration seconds, and prints a summary of counts on stderr. "
        "XDP drops are streamed too; the socket hooks' rejects are not (lbctl_verdicts_total "
        "counts them). Exit codes: 0 done, 1 the command failed, 2 usage.",
    )
    monitor.add_argument(
        "--type",
        default=",".join(events_types()),
        metavar="TYPE[,TYPE]",
        help=f"event types to stream: {', '.join(events_types())} (default: all)",
    )
    monitor.add_argument("--service", metavar="NS/NAME", help="only this Service's events")
    monitor.add_argument(
        "--reason",
        default="",
        metavar="REASON[,REASON]",
        help="only these reasons (e.g. drop_source_range, rejected_no_backend, nat_exhausted)",
    )
    monitor.add_argument("--client", metavar="IP[/LEN]", help="only events of these clients")
    monitor.add_argument("-o", "--output", choices=["table", "json"], default="table")
    monitor.add_argument(
        "--rate",
        type=int,
        default=1000,
        metavar="N",
        help="print at most N events a second, count the rest (default 1000; 0: no limit)",
    )
    monitor.add_argument("--count", type=int, metavar="N", help="end after N events")
    monitor.add_argument("--duration", type=float, metavar="SECONDS", help="end after this long")
    _datapath_args(monitor)

    maps = sub.add_parser("maps", help="inspect the datapath's maps")
    maps_sub = maps.add_subparsers(dest="maps_command", required=True, metavar="ACTION")
    dump = maps_sub.add_parser(
        "dump",
        help="print the maps decoded: services, backends, flows, NAT, affinity, fill",
        description="Read lbctl's pinned maps and print them decoded: services by "
        "namespace/name and port with their frontends and backends (state, open flows), "
        "source ranges, the node's NAT settings, conntrack flows and NAT bindings with their "
        "age, ClientIP affinity entries, each map's capacity and fill, and the packet "
        "counters. MAP limits the output to one section (services, node, conntrack, nat, "
        "affinity, maps, counters) or to the section that decodes a map of that name (e.g. "
        "ct4, nat4, lb4_affinity). Exit codes: 0 printed, 1 no maps or no such service, "
        "2 usage.",
    )
    dump.add_argument(
        "map",
        nargs="?",
        metavar="MAP",
        help="a section or map name (default: every section)",
    )
    dump.add_argument(
        "--service",
        metavar="NS/NAME",
        help="only this Service's frontends and the flows, NAT bindings and affinity of them",
    )
    dump.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    _datapath_args(dump)

    cleanup = sub.add_parser(
        "cleanup",
        help="remove lbctl's datapath from this namespace (programs and pins, or IPVS mode's)",
        description="Without --kube-proxy: detach lbctl's programs from this network "
        "namespace's interfaces and cgroup and remove its pinned maps, and what its IPVS mode "
        "made (its virtual services, lbctl-ipvs0, its nftables table). With --kube-proxy: "
        "remove only what kube-proxy left (its iptables chains and the rules jumping to "
        "them, its nftables tables, its IPVS services and kube-ipvs0), nothing of lbctl's.",
    )
    _datapath_args(cleanup)
    cleanup.add_argument(
        "--kube-proxy",
        action="store_true",
        help="remove kube-proxy's leftovers instead, so the node can migrate to lbctl",
    )
    cleanup.add_argument(
        "--node-port-range",
        type=_config_value(parse_node_port_range),
        metavar="MIN-MAX",
        help="the cluster's NodePort range, for IPVS services on the node's addresses: "
        "kube-proxy's with --kube-proxy, else lbctl's own IPVS mode's when its nftables "
        "table is absent (default 30000-32767)",
    )
    cleanup.add_argument(
        "--force",
        action="store_true",
        help="remove lbctl's datapath even while a running agent holds its maps",
    )
    return p


def _config_value(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type from one of config's parsers (their errors name the fix)."""

    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def _node_args(run: argparse.ArgumentParser) -> None:
    from lbctl.agent import config

    g = run.add_argument_group("traffic from outside and from the node")
    g.add_argument(
        "--cluster-cidr",
        dest="cluster_cidrs",
        type=_config_value(config.parse_cidrs),
        metavar="CIDR[,CIDR]",
        help="the pods' CIDRs: clients inside are pods, others are masqueraded when they "
        "reach a ClusterIP, and pods are masqueraded when they reach an endpoint outside "
        "(kube-proxy's clusterCIDR; default: the Node's spec.podCIDRs, which tell only this "
        "node's pods, so pods of other nodes count as outside; without either nobody is "
        "told apart)",
    )
    g.add_argument(
        "--node-port-addresses",
        type=_config_value(config.parse_cidrs),
        metavar="CIDR[,CIDR]",
        help="NodePorts answer on the node's addresses within these (default: all of them)",
    )
    g.add_argument(
        "--localhost-nodeports",
        action=argparse.BooleanOptionalAction,
        help="NodePorts also answer on 127.0.0.1 for the node's own processes (default on)",
    )
    g.add_argument(
        "--masquerade-all",
        action="store_const",
        const=True,
        help="masquerade every client of a ClusterIP, as kube-proxy's masqueradeAll "
        "(externalTrafficPolicy Local frontends still keep the client's address)",
    )
    g.add_argument(
        "--node-ip",
        type=_config_value(config.parse_ipv4),
        metavar="IP",
        help="the address masqueraded flows leave with (default: the Node's InternalIP if it "
        "is local, else the first address of the external interfaces)",
    )
    g.add_argument(
        "--nat-port-range",
        type=_config_value(config.parse_port_range),
        metavar="MIN-MAX",
        help="source ports of masqueraded flows (default 61000-65535, outside the "
        "kernel's ephemeral range)",
    )
    g.add_argument(
        "--external-interfaces",
        type=_interfaces,
        metavar="IF[,IF...]",
        help="interfaces whose addresses serve NodePorts (default: every interface)",
    )
    g.add_argument(
        "--xdp",
        choices=["off", "generic", "native"],
        help="XDP fast path on the external interfaces (default off); native needs driver "
        "support, generic works everywhere",
    )
    g.add_argument(
        "--cgroup",
        dest="cgroup_path",
        metavar="PATH",
        help="cgroup v2 directory whose processes' sockets are balanced at connect time, or "
        "a directory with cgroup2 mounted at its unified (a hybrid host's /sys/fs/cgroup) "
        '(default: the root of the cgroup2 mount; "" turns the socket hooks off)',
    )


def _datapath_args(p: argparse.ArgumentParser, address_use: str = "") -> None:
    """--bpffs, --address and --timeout: how status, trace, maps dump and cleanup find
    the datapath, all alike (lbctl/cli/locate.py)."""
    from lbctl.cli.locate import DEFAULT_ADDRESS

    p.add_argument(
        "--bpffs",
        type=Path,
        metavar="DIR",
        help="lbctl's pinned maps (default: the running agent's, as its /statusz on --address "
        "says; with the agent down, the maps of lbctl's programs attached in this network "
        f"namespace; else {DEFAULT_PIN_DIR})",
    )
    p.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help="the agent's health server, to ask it where its maps are"
        f"{address_use} (its --healthz-bind-address; default {DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "--timeout", type=float, default=2.0, metavar="SECONDS", help="for the agent's answer"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "maps":
            from lbctl.cli import maps

            return maps.main(args)
        if args.command == "monitor":
            return _monitor(args)
        if args.command == "trace":
            from lbctl.cli import trace

            return trace.main(
                args.bpffs, args.address, args.src, args.dst, args.proto, args.output, args.timeout
            )
        if args.command == "status":
            from lbctl.cli import status

            return status.main(args.address, args.bpffs, args.output, args.timeout)
        return _cleanup(args)
    except Exception as err:  # the CLI's last line of defence
        log.debug("failure", exc_info=True)
        print(f"lbctl {args.command}: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from lbctl.agent import config, modes

    cfg = config.load(args.config) if args.config else config.Config()
    cfg = config.with_overrides(
        cfg,
        **{
            field: getattr(args, field)
            for field in (
                "kubeconfig",
                "in_cluster",
                "manifests",
                "hostname_override",
                "mode",
                "interfaces",
                "bpffs",
                "metrics_bind_address",
                "healthz_bind_address",
                "max_services",
                "max_backends",
                "max_slots",
                "ct_size",
                "nat_size",
                "max_source_ranges",
                "affinity_size",
                "table_size",
                "max_tables",
                "cluster_cidrs",
                "node_port_addresses",
                "localhost_nodeports",
                "masquerade_all",
                "node_ip",
                "nat_port_range",
                "external_interfaces",
                "cgroup_path",
                "xdp",
                "scheduler",
                "per_service_metrics",
            )
        },
    )
    config.validate(cfg, f"{args.config} and the flags" if args.config else "the flags")
    source = _source(cfg)  # not started yet: a bad kubeconfig stops us here
    # bcc compiles in a child process from now on, while the source is read.
    try:
        chosen = modes.select(cfg, _mode_origin(args))
    except modes.ModeError as err:
        raise modes.ModeError(f"no datapath can run: {err}") from None
    # The first sync builds hundreds of thousands of objects that all live on;
    # the cyclic collector would rescan them again and again (3x slower at 10,000
    # Services). Agent.sync freezes them when it is done and turns it back on.
    gc.disable()
    source.start()
    try:
        chosen = modes.settle(chosen, cfg)  # auto: a program that fails to load falls back
    except BaseException:
        source.stop()
        raise
    datapath = chosen.datapath
    log.info("datapath %s, %s", datapath.mode, chosen.reason)

    from lbctl.agent.http.server import Observability
    from lbctl.agent.loop import Agent, AgentOptions

    options = AgentOptions(
        interfaces=list(cfg.interfaces) if cfg.interfaces is not None else None,
        sync_period_s=cfg.sync_period_s,
        node_name=_node_name(cfg),
        addresses=cfg.address_policy(),
        node=cfg.node_config(),
        xdp=cfg.xdp,
        cgroup_path=cfg.cgroup_path,
        scheduler=cfg.scheduler,
        mode_reason=chosen.reason,
        configured_mode=cfg.mode,
    )
    agent = Agent(source, datapath, options)
    observe = Observability(agent)
    for problem in observe.start(
        config.parse_bind_address(cfg.metrics_bind_address),
        config.parse_bind_address(cfg.healthz_bind_address),
    ):
        log.error("%s", problem)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping; the datapath stays in place", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.run(stop)
    finally:
        observe.stop()
        datapath.close()
    return 0


def _mode_origin(args: argparse.Namespace) -> str:
    """What set the mode, for the reason `lbctl status` shows."""
    if args.mode:
        return f"chosen by --mode {args.mode}"
    if args.config:
        return f"chosen by mode in {args.config} (auto when it sets none)"
    return "chosen by the default (no --mode, no configuration file: auto)"


def _source(cfg: Config) -> Source:
    if cfg.manifests is not None:
        from lbctl.sources.manifests import ManifestSource

        if not cfg.manifests.is_dir():
            raise FileNotFoundError(f"manifests {cfg.manifests}: not a directory")
        return ManifestSource(cfg.manifests, _node_name(cfg))
    from lbctl.sources.kube import KubeSource, api_client

    node = _node_name(cfg)
    log.info("following the API server as node %s", node)
    return KubeSource(api_client(cfg.kubeconfig, cfg.in_cluster), node)


def _node_name(cfg: Config) -> str:
    return str(cfg.hostname_override or os.environ.get("NODE_NAME") or socket.gethostname()).lower()


def events_types() -> list[str]:
    from lbctl.datapath.ebpf.events import TYPES

    return list(TYPES)


def _monitor(args: argparse.Namespace) -> int:
    from lbctl.cli import monitor
    from lbctl.cli.locate import resolve

    types = [t for t in args.type.split(",") if t]
    unknown = [t for t in types if t not in events_types()]
    if unknown or not types:
        raise ValueError(
            f"--type {args.type!r}: choose among {', '.join(events_types())}, comma-separated"
        )
    if args.rate < 0 or (args.count is not None and args.count < 1):
        raise ValueError("--rate must be 0 or more and --count 1 or more")
    where = resolve(args.bpffs, args.address, args.timeout)
    reasons = [r for r in args.reason.split(",") if r]
    return monitor.main(
        where.path,
        types,
        args.service,
        reasons,
        args.client,
        args.output,
        args.rate,
        args.count,
        args.duration,
    )


def _cleanup(args: argparse.Namespace) -> int:
    """Each datapath removes its own: the eBPF programs and maps, then IPVS's."""
    if args.kube_proxy:
        return _cleanup_kube_proxy(args)
    from lbctl.cli.locate import resolve
    from lbctl.datapath.ebpf import cleanup

    # before anything is detached: with the agent down, the attached programs tell
    where = resolve(args.bpffs, args.address, args.timeout)
    if not args.force:
        cleanup.refuse_while_in_use(where.path)
    removed = cleanup.cleanup(where.path)
    print(f"tc programs (ingress, egress) detached from: {', '.join(removed.tc) or 'no interface'}")
    print(f"XDP program detached from: {', '.join(removed.xdp) or 'no interface'}")
    print(f"socket hooks detached: {', '.join(removed.hooks) or 'none'}")
    print(f"removed pinned maps: {', '.join(removed.pins) or 'none'} (under {where.path})")
    if not removed.pins:
        print(f"  {where.missing()}")
    from lbctl.datapath.ipvs import datapath as ipvs

    if ipvs.present():  # the IPVS fallback's virtual services, link and table
        for line in ipvs.cleanup(args.node_port_range):
            print(line)
    return 0


def _cleanup_kube_proxy(args: argparse.Namespace) -> int:
    from lbctl.cli import cleanup
    from lbctl.datapath.ipvs.owned import NODE_PORT_RANGE

    report = cleanup.cleanup(args.node_port_range or NODE_PORT_RANGE)
    for line in report.lines:
        print(line)
    for error in report.errors:
        print(f"lbctl cleanup --kube-proxy: {error}", file=sys.stderr)
    return 1 if report.errors else 0
