"""lbctl.plan.scheduling: the tables and hashes, as pure functions."""

from __future__ import annotations

import collections

import pytest

from lbctl.plan import scheduling

pytestmark = pytest.mark.unit  # pure: make unit runs it without root

SIZE = scheduling.DEFAULT_TABLE_SIZE


def names(n: int) -> list[str]:
    return [f"10.244.{i // 200}.{i % 200}:8080/TCP" for i in range(n)]


def test_maglev_spreads_entries_evenly() -> None:
    for n in (1, 3, 10, 100):
        table = scheduling.maglev_table(names(n), SIZE)
        assert len(table) == SIZE
        counts = collections.Counter(table)
        assert set(counts) == set(range(n))
        # Maglev's fill takes turns: no backend more than one round ahead
        assert max(counts.values()) - min(counts.values()) <= 1 + SIZE // n // 50, counts


def test_maglev_removal_moves_little_beyond_the_removed_backend() -> None:
    before = scheduling.maglev_table(names(10), SIZE)
    kept = names(10)[:9]
    after = scheduling.maglev_table(kept, SIZE)
    own = sum(1 for e in before if e == 9)
    moved_others = sum(1 for b, a in zip(before, after, strict=True) if b != 9 and b != a)
    assert own == pytest.approx(SIZE / 10, abs=2)
    assert moved_others <= SIZE * 0.02  # the paper's few percent of churn


def test_maglev_depends_on_names_only() -> None:
    """Two nodes list their backends in the same (sorted) order and agree."""
    assert scheduling.maglev_table(names(7), SIZE) == scheduling.maglev_table(names(7), SIZE)
    assert scheduling.maglev_table(names(7), 251) != scheduling.maglev_table(names(7), 257)[:251]


def test_maglev_needs_a_prime_size() -> None:
    with pytest.raises(ValueError, match="prime"):
        scheduling.maglev_table(names(3), 16384)
    assert scheduling.maglev_table([], SIZE) == []


def test_wrr_sequence_interleaves_by_weight() -> None:
    assert scheduling.wrr_sequence([1, 2, 3]) == [2, 1, 0, 2, 1, 2]
    assert scheduling.wrr_sequence([2, 4, 6]) == [2, 1, 0, 2, 1, 2]  # common divisor
    assert scheduling.wrr_sequence([1, 1, 1]) == [0, 1, 2]
    seq = scheduling.wrr_sequence([100] * 200 + [50], limit=251)
    assert sorted(seq) == list(range(201))  # scaled down to fit: each once
    with pytest.raises(ValueError, match="tableSize"):
        scheduling.wrr_sequence([1] * 300, limit=251)
    seq = scheduling.wrr_sequence([1, 100], limit=50)
    assert set(seq) == {0, 1} and len(seq) <= 50  # every backend keeps a turn


def test_hashes_mix_every_field() -> None:
    base = scheduling.flow_hash(1, 2, 3, 4, 6)
    variants = [
        scheduling.flow_hash(9, 2, 3, 4, 6),
        scheduling.flow_hash(1, 9, 3, 4, 6),
        scheduling.flow_hash(1, 2, 9, 4, 6),
        scheduling.flow_hash(1, 2, 3, 9, 6),
        scheduling.flow_hash(1, 2, 3, 4, 17),
    ]
    assert base not in variants and len(set(variants)) == 5
    assert all(0 <= h < 2**32 for h in [base, *variants])
    assert scheduling.source_hash(1) != scheduling.source_hash(2)
    # a known value, so a change of the function is seen here first (its BPF
    # twin is held to it in tests/test_sched_prog.py)
    assert scheduling.mix32(0) == 0
    assert scheduling.mix32(1) == 0x688990C0


def test_build_table_by_scheduler() -> None:
    pairs = [("a", 1), ("b", 3)]
    assert collections.Counter(scheduling.build_table("wrr", pairs, SIZE)) == {0: 1, 1: 3}
    assert len(scheduling.build_table("maglev", pairs, SIZE)) == SIZE
    assert scheduling.build_table("sh", pairs, SIZE) == scheduling.build_table(
        "maglev", pairs, SIZE
    )
    with pytest.raises(ValueError, match="no table"):
        scheduling.build_table("rr", pairs, SIZE)


def test_is_prime() -> None:
    assert [n for n in range(20) if scheduling.is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19]
    assert scheduling.is_prime(16381) and scheduling.is_prime(65521)
    assert not scheduling.is_prime(16383)
