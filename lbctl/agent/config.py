"""The agent's configuration file (`lbctl run --config FILE`), after kube-proxy's
KubeProxyConfiguration.  A flag beats the file, which beats the defaults; null or
"" counts as unset (except for bind addresses, where "" disables the server);
relative paths are relative to the working directory.  See examples/lbctl-config.yaml.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import yaml

from lbctl.agent.node import AddressPolicy
from lbctl.datapath import DEFAULT_NAT_PORTS, NodeConfig
from lbctl.datapath.ebpf.settings import DEFAULT_PIN_DIR, BpfSettings
from lbctl.model import SCHEDULERS, IPNetwork
from lbctl.plan.scheduling import is_prime

API_VERSION = "lbctl.io/v1alpha1"
KIND = "LbctlConfiguration"
MODES = ("ebpf", "ipvs", "auto")
XDP_MODES = ("off", "generic", "native")
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BPF = BpfSettings()
_MAX_SIZE = 2**32 - 1  # BPF max_entries is a u32


_SOURCES = ("manifests", "kubeconfig", "in_cluster")


class ConfigError(ValueError):
    """The configuration is unreadable or invalid; the message says where and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Config:
    mode: str = "auto"  # ebpf, ipvs, or auto: ebpf if the kernel can run it, else ipvs
    hostname_override: str | None = None  # None: the CLI falls back to $NODE_NAME
    kubeconfig: Path | None = None
    in_cluster: bool = False
    manifests: Path | None = None
    interfaces: tuple[str, ...] | None = None  # None: every Ethernet interface
    bpffs: Path = DEFAULT_PIN_DIR
    metrics_bind_address: str = "127.0.0.1:10249"  # kube-proxy's default; "": disabled
    healthz_bind_address: str = "0.0.0.0:10256"  # "": disabled
    max_services: int = _BPF.max_services
    max_backends: int = _BPF.max_backends
    max_slots: int = _BPF.max_slots
    ct_size: int = _BPF.ct_size
    ct_tcp_timeout_s: int = _BPF.ct_tcp_timeout_s
    ct_tcp_syn_timeout_s: int = _BPF.ct_tcp_syn_timeout_s
    ct_tcp_closing_timeout_s: int = _BPF.ct_tcp_closing_timeout_s
    ct_udp_timeout_s: int = _BPF.ct_udp_timeout_s
    sync_period_s: int = 30
    nat_size: int = _BPF.nat_size
    max_source_ranges: int = _BPF.max_source_ranges
    affinity_size: int = _BPF.affinity_size
    table_size: int = _BPF.table_size
    max_tables: int = _BPF.max_tables
    cluster_cidrs: tuple[IPNetwork, ...] = ()  # pods, as kube-proxy's clusterCIDR
    node_port_addresses: tuple[IPNetwork, ...] | None = None  # None: every node address
    localhost_nodeports: bool = True
    masquerade_all: bool = False
    node_ip: ipaddress.IPv4Address | None = None  # None: chosen from the node's addresses
    nat_port_range: tuple[int, int] = DEFAULT_NAT_PORTS
    external_interfaces: tuple[str, ...] | None = None  # None: every interface
    cgroup_path: str | None = None  # None: the cgroup2 mount; "": no socket hooks
    xdp: str = "off"  # off, generic or native: the XDP fast path on the external interfaces
    scheduler: str = "random"  # backend choice of Services without lbctl.io/scheduler
    per_service_metrics: bool = True  # datapath counters per Service port (lb_fe_stats)

    def bpf_settings(self) -> BpfSettings:
        """The datapath's compile-time settings: pin directory, capacities, timeouts."""
        fields = [f for f, kind in _FIELDS.values() if kind in ("size", "duration")]
        shared = {f: getattr(self, f) for f in fields if f != "sync_period_s"}
        return BpfSettings(pin_dir=self.bpffs, service_counters=self.per_service_metrics, **shared)

    def address_policy(self) -> AddressPolicy:
        """Where NodePorts answer, and the node IP if one is set."""
        cidrs = self.node_port_addresses
        return AddressPolicy(
            node_port_cidrs=None
            if cidrs is None
            else tuple(c for c in cidrs if isinstance(c, ipaddress.IPv4Network)),
            localhost_node_ports=self.localhost_nodeports,
            interfaces=self.external_interfaces,
            node_ip=self.node_ip,
        )

    def node_config(self) -> NodeConfig:
        """The datapath's node settings (the masquerade address is found at run time)."""
        return NodeConfig(
            nat_ports=self.nat_port_range,
            masquerade_all=self.masquerade_all,
            cluster_cidrs=tuple(
                c for c in self.cluster_cidrs if isinstance(c, ipaddress.IPv4Network)
            ),
        )


# YAML key path -> (Config field, kind of value)
_FIELDS: dict[str, tuple[str, str]] = {
    "mode": ("mode", "str"),
    "hostnameOverride": ("hostname_override", "str"),
    "clientConnection.kubeconfig": ("kubeconfig", "path"),
    "clientConnection.inCluster": ("in_cluster", "bool"),
    "manifests": ("manifests", "path"),
    "interfaces": ("interfaces", "names"),
    "bpffs": ("bpffs", "path"),
    "metricsBindAddress": ("metrics_bind_address", "address"),
    "healthzBindAddress": ("healthz_bind_address", "address"),
    "capacity.maxServices": ("max_services", "size"),
    "capacity.maxBackends": ("max_backends", "size"),
    "capacity.maxSlots": ("max_slots", "size"),
    "capacity.conntrackSize": ("ct_size", "size"),
    "conntrack.tcpEstablishedTimeout": ("ct_tcp_timeout_s", "duration"),
    "conntrack.tcpSynTimeout": ("ct_tcp_syn_timeout_s", "duration"),
    "conntrack.tcpCloseWaitTimeout": ("ct_tcp_closing_timeout_s", "duration"),
    "conntrack.udpTimeout": ("ct_udp_timeout_s", "duration"),
    "syncPeriod": ("sync_period_s", "duration"),
    "capacity.natSize": ("nat_size", "size"),
    "capacity.maxSourceRanges": ("max_source_ranges", "size"),
    "capacity.affinitySize": ("affinity_size", "size"),
    "capacity.tableSize": ("table_size", "size"),
    "capacity.maxTables": ("max_tables", "size"),
    "clusterCIDR": ("cluster_cidrs", "cidrs"),
    "nodePortAddresses": ("node_port_addresses", "cidrs"),
    "localhostNodePorts": ("localhost_nodeports", "bool"),
    "masqueradeAll": ("masquerade_all", "bool"),
    "metrics.perService": ("per_service_metrics", "bool"),
    "nodeIP": ("node_ip", "ipv4"),
    "natPortRange": ("nat_port_range", "portrange"),
    "externalInterfaces": ("external_interfaces", "names"),
    "cgroupPath": ("cgroup_path", "cgroup"),
    "xdp": ("xdp", "str"),
    "scheduler": ("scheduler", "str"),
}
_KEYS = {"apiVersion", "kind", *_FIELDS}
_PATH_OF = {field: path for path, (field, _) in _FIELDS.items()}
_UNITS = {"h": 3600, "m": 60, "s": 1}
_EXPECTED = {
    "bool": "true or false",
    "size": "a whole number such as 65536",
    "duration": "a duration such as 60s, 10m or 1h30m",
    "names": "a list of interface names such as [eth0, eth1]",
    "cidrs": 'CIDRs such as [10.0.0.0/8] or "10.0.0.0/8,fd00::/64"',
    "ipv4": "an IPv4 address such as 192.168.0.2",
    "portrange": "a port range such as 61000-65535",
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([^\d.]*)")
_IFNAME = re.compile(r"[^\s/:]{1,15}")


def parse_duration(value: str | int) -> int:
    """Seconds in a Go duration ("90s", "10m", "1h30m", "24h0m0s") or a plain integer."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative; give a positive number of seconds")
        return value
    text, pos, total = value.strip(), 0, 0
    if text == "0":
        return 0
    if not text or text.startswith(("-", "+")):
        raise ValueError(f"{value!r} is not a positive duration; write e.g. 60s, 10m or 1h30m")
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(f"{value!r} is not a duration; write e.g. 60s, 10m or 1h30m")
        number, unit = match.groups()
        if unit in ("ms", "us", "µs", "ns"):
            raise ValueError(f"{value!r}: sub-second units are not supported; use h, m or s")
        if unit not in _UNITS:
            fix = f"add a unit: {number}s" if not unit else "the units are h, m and s"
            raise ValueError(f"{value!r}: {'missing' if not unit else 'unknown'} unit; {fix}")
        if "." in number:
            raise ValueError(f"{value!r}: fractions are not supported; write 1h30m, not 1.5h")
        total += int(number) * _UNITS[unit]
        pos = match.end()
    return total


def parse_cidrs(value: str | list[str]) -> tuple[IPNetwork, ...]:
    """CIDRs from a list or a comma-separated string ("10.0.0.0/8,fd00::/64")."""
    items = value.split(",") if isinstance(value, str) else value
    out = []
    for text in (t.strip() for t in items):
        if not text:
            continue
        try:
            out.append(ipaddress.ip_network(text))
        except ValueError:
            raise ValueError(
                f"{text!r} is not a CIDR (with no host bits set), e.g. 10.0.0.0/8"
            ) from None
    return tuple(out)


def parse_ipv4(value: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address such as 192.168.0.2") from None


def parse_port_range(value: str) -> tuple[int, int]:
    low, sep, high = value.strip().partition("-")
    if not sep or not low.isdigit() or not high.isdigit():
        raise ValueError(f"{value!r} is not a port range such as 61000-65535")
    first, last = int(low), int(high)
    if not 1024 <= first <= last <= 65535:
        raise ValueError(
            f"{value!r}: ports must run from low to high within 1024-65535; keep the range "
            "outside net.ipv4.ip_local_port_range so NAT ports never meet the node's own"
        )
    return first, last


def parse_bind_address(text: str) -> tuple[str, int] | None:
    """("host", port) from "host:port" or "[v6]:port"; None for "" (the server is disabled)."""
    if text == "":
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port; write e.g. 0.0.0.0:10249 or [::]:10249")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [::]:{port}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{text!r}: {host!r} is not an IP address; use e.g. 0.0.0.0, 127.0.0.1 or [::]"
        ) from None
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r}: port {port!r} is not a number from 0 to 65535")
    return host, int(port)


def load(path: Path) -> Config:
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; check the --config path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file: {err}") from None
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        raise ConfigError(f"{path}: not valid YAML ({detail}); fix the syntax") from None
    return parse(data, str(path))


def parse(data: object, source: str) -> Config:
    """The Config a parsed YAML document describes; `source` names it in errors."""
    if data is None:
        raise ConfigError(
            f"{source}: the file is empty; it needs at least apiVersion: {API_VERSION} "
            f"and kind: {KIND}"
        )
    values: dict[str, object] = {}
    _flatten(data, "", source, values)
    for key, want in (("apiVersion", API_VERSION), ("kind", KIND)):
        if values.get(key) != want:
            got = f"got {values[key]!r}" if key in values else "missing"
            raise ConfigError(f"{source}: {key}: {got}; set {key}: {want}")
    fields: dict[str, Any] = {}
    for path, (field, kind) in _FIELDS.items():
        if values.get(path) is not None:
            fields[field] = _convert(values[path], kind, path, source)
    config = Config(**{k: v for k, v in fields.items() if v is not None})
    _check_values(config, source)
    return config


def with_overrides(config: Config, **overrides: Any) -> Config:
    """`config` with each override that is not None (a flag that was given) applied.

    A source given as a flag replaces the file's source, whichever it was.
    """
    given: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()
    }
    if any(given.get(k) for k in _SOURCES):
        config = dataclasses.replace(config, manifests=None, kubeconfig=None, in_cluster=False)
    return dataclasses.replace(config, **{k: v for k, v in given.items() if v is not None})


def validate(config: Config, source: str = "the command line") -> None:
    """Check a merged configuration (file + flags); `source` names where it came from."""
    _check_values(config, source, merged=True)
    sources = {
        "manifests (--manifests)": config.manifests is not None,
        "clientConnection.kubeconfig (--kubeconfig)": config.kubeconfig is not None,
        "clientConnection.inCluster (--in-cluster)": config.in_cluster,
    }
    chosen = [name for name, on in sources.items() if on]
    if len(chosen) != 1:
        problem = (
            f"more than one source is set ({', '.join(chosen)})" if chosen else "no source is set"
        )
        raise ConfigError(
            f"{source}: {problem}; set exactly one source of Services: manifests: DIR "
            "(--manifests DIR), clientConnection.kubeconfig: FILE (--kubeconfig FILE) or "
            "clientConnection.inCluster: true (--in-cluster)"
        )


def _flatten(data: object, prefix: str, source: str, out: dict[str, object]) -> None:
    allowed = sorted({p[len(prefix) :].split(".")[0] for p in _KEYS if p.startswith(prefix)})
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the document"
        raise ConfigError(
            f"{source}: {where}: expected a mapping with keys {', '.join(allowed)}, "
            f"got {_typename(data)}"
        )
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            level = f"under {prefix.rstrip('.')}" if prefix else "at the top level"
            raise ConfigError(
                f"{source}: {path}: unknown key; {hint}valid keys {level}: {', '.join(allowed)}"
            )
        if path in _KEYS:
            out[path] = value
        elif value is not None:
            _flatten(value, path + ".", source, out)


def _convert(value: object, kind: str, path: str, source: str) -> object:
    ok = {
        "bool": isinstance(value, bool),
        "size": isinstance(value, int) and not isinstance(value, bool),
        "duration": isinstance(value, str | int) and not isinstance(value, bool),
        "names": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "cidrs": isinstance(value, str)
        or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
    }.get(kind, isinstance(value, str))
    if not ok:
        expected = _EXPECTED.get(kind, "a string (quote the value)")
        raise ConfigError(
            f"{source}: {path}: expected {expected}, got {_typename(value)} {value!r}"
        )
    if kind == "duration":
        try:
            return parse_duration(cast("str | int", value))
        except ValueError as err:
            raise ConfigError(f"{source}: {path}: {err}") from None
    if kind == "names":
        return tuple(cast("list[str]", value))
    if kind in ("cidrs", "ipv4", "portrange"):
        if value in ("", []):
            return None  # unset: the default (for nodePortAddresses, as kube-proxy: all)
        parse: dict[str, Callable[[Any], object]] = {
            "cidrs": parse_cidrs,
            "ipv4": parse_ipv4,
            "portrange": parse_port_range,
        }
        try:
            return parse[kind](value)
        except ValueError as err:
            raise ConfigError(f"{source}: {path}: {err}") from None
    if kind == "cgroup":  # "" turns the socket hooks off
        return value
    if kind == "path":  # "" means unset, as kubeconfig: "" does for kube-proxy
        return Path(cast(str, value)) if value else None
    return value if value or kind != "str" else None  # "" means unset, but disables an address


def _check_values(config: Config, source: str, merged: bool = False) -> None:
    """Each value on its own; `merged`: also what only the final settings can say."""

    def fail(field: str, problem: str) -> ConfigError:
        return ConfigError(f"{source}: {_PATH_OF[field]}: {problem}")

    if config.xdp not in XDP_MODES:
        raise fail("xdp", f"unknown XDP mode {config.xdp!r}; set xdp: off, generic or native")
    if not is_prime(config.table_size):
        raise fail(
            "capacity.tableSize",
            f"{config.table_size} is not a prime; a Maglev table needs a prime size, "
            "such as 16381, 32749 or 65521 (at least 100 times the most backends a "
            "maglev or sh Service will have)",
        )
    if config.max_tables > 0xFFFF:
        raise fail("capacity.maxTables", "at most 65535 table rows; set a smaller number")
    if config.scheduler not in SCHEDULERS:
        raise fail(
            "scheduler",
            f"unknown scheduler {config.scheduler!r}; set scheduler: one of "
            f"{', '.join(SCHEDULERS)}",
        )
    if config.mode not in MODES:
        raise fail(
            "mode", f"unknown mode {config.mode!r}; set mode: ebpf, ipvs or auto (the default)"
        )
    if not config.bpffs.is_absolute():
        raise fail("bpffs", f"{str(config.bpffs)!r} is not absolute; use e.g. {DEFAULT_PIN_DIR}")
    if config.external_interfaces is not None:
        for name in config.external_interfaces:
            if not _IFNAME.fullmatch(name):
                raise fail("external_interfaces", f"{name!r} is not an interface name")
    if config.interfaces is not None:
        if not config.interfaces:
            raise fail("interfaces", "empty list; leave it out to use every Ethernet interface")
        for name in config.interfaces:
            if not _IFNAME.fullmatch(name):
                raise fail("interfaces", f"{name!r} is not an interface name (1-15 characters)")
    for field in ("metrics_bind_address", "healthz_bind_address"):
        try:
            parse_bind_address(getattr(config, field))
        except ValueError as err:
            raise fail(field, f'{err}; or "" to disable the server') from None
    for field, kind in _FIELDS.values():
        value = getattr(config, field)
        if kind == "size" and not 0 < value <= _MAX_SIZE:
            raise fail(field, f"{value} is out of range; give a whole number from 1 to {_MAX_SIZE}")
        if kind == "duration" and value <= 0:
            raise fail(field, f"{value}s is not positive; give a duration such as 60s or 1h")


def _typename(value: object) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), "nothing" if value is None else type(value).__name__)
