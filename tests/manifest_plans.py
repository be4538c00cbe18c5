"""The real planner fed from a manifest directory, one diff per step, as the agent's loop does."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from lbctl.model import ServiceTable
from lbctl.plan.planner import Frontend, FrontendKey, NodeContext, PlanDiff, Planner
from lbctl.sources.manifests import ManifestSource


class ManifestPlans:
    def __init__(self, directory: Path, node_addresses: tuple[str, ...] = ()) -> None:
        self.source = ManifestSource(directory, node_name="node")
        self.table = ServiceTable()
        self.planner = Planner()
        addresses = tuple(ipaddress.IPv4Address(a) for a in node_addresses)
        self.planner.set_node(self.table, NodeContext("node", addresses))

    def step(self) -> PlanDiff:
        """What changed in the directory since the last step, as the planner's diff."""
        refs = self.source.poll(self.table)
        return self.planner.update(self.table, refs) if refs else PlanDiff()

    def frontends(self) -> dict[FrontendKey, Frontend]:
        return self.planner.frontends()


def touched(change: PlanDiff) -> set[Any]:
    """The virtual services (address, port, IPPROTO_*) a diff touches, as IpvsDatapath.apply
    counts them."""
    from lbctl.datapath.ipvs.contributions import vs_key

    return {vs_key(k) for k in change.removals} | {vs_key(fe.key) for fe in change.upserts}


class Unscannable(dict[Any, Any]):
    """The frontends, readable by key only: a diff's cost must follow what it touches, so
    IpvsDatapath.apply looking at every frontend fails the test (a count, not a timing)."""

    def _scan(self, *args: Any) -> Any:
        raise AssertionError("a diff looked at every frontend")

    __iter__ = keys = values = items = copy = __len__ = _scan
