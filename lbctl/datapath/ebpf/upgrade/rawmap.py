"""A BPF map as bytes: for maps of any layout, this version's or an older one's.

The upgrade code reads and writes maps whose structs this version's
lbctl.h may not declare, so keys and values here are plain `bytes` of the
sizes the kernel reports.  A per-CPU map's value is all CPUs' values, each
padded to 8 bytes, as the kernel hands them out.  Reads use
BPF_MAP_LOOKUP_BATCH where the map type has it (LPM tries do not: they
are walked key by key).
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Iterator, Sequence
from typing import Any

from lbctl.datapath.ebpf import layout, libbpf

ffi = layout.ffi
ffi.cdef(
    """
/* The head of libbpf's struct bpf_map_create_opts, up to map_flags (libbpf
 * takes a shorter struct of an older caller, as `sz` tells it). */
struct lbctl_map_create_opts {
    size_t sz;
    uint32_t btf_fd;
    uint32_t btf_key_type_id;
    uint32_t btf_value_type_id;
    uint32_t btf_vmlinux_value_type_id;
    uint32_t inner_map_fd;
    uint32_t map_flags;
};
int bpf_map_create(int map_type, const char *map_name, uint32_t key_size, uint32_t value_size,
                   uint32_t max_entries, const void *opts);
"""
)
_lib: Any = ffi.dlopen("libbpf.so.1")
_bpf: Any = libbpf._lib  # the map calls libbpf.py binds already

# BPF_MAP_TYPE_* by bcc's names of them
KINDS = {
    "hash": 1,
    "array": 2,
    "percpu_hash": 5,
    "percpu_array": 6,
    "lru_hash": 9,
    "lru_percpu_hash": 10,
    "lpm_trie": 11,
    "ringbuf": 27,
}
KIND_NAMES = {number: name for name, number in KINDS.items()}
PERCPU = {"percpu_hash", "percpu_array", "lru_percpu_hash"}
ARRAYS = {"array", "percpu_array"}
_UNSUPPORTED = (-errno.EINVAL, -errno.EOPNOTSUPP, -524)  # 524: ENOTSUPP


@dataclasses.dataclass(frozen=True)
class Info:
    id: int
    name: str
    kind: str
    key_size: int
    value_size: int
    max_entries: int
    flags: int


def info(fd: int) -> Info:
    raw = ffi.new("struct lbctl_map_info *")
    size = ffi.new("uint32_t *", ffi.sizeof("struct lbctl_map_info"))
    rc = _bpf.bpf_obj_get_info_by_fd(fd, raw, size)
    if rc < 0:
        raise OSError(-rc, f"map info of fd {fd}: {os.strerror(-rc)}")
    return Info(
        id=raw.id,
        name=ffi.string(raw.name).decode(),
        kind=KIND_NAMES.get(raw.type, str(raw.type)),
        key_size=raw.key_size,
        value_size=raw.value_size,
        max_entries=raw.max_entries,
        flags=raw.map_flags,
    )


def create(
    kind: str, name: str, key_size: int, value_size: int, max_entries: int, flags: int = 0
) -> int:
    """A new map's descriptor (the record map; bcc makes the datapath's)."""
    opts = ffi.new("struct lbctl_map_create_opts *")
    opts.sz = ffi.sizeof("struct lbctl_map_create_opts")
    opts.map_flags = flags
    fd = int(
        _lib.bpf_map_create(KINDS[kind], name.encode(), key_size, value_size, max_entries, opts)
    )
    if fd < 0:
        raise OSError(-fd, f"create map {name}: {os.strerror(-fd)}")
    return fd


class RawMap:
    """One map with keys and values as bytes."""

    def __init__(self, fd: int, label: str, owns_fd: bool = True) -> None:
        self.fd = fd
        self.label = label  # e.g. "ct4 (pinned)": for messages
        self._owns = owns_fd
        self.info = info(fd)
        self.percpu = self.info.kind in PERCPU
        self.ncpus = libbpf.num_possible_cpus() if self.percpu else 1
        self.slot = (self.info.value_size + 7) & ~7 if self.percpu else self.info.value_size
        self.value_size = self.slot * self.ncpus  # of one entry, every CPU's value

    @classmethod
    def open(cls, path: str, label: str | None = None) -> RawMap:
        return cls(libbpf.obj_get(path), label or os.path.basename(path))

    @property
    def id(self) -> int:
        return self.info.id

    def close(self) -> None:
        if self._owns and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def lookup(self, key: bytes) -> bytes | None:
        value = ffi.new("char[]", self.value_size)
        rc = _bpf.bpf_map_lookup_elem(self.fd, key, value)
        if rc == -errno.ENOENT:
            return None
        self._check(rc, "lookup")
        return bytes(ffi.buffer(value, self.value_size))

    def update(self, key: bytes, value: bytes, flags: int = libbpf.BPF_ANY) -> int:
        """0, or the negative errno (EEXIST with BPF_NOEXIST, E2BIG when full)."""
        return int(_bpf.bpf_map_update_elem(self.fd, key, value, flags))

    def delete(self, key: bytes) -> None:
        rc = _bpf.bpf_map_delete_elem(self.fd, key)
        if rc != -errno.ENOENT:
            self._check(rc, "delete")

    def write(self, entries: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, int]]:
        """Write entries in one batch; the keys that failed, with their errno."""
        if not entries:
            return []
        keys = ffi.new("char[]", b"".join(k for k, _ in entries))
        values = ffi.new("char[]", b"".join(v for _, v in entries))
        count = ffi.new("uint32_t *", len(entries))
        rc = _bpf.bpf_map_update_batch(self.fd, keys, values, count, ffi.NULL)
        if rc >= 0:
            return []
        done = 0 if rc in _UNSUPPORTED or count[0] == len(entries) else int(count[0])
        failed = []
        for key, value in entries[done:]:
            err = self.update(key, value)
            if err < 0:
                failed.append((key, -err))
        return failed

    def chunks(self, size: int = 4096) -> Iterator[list[tuple[bytes, bytes]]]:
        """Every entry, `size` at a time (an array's zero entries included).

        A ring buffer has none: its records are read, not copied."""
        if self.info.kind == "ringbuf":
            return
        ksz, vsz = self.info.key_size, self.value_size
        keys = ffi.new("char[]", size * ksz)
        values = ffi.new("char[]", size * vsz)
        token = max(ksz, 8)
        tokens = (ffi.new("char[]", token), ffi.new("char[]", token))
        in_batch: Any = ffi.NULL
        while True:
            count = ffi.new("uint32_t *", size)
            rc = _bpf.bpf_map_lookup_batch(
                self.fd, in_batch, tokens[1], keys, values, count, ffi.NULL
            )
            if rc in _UNSUPPORTED and in_batch == ffi.NULL:
                yield from self._walk(size)
                return
            if rc < 0 and rc != -errno.ENOENT:
                self._check(rc, "batch lookup")
            n = int(count[0])
            if n:
                kb = bytes(ffi.buffer(keys, n * ksz))
                vb = bytes(ffi.buffer(values, n * vsz))
                yield [(kb[i * ksz : (i + 1) * ksz], vb[i * vsz : (i + 1) * vsz]) for i in range(n)]
            if rc == -errno.ENOENT:
                return
            ffi.memmove(tokens[0], tokens[1], token)
            in_batch = tokens[0]

    def _walk(self, size: int) -> Iterator[list[tuple[bytes, bytes]]]:
        prev: Any = ffi.NULL
        out: list[tuple[bytes, bytes]] = []
        while True:
            nxt = ffi.new("char[]", self.info.key_size)
            rc = _bpf.bpf_map_get_next_key(self.fd, prev, nxt)
            if rc == -errno.ENOENT:
                break
            self._check(rc, "iterate")
            key = bytes(ffi.buffer(nxt, self.info.key_size))
            value = self.lookup(key)
            if value is not None:
                out.append((key, value))
            if len(out) == size:
                yield out
                out = []
            prev = nxt
        if out:
            yield out

    def entries(self) -> Iterator[tuple[bytes, bytes]]:
        for chunk in self.chunks():
            yield from chunk

    def count(self) -> int:
        """Entries held; an array's entries that are not all zero."""
        if self.info.kind in ARRAYS:
            return sum(1 for _, v in self.entries() if any(v))
        return sum(len(chunk) for chunk in self.chunks())

    def _check(self, rc: int, what: str) -> None:
        if rc < 0:
            raise OSError(-rc, f"{what} in map {self.label}: {os.strerror(-rc)}")
