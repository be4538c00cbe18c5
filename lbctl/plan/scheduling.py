"""The schedulers' tables and hashes, and a reference model of the BPF choice.

The datapath (bpf/sched.h) picks a backend for a new flow; the tables it
reads for wrr, maglev and sh are built here, and the hashes it computes are
reproduced here bit for bit, so tests can hold the programs to this model.

Tables name backends by their (address, port, protocol) target and are
built from those alone, sorted, so two nodes with the same backends build
the same table and pick the same backend for the same flow.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TypeVar

from lbctl.model import SCHEDULERS

T = TypeVar("T")

RANDOM, RR, WRR, MAGLEV, SH, LC = SCHEDULERS
TABLE_SCHEDULERS = (WRR, MAGLEV, SH)  # the ones that need an lb_tables row

HASH_SEED = 0x6C62636C  # LB_HASH_SEED of bpf/lbctl.h
DEFAULT_TABLE_SIZE = 16381
MAX_WEIGHT = 100
_MASK = 0xFFFFFFFF


def mix32(h: int) -> int:
    """lb_mix32() of bpf/sched.h."""
    h &= _MASK
    h ^= h >> 16
    h = (h * 0x7FEB352D) & _MASK
    h ^= h >> 15
    h = (h * 0x846CA68B) & _MASK
    h ^= h >> 16
    return h


def source_hash(saddr: int) -> int:
    """lb_hash_source(): saddr is the raw __be32 field (layout.ip4 of the address)."""
    return mix32(HASH_SEED ^ saddr)


def flow_hash(saddr: int, daddr: int, sport: int, dport: int, proto: int) -> int:
    """lb_hash_flow(): addresses and ports as raw fields (layout.ip4, layout.port)."""
    h = source_hash(saddr)
    h = mix32(h ^ daddr)
    h = mix32(h ^ ((sport << 16) | dport))
    return mix32(h ^ proto)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def _name_hashes(name: str) -> tuple[int, int]:
    digest = hashlib.blake2b(name.encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def maglev_table(names: Sequence[str], size: int = DEFAULT_TABLE_SIZE) -> list[int]:
    """A Maglev lookup table (Eisenbud et al., NSDI 2016): entry -> index into
    `names`.  Each backend fills the table along its own permutation, given
    by a hash of its name, taking turns; a backend's removal frees only its
    own entries for the others (and moves few beyond them)."""
    if not names:
        return []
    if not is_prime(size):
        raise ValueError(f"a Maglev table size must be a prime, not {size}")
    if len(names) > size:
        raise ValueError(
            f"{len(names)} backends do not fit a table of {size} entries; "
            "raise capacity.tableSize (--table-size)"
        )
    perms = []
    for name in names:
        h1, h2 = _name_hashes(name)
        perms.append((h1 % size, h2 % (size - 1) + 1))
    table = [-1] * size
    nexts = [0] * len(names)
    filled = 0
    while True:
        for i, (offset, skip) in enumerate(perms):
            c = (offset + nexts[i] * skip) % size
            while table[c] >= 0:
                nexts[i] += 1
                c = (offset + nexts[i] * skip) % size
            table[c] = i
            nexts[i] += 1
            filled += 1
            if filled == size:
                return table


def wrr_sequence(weights: Sequence[int], limit: int = DEFAULT_TABLE_SIZE) -> list[int]:
    """One cycle of smooth weighted round robin: index i appears weights[i]
    times (divided by their common divisor), spread out rather than in runs.
    A cycle longer than `limit` is scaled down to fit, keeping every
    backend at least once."""
    if not weights:
        return []
    if len(weights) > limit:
        raise ValueError(
            f"{len(weights)} backends do not fit a table of {limit} entries; "
            "raise capacity.tableSize (--table-size)"
        )
    g = 0
    for w in weights:
        g = math.gcd(g, w)
    ws = [w // g for w in weights]
    total = sum(ws)
    if total > limit:
        ws = [max(1, w * limit // total) for w in ws]
        while sum(ws) > limit:  # rounding left it long: trim the heaviest
            ws[ws.index(max(ws))] -= 1
        total = sum(ws)
    current = [0] * len(ws)
    out = []
    for _ in range(total):
        for i, w in enumerate(ws):
            current[i] += w
        best = max(range(len(ws)), key=lambda i: (current[i], -i))
        current[best] -= total
        out.append(best)
    return out


def table_pick(table: Sequence[T], h: int) -> T:
    """lb_table_backend(): the entry a hash (or a turn) selects."""
    return table[h % len(table)]


def build_table(scheduler: str, backends: Sequence[tuple[str, int]], size: int) -> list[int]:
    """The lb_tables row of a frontend: entry -> index into `backends`, given
    as (name, weight) in a fixed order (the caller sorts them by target).
    The name is the backend's "address:port/protocol", the same on every node."""
    if scheduler == WRR:
        return wrr_sequence([w for _, w in backends], size)
    if scheduler in (MAGLEV, SH):
        return maglev_table([name for name, _ in backends], size)
    raise ValueError(f"scheduler {scheduler!r} has no table")
