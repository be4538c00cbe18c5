"""A map layout as data: the structs of an lbctl.h and the maps declared with them.

`Layout` reads a header (bpf/lbctl.h of any version: this one, the frozen
layout 1 of lbctl/datapath/ebpf/upgrade/layout1.py, or the text a layout record holds)
with its own cffi instance, so two versions' structs can be compared and
converted field by field, by name.  A struct is described by its leaves:
every scalar or array field, nested structs flattened to dotted paths, with
offset, size, kind and the declared type (`__be16` is an integer in network
byte order, which cffi's own view of the typedef cannot tell).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import operator
import re
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

import cffi

from lbctl.datapath.ebpf import layout

# A pinned map's declaration in bpf/maps.h: kind, key, value, name, size, pin, flags
# (LBCTL_RINGBUF_PINNED: a ring buffer, its size in bytes).
_DECLARATION = re.compile(
    r'(?:BPF_TABLE_PINNED7?|LBCTL_RINGBUF_PINNED)\(\s*"(\w+)"\s*,\s*([^,]+?)\s*,\s*([^,]+?)\s*,\s*(\w+)\s*,'
    r"\s*([^,]+?)\s*,\s*LBCTL_PIN\(\s*\w+\s*\)\s*(?:,\s*([^)]+?))?\s*\)\s*;",
    re.S,
)
_FLAGS = {"BPF_F_NO_PREALLOC": 1, "0": 0, "": 0}
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_STRUCT = re.compile(r"struct\s+(\w+)\s*\{(.*?)\}\s*;", re.S)
_FIELD = re.compile(r"^\s*(.+?)\s+(\w+)\s*(\[[^\]]*\])?\s*$", re.S)
_INTS = {
    "uint8_t": "u",
    "uint16_t": "u",
    "uint32_t": "u",
    "uint64_t": "u",
    "int8_t": "s",
    "int16_t": "s",
    "int32_t": "s",
    "int64_t": "s",
    "char": "char",
}


class LayoutError(ValueError):
    """A header or map declaration this version cannot read; says which and why."""


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One field of a struct (a nested struct's fields are leaves of their own)."""

    path: str  # "saddr", "inner.x"
    offset: int
    size: int  # of one element
    kind: str  # "u" unsigned, "s" signed, "be" network byte order, "char", "bytes"
    count: int = 1  # elements of an array field, 1 for a scalar

    @property
    def total(self) -> int:
        return self.size * self.count

    def as_list(self) -> list[Any]:
        return [self.path, self.offset, self.size, self.kind, self.count]


@dataclasses.dataclass(frozen=True)
class StructDesc:
    name: str  # the C type, e.g. "struct ct4_entry" or "__u32"
    size: int
    leaves: tuple[Leaf, ...]

    def shape(self) -> list[Any]:
        """What makes two descriptions the same layout (the name aside)."""
        return [self.size, [leaf.as_list() for leaf in self.leaves]]

    def leaf(self, path: str) -> Leaf | None:
        return next((leaf for leaf in self.leaves if leaf.path == path), None)


@dataclasses.dataclass(frozen=True)
class MapDecl:
    """A pinned map as bpf/maps.h declares it."""

    name: str
    kind: str  # bcc's name of the map type: hash, lru_hash, array, ...
    key: str  # C types of lbctl.h
    value: str
    size: str  # the max_entries expression, e.g. "LBCTL_TABLES * LBCTL_TABLE_SIZE"
    flags: int


def parse_declarations(text: str) -> dict[str, MapDecl]:
    """The BPF_TABLE_PINNED declarations of a maps.h text, by map name."""
    out = {}
    for kind, key, value, name, size, flags in _DECLARATION.findall(_COMMENT.sub(" ", text)):
        if flags.strip() not in _FLAGS:
            raise LayoutError(f"map {name}: unknown map flags {flags!r} in bpf/maps.h")
        out[name] = MapDecl(name, kind, key.strip(), value.strip(), size.strip(), _FLAGS[flags])
    return out


def _declared_types(header: str) -> dict[tuple[str, str], str]:
    """(struct, field) -> its type as written, e.g. ("ct4_key", "sport") -> "__be16"."""
    out = {}
    for struct, body in _STRUCT.findall(_COMMENT.sub(" ", header)):
        for decl in body.split(";"):
            match = _FIELD.match(decl)
            if match:
                out[(struct, match.group(2))] = " ".join(match.group(1).split())
    return out


_OPS: dict[type, Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
}


def evaluate(expr: str, names: Mapping[str, int]) -> int:
    """An integer expression of maps.h (names, numbers, + - * /), e.g. a map size."""

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in names:
            return int(names[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise LayoutError(f"cannot evaluate the map size {expr!r}: {ast.dump(node)}")

    text = re.sub(r"(\d+)U?L*L?\b", r"\1", expr).replace("/", "//")
    return value(ast.parse(text, mode="eval").body)


class Layout:
    """The structs of one lbctl.h and the maps of one maps.h, read with cffi."""

    def __init__(self, name: str, header: str, declarations: str) -> None:
        self.name = name
        self.header = header
        self.declarations_text = declarations
        self.maps = parse_declarations(declarations)
        self.ffi = cffi.FFI()
        try:
            self.ffi.cdef(layout.cdef_text(header))
        except (cffi.CDefError, cffi.FFIError) as err:
            raise LayoutError(f"{name}: its lbctl.h cannot be read: {err}") from err
        self._consts: Any = self.ffi.dlopen(None)
        self._declared = _declared_types(header)
        self._descs: dict[str, StructDesc] = {}

    @classmethod
    def current(cls) -> Layout:
        from lbctl.datapath.ebpf.settings import bpf_source_dir

        root = bpf_source_dir()
        maps = _COMMENT.sub(" ", (root / "maps.h").read_text())
        declarations = "\n".join(m.group(0) for m in _DECLARATION.finditer(maps))
        return cls("this build's layout", (root / "lbctl.h").read_text(), declarations)

    def const(self, name: str) -> int:
        return int(getattr(self._consts, name))

    def consts(self, names: list[str]) -> dict[str, int]:
        out = {}
        for name in names:
            try:
                out[name] = self.const(name)
            except AttributeError:
                continue
        return out

    def describe(self, ctype: str) -> StructDesc:
        if ctype not in self._descs:
            try:
                tp = self.ffi.typeof(ctype)
            except (cffi.CDefError, cffi.FFIError) as err:
                raise LayoutError(f"{self.name}: no type {ctype!r} in its lbctl.h") from err
            leaves = tuple(self._leaves(tp, "", 0, ctype.removeprefix("struct ").strip()))
            self._descs[ctype] = StructDesc(ctype, int(self.ffi.sizeof(tp)), leaves)
        return self._descs[ctype]

    def _leaves(self, tp: Any, prefix: str, base: int, declared: str) -> list[Leaf]:
        if tp.kind == "struct":
            out = []
            struct = tp.cname.removeprefix("struct ")
            inner = f"{prefix}." if prefix else ""
            for name, field in tp.fields:
                if field.bitsize >= 0:
                    raise LayoutError(f"{self.name}: bit field {struct}.{name} is not supported")
                written = self._declared.get((struct, name), "")
                out += self._leaves(field.type, f"{inner}{name}", base + field.offset, written)
            return out
        if tp.kind == "primitive":
            return [Leaf(prefix, base, int(self.ffi.sizeof(tp)), self._kind(tp, declared))]
        if tp.kind == "array":
            item = tp.item
            if item.kind == "primitive":
                kind = self._kind(item, declared)
                return [Leaf(prefix, base, int(self.ffi.sizeof(item)), kind, int(tp.length))]
            return [Leaf(prefix, base, 1, "bytes", int(self.ffi.sizeof(tp)))]
        raise LayoutError(f"{self.name}: field {prefix!r} has an unsupported type {tp.cname}")

    @staticmethod
    def _kind(tp: Any, declared: str) -> str:
        kind = _INTS.get(tp.cname)
        if kind is None:
            raise LayoutError(f"unsupported field type {tp.cname}")
        return "be" if declared.startswith("__be") else kind

    def map_shape(self, name: str) -> list[Any]:
        decl = self.maps[name]
        return [decl.kind, self.describe(decl.key).shape(), self.describe(decl.value).shape()]

    @cached_property
    def fingerprint(self) -> str:
        """A short digest of every pinned map's kind and struct shapes."""
        shapes = {name: self.map_shape(name) for name in sorted(self.maps)}
        return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:12]
