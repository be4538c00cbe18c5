"""What each IPVS virtual service puts in the nftables table and on the dummy link.

A virtual service contributes elements to the table's sets (its own
`address . protocol . port` entries, its source ranges, its backends'
addresses in `hairpin`) and, unless it is a NodePort, its address to the
dummy link.  Several virtual services may share an element (a backend
address in `hairpin`) or an address (a ClusterIP with several ports), so
`Contributions` counts references: an element or address is wanted while
some virtual service holds it, and `take` tells what changed since it was
last called, with a cost that follows the virtual services touched, not the
number of Services.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from lbctl.datapath import NodeConfig
from lbctl.datapath.ipvs import nftables
from lbctl.model import Protocol
from lbctl.plan.planner import (
    CLUSTER_IP,
    NODE_PORT,
    SCOPE_ALL,
    SCOPE_EXTERNAL,
    Frontend,
    FrontendKey,
)

VsKey = tuple[str, int, int]  # address, port, IPPROTO_*
Element = tuple[str, Any]  # (TableContent field, the element), e.g. ("hairpin", "10.244.0.5")


def vs_key(key: FrontendKey) -> VsKey:
    return (str(key.address), key.port, key.protocol.number)


def deciding(frontends: Mapping[FrontendKey, Frontend], key: VsKey) -> Frontend | None:
    """The frontend that decides a virtual service: the outside twin when there is one."""
    address, port, proto = key
    for scope in (SCOPE_EXTERNAL, SCOPE_ALL):
        fe = frontends.get(
            FrontendKey(ipaddress.IPv4Address(address), port, Protocol(proto), scope)
        )
        if fe is not None:
            return fe
    return None


@dataclasses.dataclass(frozen=True)
class Contribution:
    elements: frozenset[Element] = frozenset()
    address: str | None = None  # on the dummy link


def contribution(key: VsKey, fe: Frontend | None) -> Contribution:
    """What the virtual service `key`, decided by `fe`, contributes (nothing without one)."""
    if fe is None:
        return Contribution()
    entry: nftables.Entry = (key[0], fe.key.protocol.name.lower(), key[1])
    elements: set[Element] = {("frontends", entry)}
    if fe.kind == CLUSTER_IP:
        elements.add(("clusterip", entry))
    elif not fe.local:
        elements.add(("external", entry))
    if not fe.backends:
        elements.add(("drop" if fe.drop_empty else "reject", entry))
    if fe.source_ranges:
        elements.add(("ranged", entry))
        elements |= {("allowed", (*entry, str(net))) for net in fe.source_ranges}
    elements |= {("hairpin", str(b.address)) for b in fe.backends}
    return Contribution(frozenset(elements), key[0] if fe.kind != NODE_PORT else None)


@dataclasses.dataclass
class Delta:
    """Net changes since the last `take`: elements by field, and link addresses."""

    add: dict[str, set[Any]] = dataclasses.field(default_factory=dict)
    delete: dict[str, set[Any]] = dataclasses.field(default_factory=dict)
    addresses_added: set[str] = dataclasses.field(default_factory=set)
    addresses_removed: set[str] = dataclasses.field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.add or self.delete or self.addresses_added or self.addresses_removed)


class Contributions:
    """Every virtual service's contribution, with reference counts of what they share."""

    @classmethod
    def of(cls, frontends: Mapping[FrontendKey, Frontend]) -> Contributions:
        """Every virtual service of these frontends, counted from scratch (a start, no delta)."""
        held = cls()
        for key in {vs_key(k) for k in frontends}:
            held.set(key, contribution(key, deciding(frontends, key)))
        held.take()
        return held

    def __init__(self) -> None:
        self.by_vs: dict[VsKey, Contribution] = {}
        self.elements: Counter[Element] = Counter()
        self.addresses: Counter[str] = Counter()
        self._was_elements: dict[Element, bool] = {}  # held before the first change since take
        self._was_addresses: dict[str, bool] = {}

    def set(self, key: VsKey, new: Contribution) -> None:
        """Replace what `key` contributes; cost: the size of its old and new contributions."""
        old = self.by_vs.get(key, Contribution())
        if new == old:
            return
        if new.elements or new.address:
            self.by_vs[key] = new
        else:
            self.by_vs.pop(key, None)
        _move(self.elements, self._was_elements, old.elements - new.elements, -1)
        _move(self.elements, self._was_elements, new.elements - old.elements, +1)
        if old.address != new.address:
            if old.address is not None:
                _move(self.addresses, self._was_addresses, (old.address,), -1)
            if new.address is not None:
                _move(self.addresses, self._was_addresses, (new.address,), +1)

    def take(self) -> Delta:
        """What became wanted or unwanted since the last call."""
        delta = Delta()
        for element, was in self._was_elements.items():
            now = element in self.elements
            if now != was:
                field, value = element
                (delta.add if now else delta.delete).setdefault(field, set()).add(value)
        for address, was in self._was_addresses.items():
            now = address in self.addresses
            if now and not was:
                delta.addresses_added.add(address)
            elif was and not now:
                delta.addresses_removed.add(address)
        self._was_elements.clear()
        self._was_addresses.clear()
        return delta

    def content(self, node: NodeConfig) -> nftables.TableContent:
        """The whole table: every wanted element, and the node's settings (for full writes)."""
        fields: dict[str, set[Any]] = {name: set() for name in nftables.ELEMENT_SETS}
        for field, value in self.elements:
            fields[field].add(value)
        return nftables.TableContent(
            cluster_cidrs=frozenset(str(c) for c in node.cluster_cidrs),
            masquerade_all=node.masquerade_all,
            clusterip=frozenset(fields["clusterip"]),
            external=frozenset(fields["external"]),
            frontends=frozenset(fields["frontends"]),
            reject=frozenset(fields["reject"]),
            drop=frozenset(fields["drop"]),
            ranged=frozenset(fields["ranged"]),
            allowed=frozenset(fields["allowed"]),
            hairpin=frozenset(fields["hairpin"]),
        )


def _move(counts: Counter[Any], was: dict[Any, bool], items: Iterable[Any], step: int) -> None:
    for item in items:
        if item not in was:
            was[item] = item in counts
        counts[item] += step
        if counts[item] <= 0:
            del counts[item]


class TableSync:
    """The IPVS datapath's nftables side: contributions in, writes of the table out.

    `apply` (a plan diff) costs what the touched virtual services contribute
    and at most one nft transaction of element changes; `configure` (node
    settings) and `rewrite` (the first sync and the periodic resync) write the
    whole table."""

    def __init__(self, writer: nftables.TableWriter | None = None) -> None:
        self.held = Contributions()
        self.nft = writer if writer is not None else nftables.TableWriter()
        self.node = NodeConfig()

    def configure(self, node: NodeConfig) -> list[str]:
        self.node = node
        return self.nft.write(self.held.content(node))

    def reset(self, frontends: Mapping[FrontendKey, Frontend]) -> None:
        """Count every virtual service again (a resync); `rewrite` writes the result."""
        self.held = Contributions.of(frontends)

    def rewrite(self) -> list[str]:
        """The whole table, whatever the mirror says: someone may have changed or deleted it."""
        return self.nft.write(self.held.content(self.node), retry=True)

    def apply(
        self, frontends: Mapping[FrontendKey, Frontend], touched: Iterable[VsKey]
    ) -> tuple[Delta, list[str]]:
        """These virtual services as `frontends` now decide them; the net change (its
        link addresses are the caller's to program) and the table's new problems."""
        for key in touched:
            self.held.set(key, contribution(key, deciding(frontends, key)))
        delta = self.held.take()
        return delta, self.nft.update(delta.add, delta.delete)
