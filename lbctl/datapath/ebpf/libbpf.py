"""Low-level BPF calls through libbpf (libbpf.so.1), bound with cffi.

The agent and the CLI both reach the maps through these calls: the agent
with the descriptors bcc gives it, the CLI and restarts through the pinned
paths.  Keys and values are cffi structs from lbctl.datapath.ebpf.layout.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lbctl.datapath.ebpf import layout

_CDEF = """
struct bpf_test_run_opts {
    size_t sz;
    const void *data_in;
    void *data_out;
    uint32_t data_size_in;
    uint32_t data_size_out;
    const void *ctx_in;
    void *ctx_out;
    uint32_t ctx_size_in;
    uint32_t ctx_size_out;
    uint32_t retval;
    int repeat;
    uint32_t duration;
    uint32_t flags;
    uint32_t cpu;
    uint32_t batch_size;
};
struct lbctl_map_info {
    uint32_t type;
    uint32_t id;
    uint32_t key_size;
    uint32_t value_size;
    uint32_t max_entries;
    uint32_t map_flags;
    char name[16];
};
int bpf_obj_get(const char *pathname);
int bpf_obj_pin(int fd, const char *pathname);
int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_delete_elem(int fd, const void *key);
struct bpf_map_batch_opts {
    size_t sz;
    uint64_t elem_flags;
    uint64_t flags;
};
int bpf_map_update_batch(int fd, const void *keys, const void *values, uint32_t *count,
                         const struct bpf_map_batch_opts *opts);
int bpf_map_lookup_batch(int fd, void *in_batch, void *out_batch, void *keys, void *values,
                         uint32_t *count, const struct bpf_map_batch_opts *opts);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, uint32_t *info_len);
int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);
int libbpf_num_possible_cpus(void);
typedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size);
struct ring_buffer *ring_buffer__new(int map_fd, ring_buffer_sample_fn sample_cb, void *ctx,
                                     const void *opts);
int ring_buffer__poll(struct ring_buffer *rb, int timeout_ms);
void ring_buffer__free(struct ring_buffer *rb);
/* The head of struct bpf_link_info with its cgroup member (the union starts
 * at offset 16: it holds 64-bit fields); the kernel fills as much as asked. */
struct lbctl_link_info {
    uint32_t type;
    uint32_t id;
    uint32_t prog_id;
    uint32_t pad;
    uint64_t cgroup_id;
    uint32_t attach_type;
    uint32_t pad2;
};
/* The head of struct bpf_prog_info, up to the program's name. */
struct lbctl_prog_info {
    uint32_t type;
    uint32_t id;
    uint8_t tag[8];
    uint32_t jited_prog_len;
    uint32_t xlated_prog_len;
    uint64_t jited_prog_insns;
    uint64_t xlated_prog_insns;
    uint64_t load_time;
    uint32_t created_by_uid;
    uint32_t nr_map_ids;
    uint64_t map_ids;
    char name[16];
};
/* enum bpf_attach_type is an int; the opts structs are optional (NULL). */
int bpf_link_create(int prog_fd, int target_fd, int attach_type, const void *opts);
int bpf_link_update(int link_fd, int new_prog_fd, const void *opts);
int bpf_link_detach(int link_fd);
int bpf_prog_get_fd_by_id(uint32_t id);
int bpf_prog_query(int target_fd, int type, uint32_t query_flags, uint32_t *attach_flags,
                   uint32_t *prog_ids, uint32_t *prog_cnt);
"""

ffi = layout.ffi
ffi.cdef(_CDEF)
_lib: Any = ffi.dlopen("libbpf.so.1")

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

MAP_TYPE_NAMES = {
    1: "hash",
    2: "array",
    5: "percpu_hash",
    6: "percpu_array",
    9: "lru_hash",
    27: "ringbuf",
}
PERCPU_TYPES = {5, 6, 10}


class MapError(OSError):
    """A map operation failed; the message names the map and the cause."""

    done = 0  # of a batch: how many entries were written before the failure

    def __str__(self) -> str:
        return str(self.strerror)


@dataclasses.dataclass(frozen=True)
class MapInfo:
    id: int
    name: str
    type: str
    key_size: int
    value_size: int
    max_entries: int


def _check(rc: int, what: str) -> int:
    if rc < 0:
        code = -rc
        raise MapError(code, f"{what}: {os.strerror(code)}")
    return rc


def obj_get(path: str) -> int:
    return _check(_lib.bpf_obj_get(path.encode()), f"open pinned object {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(_lib.bpf_obj_pin(fd, path.encode()), f"pin to {path}")


def map_info(fd: int) -> MapInfo:
    info = ffi.new("struct lbctl_map_info *")
    size = ffi.new("uint32_t *", ffi.sizeof("struct lbctl_map_info"))
    _check(_lib.bpf_obj_get_info_by_fd(fd, info, size), f"map info of fd {fd}")
    return MapInfo(
        id=info.id,
        name=ffi.string(info.name).decode(),
        type=MAP_TYPE_NAMES.get(info.type, str(info.type)),
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
    )


def map_holders(map_id: int) -> list[tuple[int, str]]:
    """Processes (pid, command) that hold the map open, as far as /proc shows them."""
    holders = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) != "anon_inode:bpf-map":
                    continue
                info = (proc / "fdinfo" / fd.name).read_text()
                if f"map_id:\t{map_id}\n" in info:
                    command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").strip()
                    holders.append((int(proc.name), command.decode(errors="replace")))
                    break
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return holders


class BpfError(OSError):
    """A program or link operation failed; the message names the object and the cause."""

    def __str__(self) -> str:
        return str(self.strerror)


def _check_obj(rc: int, what: str) -> int:
    if rc < 0:
        code = -rc
        raise BpfError(code, f"{what}: {os.strerror(code)}")
    return rc


@dataclasses.dataclass(frozen=True)
class LinkInfo:
    id: int
    type: int  # BPF_LINK_TYPE_*
    prog_id: int
    cgroup_id: int  # of a cgroup link; 0 once its cgroup is gone
    attach_type: int  # of a cgroup link


@dataclasses.dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int  # BPF_PROG_TYPE_*
    name: str  # the first 15 characters of the function's name


BPF_LINK_TYPE_CGROUP = 3
BPF_F_QUERY_EFFECTIVE = 1


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A BPF link attaching a program to a target (a cgroup's fd): its descriptor.

    The link lives while a descriptor or a pin holds it.
    """
    return _check_obj(
        _lib.bpf_link_create(prog_fd, target_fd, attach_type, ffi.NULL),
        f"create a link for attach type {attach_type}",
    )


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """Swap the link's program for another in one step: no moment without either."""
    _check_obj(_lib.bpf_link_update(link_fd, new_prog_fd, ffi.NULL), "replace a link's program")


def link_detach(link_fd: int) -> None:
    """Detach the link's program now, whoever else holds the link."""
    _check_obj(_lib.bpf_link_detach(link_fd), "detach a link")


def link_info(fd: int) -> LinkInfo:
    info = ffi.new("struct lbctl_link_info *")
    size = ffi.new("uint32_t *", ffi.sizeof("struct lbctl_link_info"))
    _check_obj(_lib.bpf_obj_get_info_by_fd(fd, info, size), f"link info of fd {fd}")
    cgroup = info.type == BPF_LINK_TYPE_CGROUP
    return LinkInfo(
        id=info.id,
        type=info.type,
        prog_id=info.prog_id,
        cgroup_id=info.cgroup_id if cgroup else 0,
        attach_type=info.attach_type if cgroup else -1,
    )


def prog_info(fd: int) -> ProgInfo:
    info = ffi.new("struct lbctl_prog_info *")
    size = ffi.new("uint32_t *", ffi.sizeof("struct lbctl_prog_info"))
    _check_obj(_lib.bpf_obj_get_info_by_fd(fd, info, size), f"program info of fd {fd}")
    return ProgInfo(id=info.id, type=info.type, name=ffi.string(info.name).decode())


def prog_map_ids(fd: int) -> list[int]:
    """Ids of the maps a loaded program uses."""
    info = ffi.new("struct lbctl_prog_info *")
    size = ffi.new("uint32_t *", ffi.sizeof("struct lbctl_prog_info"))
    _check_obj(_lib.bpf_obj_get_info_by_fd(fd, info, size), f"program info of fd {fd}")
    count = int(info.nr_map_ids)
    if count == 0:
        return []
    ids = ffi.new("uint32_t[]", count)
    info = ffi.new("struct lbctl_prog_info *")
    info.nr_map_ids = count
    info.map_ids = int(ffi.cast("uintptr_t", ids))
    size[0] = ffi.sizeof("struct lbctl_prog_info")
    _check_obj(_lib.bpf_obj_get_info_by_fd(fd, info, size), f"map ids of program fd {fd}")
    return [int(ids[i]) for i in range(min(count, int(info.nr_map_ids)))]


def prog_fd_by_id(prog_id: int) -> int:
    """A descriptor of a loaded program, from its id (to read its info)."""
    return _check_obj(_lib.bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}")


def prog_query(target_fd: int, attach_type: int, effective: bool = False) -> list[int]:
    """Ids of the programs attached to a target (a cgroup's fd) for an attach type.

    `effective`: those that run there, inherited from ancestors included.
    """
    flags = BPF_F_QUERY_EFFECTIVE if effective else 0
    room = 64
    while True:
        ids = ffi.new("uint32_t[]", room)
        count = ffi.new("uint32_t *", room)
        attach_flags = ffi.new("uint32_t *")
        rc = _lib.bpf_prog_query(target_fd, attach_type, flags, attach_flags, ids, count)
        if rc == -errno.ENOSPC and count[0] > room:
            room = int(count[0])
            continue
        _check_obj(rc, f"query programs of attach type {attach_type}")
        return [int(ids[i]) for i in range(count[0])]


def num_possible_cpus() -> int:
    return int(_check(_lib.libbpf_num_possible_cpus(), "count possible CPUs"))


class BpfMap:
    """One BPF map with typed keys and values (C type names of lbctl.h)."""

    def __init__(
        self,
        fd: int,
        name: str,
        key_type: str,
        value_type: str,
        *,
        owns_fd: bool,
        size_flag: str | None = None,
    ):
        self.fd = fd
        self.name = name
        self.key_type = key_type
        self.value_type = value_type
        self._owns_fd = owns_fd
        self._size_flag = size_flag
        info = map_info(fd)
        self.max_entries = info.max_entries
        self.percpu = info.type in {"percpu_hash", "percpu_array"}
        self._ncpus = num_possible_cpus() if self.percpu else 1
        want = (ffi.sizeof(key_type), ffi.sizeof(value_type))
        self.ringbuf = info.type == "ringbuf"
        if self.ringbuf:  # no keys nor values: the types name its records
            want = (0, 0)
        if (info.key_size, info.value_size) != want:
            raise MapError(
                errno.EINVAL,
                f"map {name} has key/value sizes {info.key_size}/{info.value_size} but "
                f"bpf/lbctl.h says {want[0]}/{want[1]}: it was made by another lbctl "
                "version; start this version's agent (`lbctl run`), which converts the maps "
                "in place, or use the lbctl that made them",
            )

    @classmethod
    def open_pinned(
        cls, path: str, key_type: str, value_type: str, size_flag: str | None = None
    ) -> BpfMap:
        name = os.path.basename(path)
        return cls(obj_get(path), name, key_type, value_type, owns_fd=True, size_flag=size_flag)

    def close(self) -> None:
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    @property
    def ncpus(self) -> int:
        """Values per entry: the possible CPUs of a per-CPU map, else 1."""
        return self._ncpus

    def new_key(self, **fields: Any) -> Any:
        return layout.new(self.key_type, **fields)

    def new_value(self, **fields: Any) -> Any:
        if self.percpu:
            return ffi.new(f"{self.value_type}[]", self._ncpus)
        return layout.new(self.value_type, **fields)

    def lookup(self, key: Any) -> Any | None:
        value = self.new_value()
        rc = _lib.bpf_map_lookup_elem(self.fd, key, value)
        if rc == -errno.ENOENT:
            return None
        _check(rc, f"lookup in map {self.name}")
        return value

    def update(self, key: Any, value: Any, flags: int = BPF_ANY) -> None:
        rc = _lib.bpf_map_update_elem(self.fd, key, value, flags)
        if rc < 0:
            self._raise(rc, "update")

    def update_batch(self, keys: Any, values: Any, count: int) -> None:
        """Write `count` entries from two cffi arrays in one system call.

        On failure the MapError's `done` says how many entries were written
        (the first ones).  Kernels without batch operations get one call per
        entry instead, with the same outcome.
        """
        if count == 0:
            return
        done = ffi.new("uint32_t *", count)
        rc = _lib.bpf_map_update_batch(self.fd, keys, values, done, ffi.NULL)
        if rc < 0 and done[0] == count:
            done[0] = 0  # refused before the kernel touched the count: nothing written
        if rc in (-errno.EINVAL, -errno.EOPNOTSUPP, -524) and done[0] == 0:  # 524: ENOTSUPP
            for i in range(count):
                try:
                    self.update(keys + i, values + i * self._ncpus)
                except MapError as err:
                    err.done = i
                    raise
            return
        if rc < 0:
            try:
                self._raise(rc, "batch update")
            except MapError as err:
                err.done = int(done[0])
                raise

    def _raise(self, rc: int, what: str) -> None:
        if rc == -errno.E2BIG:
            fix = f"`lbctl run {self._size_flag} N`" if self._size_flag else "a larger map"
            raise MapError(
                errno.E2BIG,
                f"map {self.name} is full ({self.max_entries} entries); raise it with {fix}",
            )
        _check(rc, f"{what} of map {self.name}")

    def delete(self, key: Any) -> bool:
        rc = _lib.bpf_map_delete_elem(self.fd, key)
        if rc == -errno.ENOENT:
            return False
        _check(rc, f"delete from map {self.name}")
        return True

    def keys(self) -> Iterator[Any]:
        if self.ringbuf:  # records, not entries: lbctl/datapath/ebpf/events.py reads them
            return
        prev = ffi.NULL
        while True:
            nxt = self.new_key()
            rc = _lib.bpf_map_get_next_key(self.fd, prev, nxt)
            if rc == -errno.ENOENT:
                return
            _check(rc, f"iterate map {self.name}")
            yield nxt
            prev = nxt

    def items(self) -> Iterator[tuple[Any, Any]]:
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # deleted while we iterated
                yield key, value

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def chunks(self, size: int = 4096) -> Iterator[tuple[Any, Any, int]]:
        """The map's entries, `size` at a time: (keys, values, count) per call.

        One system call per chunk (BPF_MAP_LOOKUP_BATCH) instead of two per
        entry; a per-CPU map's values hold `count * ncpus` elements.  Kernels
        or map types without batch lookups fall back to key iteration.
        """
        if self.ringbuf:
            return
        keys = ffi.new(f"{self.key_type}[]", size)
        values = ffi.new(f"{self.value_type}[]", size * self._ncpus)
        # the batch token of a hash map is a bucket index: 4 bytes, never more than a key
        token_size = max(ffi.sizeof(self.key_type), 8)
        tokens = (ffi.new("char[]", token_size), ffi.new("char[]", token_size))
        in_batch: Any = ffi.NULL
        while True:
            count = ffi.new("uint32_t *", size)
            rc = _lib.bpf_map_lookup_batch(
                self.fd, in_batch, tokens[1], keys, values, count, ffi.NULL
            )
            if rc in (-errno.EINVAL, -errno.EOPNOTSUPP, -524) and in_batch == ffi.NULL:
                yield from self._chunks_by_key(size)
                return
            if rc < 0 and rc != -errno.ENOENT:
                _check(rc, f"batch lookup in map {self.name}")
            if count[0]:
                yield keys, values, int(count[0])
            if rc == -errno.ENOENT:  # the last chunk
                return
            ffi.memmove(tokens[0], tokens[1], token_size)
            in_batch = tokens[0]

    def _chunks_by_key(self, size: int) -> Iterator[tuple[Any, Any, int]]:
        keys = ffi.new(f"{self.key_type}[]", size)
        values = ffi.new(f"{self.value_type}[]", size * self._ncpus)
        n = 0
        for key, value in self.items():
            keys[n] = key[0]
            ffi.memmove(values + n * self._ncpus, value, ffi.sizeof(value))
            n += 1
            if n == size:
                yield keys, values, n
                n = 0
        if n:
            yield keys, values, n

    def count(self) -> int:
        """Entries in the map, counted with batch lookups (see `chunks`)."""
        return sum(n for _, _, n in self.chunks())


@dataclasses.dataclass
class TestRun:
    """The outcome of BPF_PROG_TEST_RUN: the verdict and the packet as it left."""

    retval: int
    data: bytes
    duration_ns: int


def prog_test_run(
    prog_fd: int, packet: bytes, repeat: int = 1, ctx: bytes | None = None
) -> TestRun:
    """Run a loaded program once on a packet, without any network.

    `ctx` is the program's context as the kernel lays it out (struct
    __sk_buff, struct xdp_md), for the fields the kernel lets a test set,
    e.g. an XDP program's ingress_ifindex.
    """
    data_in = ffi.new("char[]", packet)
    data_out = ffi.new("char[]", len(packet) + 256)
    opts = ffi.new("struct bpf_test_run_opts *")
    opts.sz = ffi.sizeof("struct bpf_test_run_opts")
    opts.data_in = data_in
    opts.data_size_in = len(packet)
    opts.data_out = data_out
    opts.data_size_out = len(packet) + 256
    opts.repeat = repeat
    if ctx is not None:
        ctx_in = ffi.new("char[]", ctx)
        opts.ctx_in = ctx_in
        opts.ctx_size_in = len(ctx)
    _check(_lib.bpf_prog_test_run_opts(prog_fd, opts), "BPF_PROG_TEST_RUN")
    return TestRun(
        retval=opts.retval,
        data=bytes(ffi.buffer(data_out, opts.data_size_out)),
        duration_ns=opts.duration,
    )
