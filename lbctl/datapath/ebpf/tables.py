"""Rows of lb_tables: the wrr, maglev and sh tables of frontends.

lb_tables is one array map of `rows * table_size` backend ids; a frontend
that needs a table owns one row (numbered from 1, as lb_service.table).
Rewriting a row writes only the entries that change, in one batch: one
endpoint change of a Maglev frontend touches about 1/n of its row.
"""

from __future__ import annotations

from collections.abc import Sequence

from lbctl.datapath.ebpf import layout
from lbctl.datapath.ebpf.libbpf import BpfMap


class RowsExhausted(Exception):
    pass


class TableRows:
    def __init__(self, bpf_map: BpfMap, table_size: int) -> None:
        self.map = bpf_map
        self.size = table_size
        self.rows = bpf_map.max_entries // table_size
        self._used: set[int] = set()

    def take(self) -> int:
        for row in range(1, self.rows + 1):
            if row not in self._used:
                self._used.add(row)
                return row
        raise RowsExhausted(
            f"all {self.rows} rows of lb_tables hold the tables of other wrr, maglev or sh "
            "frontends; raise capacity.maxTables (--max-tables)"
        )

    def adopt(self, row: int) -> bool:
        """Mark a row found in the maps as used; False if it cannot be ours."""
        if not 1 <= row <= self.rows or row in self._used:
            return False
        self._used.add(row)
        return True

    def release(self, row: int) -> None:
        self._used.discard(row)

    def _index(self, row: int, i: int) -> int:
        return (row - 1) * self.size + i

    def read(self, row: int, length: int) -> list[int]:
        out = []
        key = layout.ffi.new("__u32 *")
        for i in range(min(length, self.size)):
            key[0] = self._index(row, i)
            value = self.map.lookup(key)
            out.append(int(value[0]) if value is not None else 0)
        return out

    def write(self, row: int, old: Sequence[int], new: Sequence[int]) -> int:
        """Write the entries of `new` that differ from `old`; return how many."""
        changed = [i for i, ident in enumerate(new) if i >= len(old) or old[i] != ident]
        if not changed:
            return 0
        keys = layout.ffi.new("__u32[]", len(changed))
        values = layout.ffi.new("__u32[]", len(changed))
        for n, i in enumerate(changed):
            keys[n] = self._index(row, i)
            values[n] = new[i]
        self.map.update_batch(keys, values, len(changed))
        return len(changed)
