"""The map layouts of bpf/lbctl.h, read with cffi.

cffi parses the header's plain C declarations, so Python builds keys and
values as the same structs the BPF programs use: no struct.pack, no offsets
written twice.  Addresses and ports are network byte order in the structs;
`ip4`/`port` and their inverses convert at the edge.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
from typing import Any

import cffi

from lbctl.datapath.ebpf.settings import bpf_source_dir

_TYPEDEFS = """
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
typedef uint16_t __be16;
typedef uint32_t __be32;
"""

# Lines cffi's cdef cannot take: include guards and other directives.
_DIRECTIVE = re.compile(r"^\s*#\s*(ifndef|ifdef|endif|include|pragma|define\s+\w+\s*$)")


def cdef_text(header: str) -> str:
    """An lbctl.h as cffi's cdef takes it: the kernel's typedefs, no directives."""
    lines = (line for line in header.splitlines() if not _DIRECTIVE.match(line))
    return _TYPEDEFS + "\n".join(lines)


ffi = cffi.FFI()
ffi.cdef(cdef_text((bpf_source_dir() / "lbctl.h").read_text()))
# cffi resolves #define constants through a library object; an empty
# in-line "library" gives access to them without compiling anything.
_consts: Any = ffi.dlopen(None)


def const(name: str) -> int:
    """A #define constant of lbctl.h."""
    value = getattr(_consts, name)
    assert isinstance(value, int)
    return value


def new(ctype: str, **fields: Any) -> Any:
    """A zeroed struct of lbctl.h with the given fields set."""
    obj = ffi.new(f"{ctype} *")
    for name, value in fields.items():
        setattr(obj, name, value)
    return obj


def sizeof(ctype: str) -> int:
    return int(ffi.sizeof(ctype))


def ip4(addr: ipaddress.IPv4Address | str) -> int:
    """An IPv4 address as the __be32 field value that holds it."""
    if not isinstance(addr, ipaddress.IPv4Address):
        addr = ipaddress.IPv4Address(addr)
    return int.from_bytes(addr.packed, sys.byteorder)


def ip4_str(value: int) -> str:
    return str(ipaddress.IPv4Address(value.to_bytes(4, sys.byteorder)))


def port(value: int) -> int:
    """A port number as the __be16 field value that holds it."""
    return socket.htons(value)


def port_num(value: int) -> int:
    return socket.ntohs(value)


def c_string(value: Any) -> str:
    """A char[N] field as text."""
    raw = ffi.string(value)
    assert isinstance(raw, bytes)
    return raw.decode("utf-8", "replace")
