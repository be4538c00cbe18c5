"""Datapaths: what turns the plan into kernel state.

What every datapath shares, whatever it programs: the `Datapath` protocol the
agent drives, `DatapathError`, the node's settings (`NodeConfig`) and the
result of a probe (`Probe`).  Each datapath is a subpackage that owns its
whole lifecycle: ebpf/ (tc, XDP and socket programs and their maps) and
ipvs/ (IPVS and an nftables table).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from lbctl.datapath.ebpf import tc
    from lbctl.plan.planner import Frontend, FrontendKey, PlanDiff

DEFAULT_NAT_PORTS = (61000, 65535)  # above Linux's default ephemeral range (32768-60999)


class DatapathError(Exception):
    """A frontend could not be programmed; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    snat_address: ipaddress.IPv4Address | None = None  # None: no masquerading
    nat_ports: tuple[int, int] = DEFAULT_NAT_PORTS
    masquerade_all: bool = False
    cluster_cidrs: tuple[ipaddress.IPv4Network, ...] = ()  # the local traffic detector
    netns_cookie: int = 0  # the node's network namespace, for the socket hooks
    node_cidrs: bool = False  # cluster_cidrs are this node's spec.podCIDRs (none was given)
    host_addresses: frozenset[ipaddress.IPv4Address] = frozenset()  # the node's own


@dataclasses.dataclass
class Probe:
    """What was checked, in order, and the first thing missing (None: all present)."""

    checked: list[str] = dataclasses.field(default_factory=list)
    missing: str | None = None

    @property
    def ok(self) -> bool:
        return self.missing is None

    def summary(self) -> str:
        if self.missing is None:
            return "present: " + ", ".join(self.checked)
        done = f" (present before it: {', '.join(self.checked)})" if self.checked else ""
        return f"{self.missing}{done}"


class Datapath(Protocol):
    mode: str

    def load(self) -> None:
        """Finish what the constructor started (compiling); a no-op when done."""
        ...

    def configure(self, conf: NodeConfig) -> None:
        """The node's address, NAT ports and cluster CIDRs."""
        ...

    def collect_garbage(self) -> list[str]:
        """Forget flows that timed out; what an operator should know (a full table)."""
        ...

    def reconcile(
        self, desired: dict[FrontendKey, Frontend], remove_stale: bool = True
    ) -> list[str]: ...

    def apply(self, change: PlanDiff) -> list[str]: ...

    def attach(self, links: list[tc.Link]) -> list[str]: ...

    def forget_missing(self, present: list[tc.Link]) -> None: ...

    def forget_detached(self) -> list[str]:
        """Interfaces whose program was removed behind lbctl's back; re-attached next."""
        ...

    def attach_xdp(self, links: list[tc.Link], mode: str) -> list[str]: ...

    def attach_cgroup(self, path: str | None) -> list[str]: ...

    def describe(self) -> dict[str, Any]:
        """What /statusz says of this datapath, beside the agent's own options."""
        ...

    def close(self) -> None: ...
