"""The layout record: a small pinned map that says what the pinned maps are.

The kernel knows a map's kind, key and value sizes and max_entries, but not
its fields.  So from this version on, lbctl pins `lbctl_meta` next to its
maps: an array map whose entry 0 is a fixed header (magic, format, state,
length) and whose next entries hold a zlib-compressed JSON document:

- the text of the bpf/lbctl.h the maps were made with, and their
  declarations from bpf/maps.h, so a later version reads their structs
  field by field (lbctl/datapath/ebpf/upgrade/structs.py);
- the settings they were sized with, and the kernel id of each map, so a
  pin that was replaced behind the record's back is not misread;
- the last upgrades, for `lbctl status`.

Maps pinned without a record were made by an lbctl before it: layout 1,
frozen in lbctl/datapath/ebpf/upgrade/layout1.py.  The header's format never changes;
the document may grow keys (readers ignore the ones they do not know).

A staging directory of an upgrade holds a record too; its state says how
far the upgrade got (lbctl/datapath/ebpf/upgrade/run.py): COPIED, the maps are
complete and the programs may be swapped to them; COMMITTING, the swap is
done and the pins are being moved.  The live directory's record is LIVE.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

from lbctl.datapath.ebpf import libbpf
from lbctl.datapath.ebpf.upgrade import layout1, rawmap
from lbctl.datapath.ebpf.upgrade.structs import Layout

NAME = "lbctl_meta"
MAGIC = b"LBCTLREC"
FORMAT = 1
_HEADER = struct.Struct("=8sIII")  # magic, format, state, length of the document
CHUNK = 4096  # value size of the record map
CHUNKS = 64  # entries: 256 KiB for the document, ~20 times what it needs
HISTORY = 10  # upgrades kept in the record

COPIED, COMMITTING, LIVE = 1, 2, 3
STATES = {COPIED: "copied", COMMITTING: "committing", LIVE: "live"}


class RecordError(ValueError):
    """A record that cannot be read; the message names the pin and the problem."""


@dataclasses.dataclass
class Record:
    layout: str  # fingerprint of the structs (structs.Layout.fingerprint)
    lbctl: str  # the version that wrote it
    header: str  # its bpf/lbctl.h
    declarations: str  # its bpf/maps.h (the pinned-map declarations)
    settings: dict[str, Any]  # what sized the maps (mapspec.settings_dict)
    map_ids: dict[str, int]  # map name -> kernel id of the map pinned under that name
    written: float = dataclasses.field(default_factory=time.time)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    state: int = LIVE

    def to_layout(self) -> Layout:
        return Layout(layout_name(self.layout), self.header, self.declarations)

    def document(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["state"]
        return out


@functools.cache
def layout_1() -> Layout:
    """The layout of maps pinned without a record."""
    return Layout(layout1.NAME, layout1.HEADER, layout1.MAP_DECLARATIONS)


def layout_name(fingerprint: str) -> str:
    """How messages name a layout: "layout 1", or by its fingerprint."""
    return layout1.NAME if fingerprint == layout_1().fingerprint else f"layout {fingerprint}"


def read(pin: Path) -> Record | None:
    """The record pinned at `pin`; None when there is none or it is incomplete.

    A record is pinned only once written whole, so an incomplete one is a
    map of another program under the same name: reported, not trusted.
    """
    if not pin.exists():
        return None
    raw = rawmap.RawMap.open(str(pin))
    try:
        info = raw.info
        if (info.kind, info.key_size, info.value_size) != ("array", 4, CHUNK):
            raise RecordError(f"{pin} is not an lbctl layout record ({info.kind} map)")
        head = raw.lookup(struct.pack("=I", 0))
        assert head is not None  # an array has every index
        magic, fmt, state, length = _HEADER.unpack_from(head)
        if magic != MAGIC or fmt != FORMAT or not 0 < length <= (info.max_entries - 1) * CHUNK:
            raise RecordError(f"{pin}: not a layout record lbctl {FORMAT} can read")
        blob = b"".join(
            raw.lookup(struct.pack("=I", i)) or b"" for i in range(1, 1 + -(-length // CHUNK))
        )[:length]
    finally:
        raw.close()
    try:
        doc = json.loads(zlib.decompress(blob))
        known = {f.name for f in dataclasses.fields(Record)} - {"state"}
        return Record(**{k: v for k, v in doc.items() if k in known}, state=state)
    except (ValueError, TypeError, zlib.error) as err:
        raise RecordError(f"{pin}: the layout record is damaged ({err})") from err


def write(pin: Path, record: Record) -> None:
    """Pin a record at `pin`, replacing the one there in one step (rename)."""
    blob = zlib.compress(json.dumps(record.document(), sort_keys=True).encode(), 9)
    if len(blob) > (CHUNKS - 1) * CHUNK:
        raise RecordError(f"layout record of {len(blob)} bytes does not fit {pin}")
    fd = rawmap.create("array", NAME, 4, CHUNK, CHUNKS)
    raw = rawmap.RawMap(fd, NAME)
    try:
        head = _HEADER.pack(MAGIC, FORMAT, record.state, len(blob)).ljust(CHUNK, b"\0")
        entries = [(struct.pack("=I", 0), head)]
        for i in range(0, len(blob), CHUNK):
            chunk = blob[i : i + CHUNK].ljust(CHUNK, b"\0")
            entries.append((struct.pack("=I", 1 + i // CHUNK), chunk))
        failed = raw.write(entries)
        if failed:
            raise OSError(failed[0][1], f"write the layout record: {os.strerror(failed[0][1])}")
        temporary = pin.with_name(f"{pin.name}_new")  # bpffs refuses names with a dot
        temporary.unlink(missing_ok=True)
        libbpf.obj_pin(fd, str(temporary))
        os.rename(temporary, pin)
    finally:
        raw.close()


def set_state(pin: Path, state: int) -> None:
    """Change a pinned record's state in place: one map update, atomic."""
    raw = rawmap.RawMap.open(str(pin))
    try:
        head = raw.lookup(struct.pack("=I", 0))
        assert head is not None
        magic, fmt, _, length = _HEADER.unpack_from(head)
        new = _HEADER.pack(magic, fmt, state, length) + head[_HEADER.size :]
        rc = raw.update(struct.pack("=I", 0), new)
        if rc < 0:
            raise OSError(-rc, f"set the state of {pin}: {os.strerror(-rc)}")
    finally:
        raw.close()
