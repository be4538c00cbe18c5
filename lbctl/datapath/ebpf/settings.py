"""Compile-time settings of the BPF programs, in one place.

Every map size, timeout and switch the C code uses reaches bcc from here as a
-D flag; the C sources define none of them, so a missing one is a compile
error rather than a silent default.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

DEFAULT_PIN_DIR = Path("/sys/fs/bpf/lbctl")
SECOND_NS = 1_000_000_000


def bpf_source_dir() -> Path:
    """Where the C sources live: the source tree, or the installed copy."""
    here = Path(__file__).resolve().parents[3] / "bpf"
    if (here / "lbctl.h").exists():
        return here
    import sys

    installed = Path(sys.prefix) / "share" / "lbctl" / "bpf"
    if (installed / "lbctl.h").exists():
        return installed
    raise FileNotFoundError(
        f"lbctl's BPF sources are missing (looked in {here} and {installed}); reinstall lbctl"
    )


@dataclasses.dataclass(frozen=True)
class BpfSettings:
    pin_dir: Path = DEFAULT_PIN_DIR
    max_services: int = 65536
    max_backends: int = 65536
    max_slots: int = 262144
    ct_size: int = 262144
    nat_size: int = 131072
    max_source_ranges: int = 16384
    max_cluster_cidrs: int = 64
    sock_rev_size: int = 65536
    affinity_size: int = 65536
    table_size: int = 16381  # entries of a Maglev/wrr row: a prime
    max_tables: int = 64  # rows of lb_tables: frontends using wrr, maglev or sh
    lc_scan: int = 32  # slots an lc pick compares at most
    ct_tcp_timeout_s: int = 86400
    ct_tcp_syn_timeout_s: int = 60
    ct_tcp_closing_timeout_s: int = 10
    ct_udp_timeout_s: int = 60
    ct_refresh_s: int = 1
    nat_reuse_ms: int = 1000  # a closed flow's NAT port is free again after this quiet time
    nat_reuse_acked_ms: int = 1  # ... or this soon after its last ACK (or a RST) passed
    fib_redirect: bool = True
    service_counters: bool = True  # lb_fe_stats entries: per-Service packets and drops
    events: bool = True  # the event sites (`lbctl monitor`); off: compiled out (benchmarks)

    def cflags(self) -> list[str]:
        defines: dict[str, str | int] = {
            "LBCTL_PIN_DIR": f'"{self.pin_dir}"',
            "LBCTL_MAX_SERVICES": self.max_services,
            "LBCTL_MAX_BACKENDS": self.max_backends,
            "LBCTL_MAX_SLOTS": self.max_slots,
            "LBCTL_CT_SIZE": self.ct_size,
            "LBCTL_NAT_SIZE": self.nat_size,
            "LBCTL_MAX_SOURCE_RANGES": self.max_source_ranges,
            "LBCTL_MAX_CLUSTER_CIDRS": self.max_cluster_cidrs,
            "LBCTL_SOCK_REV_SIZE": self.sock_rev_size,
            "LBCTL_AFFINITY_SIZE": self.affinity_size,
            "LBCTL_TABLE_SIZE": self.table_size,
            "LBCTL_TABLES": self.max_tables,
            "LBCTL_LC_SCAN": self.lc_scan,
            "LBCTL_CT_TCP_TIMEOUT_NS": f"{self.ct_tcp_timeout_s * SECOND_NS}ULL",
            "LBCTL_CT_TCP_SYN_TIMEOUT_NS": f"{self.ct_tcp_syn_timeout_s * SECOND_NS}ULL",
            "LBCTL_CT_TCP_CLOSING_TIMEOUT_NS": f"{self.ct_tcp_closing_timeout_s * SECOND_NS}ULL",
            "LBCTL_CT_UDP_TIMEOUT_NS": f"{self.ct_udp_timeout_s * SECOND_NS}ULL",
            "LBCTL_CT_REFRESH_NS": f"{self.ct_refresh_s * SECOND_NS}ULL",
            "LBCTL_NAT_REUSE_NS": f"{self.nat_reuse_ms * SECOND_NS // 1000}ULL",
            "LBCTL_NAT_REUSE_ACKED_NS": f"{self.nat_reuse_acked_ms * SECOND_NS // 1000}ULL",
            "LBCTL_FIB_REDIRECT": int(self.fib_redirect),
            "LBCTL_EVENTS": int(self.events),
        }
        flags = [f"-I{bpf_source_dir()}"]
        flags += [f"-D{name}={value}" for name, value in defines.items()]
        return flags


_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def bpf_program_text(main: str = "lbctl.c") -> str:
    """The program's source with its local headers inlined.

    bcc rewrites map calls (`map.lookup(...)`) only in the text it is given,
    not in files that text includes, so the small headers under bpf/ are
    pasted in here, each once, in include order.
    """
    root = bpf_source_dir()
    seen: set[str] = set()

    def expand(name: str) -> list[str]:
        if name in seen:
            return []
        seen.add(name)
        out = [f'#line 1 "{name}"']
        for number, line in enumerate((root / name).read_text().splitlines(), start=1):
            match = _LOCAL_INCLUDE.match(line)
            if match:
                out += expand(match.group(1))
                out.append(f'#line {number + 1} "{name}"')
            else:
                out.append(line)
        return out

    return "\n".join(expand(main)) + "\n"
