"""Moving one map's entries into a map of another layout or size, and keeping up.

A `MapMove` writes the entries of one or more source maps (the pinned maps
of the running datapath, or of an upgrade a crash interrupted) into a
target map, converting each entry field by field (lbctl/datapath/ebpf/upgrade/convert.py).
It runs three times per source:

1. `copy`: every entry, before the new programs run (a fresh target is
   written in batches); it remembers a digest of each source entry;
2. `delta` before the swap, and again after it: only the entries the old
   programs changed since (their digest differs) are written again.

An entry the target lacks is added (BPF_NOEXIST: the new programs' own
entries win); one both hold is merged by the map's rule:

- "newest" (the default): the entry with the later `last_seen_ns` wins
  (conntrack, affinity); without that field the target's entry stays,
  unless it is still what the copy wrote (then the source's change wins);
- "add" (counters: lb_stats, lb_conns, lb_fe_stats): the source's
  increments since the copy are added to the target, so no packet or flow
  is counted twice or lost; with no copy to compare with (a source left by a
  crash) the larger count wins.

Array entries that are all zero are not written (a new array is zero).
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import sys
from array import array
from collections.abc import Callable, Iterable

from lbctl.datapath.ebpf import libbpf
from lbctl.datapath.ebpf.upgrade.convert import Conversion
from lbctl.datapath.ebpf.upgrade.mapspec import MapSpec
from lbctl.datapath.ebpf.upgrade.rawmap import ARRAYS, RawMap
from lbctl.datapath.ebpf.upgrade.structs import Leaf

ADDITIVE = {"lb_stats", "lb_conns", "lb_fe_stats"}
Fix = Callable[[bytes], bytes | None]


@dataclasses.dataclass
class Counts:
    written: int = 0  # entries written to the target
    unconvertible: int = 0  # a value did not fit its new field, or an index is out of range
    refused: int = 0  # the kernel refused the write (the map is full)

    def add(self, other: Counts) -> None:
        self.written += other.written
        self.unconvertible += other.unconvertible
        self.refused += other.refused


class _Digests:
    """Digests of entries as they were: a sorted array, and a set of later ones."""

    def __init__(self, values: Iterable[int] = ()) -> None:
        self._sorted = array("q", sorted(values))
        self._more: set[int] = set()

    def values(self) -> Iterable[int]:
        return [*self._sorted, *self._more]

    def __contains__(self, digest: int) -> bool:
        if digest in self._more:
            return True
        i = bisect.bisect_left(self._sorted, digest)
        return i < len(self._sorted) and self._sorted[i] == digest

    def add(self, digest: int) -> None:
        self._more.add(digest)

    def missing(self, digests: list[int]) -> list[int]:
        """Indexes of the digests not held: one pass over both, sorted."""
        held, more, out = self._sorted, self._more, []
        order = sorted(range(len(digests)), key=digests.__getitem__)
        at, end = 0, len(held)
        for i in order:
            d = digests[i]
            at = bisect.bisect_left(held, d, at, end)
            if (at == end or held[at] != d) and d not in more:
                out.append(i)
        return sorted(out)


@dataclasses.dataclass
class Source:
    """One source map of a move, with its conversions into the target's layout."""

    raw: RawMap
    key: Conversion
    value: Conversion
    key_fix: Fix | None = None  # after conversion: lb_tables moves rows
    value_fix: Fix | None = None
    seen: _Digests | None = None  # digests of its entries at the copy
    base: dict[bytes, bytes] | None = None  # "add" maps: converted values at the copy

    @property
    def as_is(self) -> bool:
        """Entries need no change at all (the same layout, no fix)."""
        plain = self.key_fix is None and self.value_fix is None
        return plain and self.key.identical and self.value.identical

    def convert(self, key: bytes, value: bytes, slot_out: int) -> tuple[bytes, bytes] | None:
        nk = self.key(key)
        if nk is not None and self.key_fix is not None:
            nk = self.key_fix(nk)
        if nk is None:
            return None
        slot_in = self.raw.slot
        size_in = self.value.old.size
        parts = []
        for cpu in range(self.raw.ncpus):
            nv = self.value(value[cpu * slot_in : cpu * slot_in + size_in])
            if nv is not None and self.value_fix is not None:
                nv = self.value_fix(nv)
            if nv is None:
                return None
            parts.append(nv.ljust(slot_out, b"\0"))
        return nk, b"".join(parts)


class MapMove:
    """Entries of sources into one target map (see the module's docstring)."""

    def __init__(self, spec: MapSpec, target: RawMap) -> None:
        self.spec = spec
        self.target = target
        self.rule = "add" if spec.name in ADDITIVE else "newest"
        self.array = target.info.kind in ARRAYS
        self.written = _Digests()  # what this move wrote to the target
        self._last_seen = spec.value.leaf("last_seen_ns") if not target.percpu else None
        self._counters = [leaf for leaf in spec.value.leaves if leaf.kind in ("u", "s")]

    def copy(self, source: Source, fresh: bool, prefer_source: bool) -> Counts:
        """All of the source's entries; `fresh`: the target is empty and not served yet."""
        counts, digests, written = Counts(), array("q"), array("q")
        base: dict[bytes, bytes] | None = {} if self.rule == "add" else None
        # The same layout and nothing to fix: entries go over as they are, a chunk a batch.
        as_is = fresh and source.as_is and base is None and not self.array
        for chunk in source.raw.chunks():
            digests.extend([hash(key + value) for key, value in chunk])
            if as_is:
                batch = chunk
            else:
                batch = self._converted(source, chunk, base, counts)
                if not fresh:
                    for moved in batch:
                        self._merge(source, moved, prefer_source, None, counts)
                    continue
            if batch:
                failed = self.target.write(batch)
                counts.refused += len(failed)
                counts.written += len(batch) - len(failed)
                refused = {key for key, _ in failed}
                written.extend([hash(k + v) for k, v in batch if k not in refused])
        self.written = _Digests([*self.written.values(), *written])
        source.seen, source.base = _Digests(digests), base
        return counts

    def _converted(
        self,
        source: Source,
        chunk: list[tuple[bytes, bytes]],
        base: dict[bytes, bytes] | None,
        counts: Counts,
    ) -> list[tuple[bytes, bytes]]:
        """A chunk in the target's layout; an array's zero entries left out."""
        out = []
        for key, value in chunk:
            zero = self.array and not any(value)
            if zero and base is None:
                continue
            moved = source.convert(key, value, self.target.slot)
            if moved is None:
                counts.unconvertible += 1
                continue
            if base is not None:
                base[key] = moved[1]
            if not zero:
                out.append(moved)
        return out

    def delta(self, source: Source) -> Counts:
        """The entries the source changed since `copy`, merged into the target."""
        counts = Counts()
        seen = source.seen if source.seen is not None else _Digests()
        for chunk in source.raw.chunks():
            changed = seen.missing([hash(key + value) for key, value in chunk])
            for i in changed:
                self._delta_one(source, *chunk[i], counts)
        return counts

    def _delta_one(self, source: Source, key: bytes, value: bytes, counts: Counts) -> None:
        assert source.seen is not None
        source.seen.add(hash(key + value))
        moved = source.convert(key, value, self.target.slot)
        if moved is None:
            counts.unconvertible += 1
            return
        before = source.base.get(key) if source.base is not None else None
        self._merge(source, moved, False, before, counts)
        if source.base is not None:
            source.base[key] = moved[1]

    def _merge(
        self,
        source: Source,
        moved: tuple[bytes, bytes],
        prefer_source: bool,
        base: bytes | None,
        counts: Counts,
    ) -> None:
        key, value = moved
        for _ in range(3):  # the programs may add or drop the key meanwhile
            have = self.target.lookup(key)
            if have is None:
                rc = self.target.update(key, value, libbpf.BPF_NOEXIST)
                if rc == 0:
                    self._wrote(key, value, counts)
                    return
                if rc != -errno.EEXIST:  # EEXIST: a program added it just now; merge
                    counts.refused += 1
                    return
                continue
            if have == value:
                return
            merged = self._resolve(key, have, value, prefer_source, base)
            if merged == have:
                return
            rc = self.target.update(key, merged, libbpf.BPF_EXIST)
            if rc == 0:
                self._wrote(key, merged, counts)
                return
            if rc != -errno.ENOENT:  # ENOENT: a program deleted it just now; add it
                counts.refused += 1
                return
        counts.refused += 1

    def _wrote(self, key: bytes, value: bytes, counts: Counts) -> None:
        counts.written += 1
        self.written.add(hash(key + value))

    def _resolve(
        self, key: bytes, have: bytes, new: bytes, prefer_source: bool, base: bytes | None
    ) -> bytes:
        if self.rule == "add":
            return self._add(have, new, base)
        if hash(key + have) in self.written:
            return new  # the target still holds what this move wrote: the source moved on
        if self._last_seen is not None:
            mine, theirs = _int(have, self._last_seen), _int(new, self._last_seen)
            if theirs != mine:
                return new if theirs > mine else have
        return new if prefer_source else have

    def _add(self, have: bytes, new: bytes, base: bytes | None) -> bytes:
        out = bytearray(have)
        slot = self.target.slot
        for cpu in range(self.target.ncpus):
            for leaf in self._counters:
                for i in range(leaf.count):
                    at = cpu * slot + leaf.offset + i * leaf.size
                    mine, theirs = _read(have, at, leaf), _read(new, at, leaf)
                    if base is None:
                        total = max(mine, theirs)
                    else:
                        total = mine + theirs - _read(base, at, leaf)
                    _store(out, at, leaf, total)
        return bytes(out)


def _read(raw: bytes, at: int, leaf: Leaf) -> int:
    return int.from_bytes(raw[at : at + leaf.size], sys.byteorder, signed=leaf.kind == "s")


def _store(out: bytearray, at: int, leaf: Leaf, value: int) -> None:
    bits = leaf.size * 8
    value &= (1 << bits) - 1  # counters wrap as the program's would
    out[at : at + leaf.size] = value.to_bytes(leaf.size, sys.byteorder)


def _int(raw: bytes, leaf: Leaf) -> int:
    return _read(raw, leaf.offset, leaf)
