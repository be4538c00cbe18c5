"""Converting a map entry from one struct layout to another, field by field, by name.

The rules (docs/control-plane.md, "Upgrades"):

- a field of the same name, kind and size is copied, wherever it moved;
- a field the new layout adds is zero;
- a field the new layout drops is dropped (reported, padding aside);
- an integer that changes width, signedness or byte order (`__u16` to
  `__u32`, `__be16` to `__u16`) keeps its value; an entry whose value does
  not fit the new field is not carried over, and counted;
- a char array (a C string) of another length is cut or padded, and stays
  NUL-terminated; an integer array keeps its first elements, each converted
  as above;
- any other change of a field's type (an integer that becomes a string, a
  struct that changes shape inside an array) has no rule of its own: it
  needs an entry in RULES, a function from the old field's bytes to the new
  one's.  Without one the map is reported as not convertible
  (`Conversion.problems`) and starts empty.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable
from typing import Literal

from lbctl.datapath.ebpf.upgrade.structs import Leaf, StructDesc

# (new struct type, field path) -> old field bytes -> new field bytes (exactly its size)
Rule = Callable[[bytes], bytes]
RULES: dict[tuple[str, str], Rule] = {}

_PAD = re.compile(r"(^|\.)(pad\d*|unused\d*)$")
_INT = {"u", "s", "be"}
Op = Callable[[bytes, bytearray], bool]


def _is_pad(path: str) -> bool:
    return bool(_PAD.search(path))


def _order(kind: str) -> Literal["little", "big"]:
    return "big" if kind == "be" else sys.byteorder


def _int_op(old: Leaf, new: Leaf, index: int = 0) -> Op:
    src = old.offset + index * old.size
    dst = new.offset + index * new.size
    src_end, dst_end = src + old.size, dst + new.size
    src_order, dst_order = _order(old.kind), _order(new.kind)
    src_signed, dst_signed = old.kind == "s", new.kind == "s"
    dst_size = new.size

    def op(raw: bytes, out: bytearray) -> bool:
        value = int.from_bytes(raw[src:src_end], src_order, signed=src_signed)
        try:
            out[dst:dst_end] = value.to_bytes(dst_size, dst_order, signed=dst_signed)
        except OverflowError:
            return False
        return True

    return op


def _copy_op(src: int, dst: int, size: int) -> Op:
    src_end, dst_end = src + size, dst + size

    def op(raw: bytes, out: bytearray) -> bool:
        out[dst:dst_end] = raw[src:src_end]
        return True

    return op


def _string_op(old: Leaf, new: Leaf) -> Op:
    keep = min(old.count, new.count)
    src, dst = old.offset, new.offset
    last = new.offset + new.count - 1

    def op(raw: bytes, out: bytearray) -> bool:
        out[dst : dst + keep] = raw[src : src + keep]
        out[last] = 0  # stays a C string if it was cut
        return True

    return op


def _rule_op(rule: Rule, old: Leaf, new: Leaf) -> Op:
    def op(raw: bytes, out: bytearray) -> bool:
        value = rule(raw[old.offset : old.offset + old.total])
        if len(value) != new.total:
            return False
        out[new.offset : new.offset + new.total] = value
        return True

    return op


@dataclasses.dataclass
class Conversion:
    """How entries of one struct become entries of another; call it on raw bytes."""

    old: StructDesc
    new: StructDesc
    identical: bool
    notes: list[str]  # what changes, for the report ("field x added", ...)
    problems: list[str]  # fields without a rule: the map cannot be converted
    ops: list[Op]

    def __call__(self, raw: bytes) -> bytes | None:
        """The entry in the new layout; None if a value does not fit its new field."""
        if self.identical:
            return raw
        out = bytearray(self.new.size)
        for op in self.ops:
            if not op(raw, out):
                return None
        return bytes(out)

    @property
    def ok(self) -> bool:
        return not self.problems


def plan(old: StructDesc, new: StructDesc) -> Conversion:
    """The conversion of `old` entries into `new` ones, field by name."""
    if old.shape() == new.shape():
        return Conversion(old, new, True, [], [], [])
    notes: list[str] = []
    problems: list[str] = []
    ops: list[Op] = []
    olds = {leaf.path: leaf for leaf in old.leaves}
    what = new.name
    for leaf in new.leaves:
        before = olds.get(leaf.path)
        rule = RULES.get((new.name, leaf.path))
        label = f"{what} field {leaf.path or '(the value)'}"
        if rule is not None and before is not None:
            ops.append(_rule_op(rule, before, leaf))
            notes.append(f"{label}: converted by its rule")
        elif before is None:
            if not _is_pad(leaf.path):
                notes.append(f"{label}: new, starts at 0")
        elif (before.kind, before.size, before.count) == (leaf.kind, leaf.size, leaf.count):
            ops.append(_copy_op(before.offset, leaf.offset, leaf.total))
        elif before.kind in _INT and leaf.kind in _INT:
            ops += [_int_op(before, leaf, i) for i in range(min(before.count, leaf.count))]
            notes.append(f"{label}: {_type(before)} -> {_type(leaf)}, values kept")
        elif before.kind == leaf.kind == "char":
            ops.append(_string_op(before, leaf))
            notes.append(f"{label}: {_type(before)} -> {_type(leaf)}, cut or padded")
        elif _is_pad(leaf.path):
            continue  # padding that changed type: zero is right
        else:
            problems.append(
                f"{label} changed from {_type(before)} to {_type(leaf)}, which no rule converts "
                "(add one to lbctl/datapath/ebpf/upgrade/convert.py RULES)"
            )
    news = {leaf.path for leaf in new.leaves}
    for leaf in old.leaves:
        if leaf.path not in news and not _is_pad(leaf.path):
            notes.append(f"{what} field {leaf.path}: dropped (this version has no such field)")
    return Conversion(old, new, False, notes, problems, ops)


def _type(leaf: Leaf) -> str:
    text = f"{leaf.kind}{leaf.size * 8}" if leaf.kind in _INT else leaf.kind
    return f"{text}[{leaf.count}]" if leaf.count != 1 or leaf.kind == "char" else text
