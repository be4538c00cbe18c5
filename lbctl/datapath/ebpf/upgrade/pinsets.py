"""Sets of pinned maps: the live directory, and the staging directories of upgrades.

The live set is what `--bpffs DIR` holds: the maps the programs use, the
layout record (`lbctl_meta`) and the socket hooks' links.  An upgrade
builds its new maps in a staging directory inside it, `DIR/upgrade_<ns>`,
and commits by renaming each pin over the live one, the record last
(lbctl/datapath/ebpf/upgrade/run.py says when each step happens and what a restart
does with a staging directory a crash left).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lbctl.datapath.ebpf import cgroup
from lbctl.datapath.ebpf.upgrade import mapspec, record
from lbctl.datapath.ebpf.upgrade.rawmap import RawMap
from lbctl.datapath.ebpf.upgrade.structs import Layout, LayoutError

log = logging.getLogger(__name__)

STAGING_PREFIX = "upgrade_"  # bpffs refuses names with a dot


@dataclasses.dataclass
class PinnedSet:
    """One directory's maps, with the layout and settings they were made with."""

    directory: Path
    label: str  # for messages: "the pinned maps (layout 1)", ...
    layout: Layout
    settings: dict[str, Any]
    maps: dict[str, RawMap]
    record: record.Record | None

    def close(self) -> None:
        for raw in self.maps.values():
            raw.close()
        self.maps = {}


def staging_dirs(pin_dir: Path) -> list[Path]:
    """Staging directories of upgrades, oldest first."""
    if not pin_dir.is_dir():
        return []
    return sorted(p for p in pin_dir.glob(f"{STAGING_PREFIX}*") if p.is_dir())


def new_staging(pin_dir: Path) -> Path:
    path = pin_dir / f"{STAGING_PREFIX}{time.time_ns()}"
    path.mkdir()
    return path


def discard(directory: Path) -> list[str]:
    """Remove a staging directory and its pins; the names it held."""
    names = []
    for pin in sorted(directory.iterdir()):
        pin.unlink(missing_ok=True)
        names.append(pin.name)
    with contextlib.suppress(FileNotFoundError):
        directory.rmdir()
    return names


def _is_map_pin(path: Path) -> bool:
    name = path.name
    return not (
        name.startswith(STAGING_PREFIX)
        or name.startswith(record.NAME)
        or name.startswith(cgroup.LINK_PREFIX)
        or path.is_dir()
    )


def open_maps(directory: Path, names: set[str] | None = None) -> dict[str, RawMap]:
    """The maps pinned in a directory (other pinned objects are skipped)."""
    out: dict[str, RawMap] = {}
    if not directory.is_dir():
        return out
    for pin in sorted(directory.iterdir()):
        if not _is_map_pin(pin) or (names is not None and pin.name not in names):
            continue
        try:
            out[pin.name] = RawMap.open(str(pin), f"{pin.name} ({directory})")
        except OSError:  # not a map (a program or a link), or gone meanwhile
            continue
    return out


def open_live(pin_dir: Path, table_size: int, problems: list[str]) -> PinnedSet | None:
    """The live directory's maps, or None when nothing is pinned there."""
    maps = open_maps(pin_dir)
    if not maps:
        return None
    found: record.Record | None = None
    try:
        found = record.read(pin_dir / record.NAME)
    except (record.RecordError, OSError) as err:
        problems.append(
            f"layout record {pin_dir / record.NAME}: {err}; the maps are read as layout 1 "
            "(lbctl before the record); if they are not, run `lbctl cleanup` (established "
            "connections through them are lost)"
        )
    if found is not None:
        stale = sorted(n for n, m in maps.items() if found.map_ids.get(n, m.id) != m.id)
        if stale:
            problems.append(
                f"layout record {pin_dir / record.NAME} describes other maps than those pinned "
                f"as {', '.join(stale)} (they were replaced by something that writes no record, "
                "e.g. an older lbctl): the maps are read as layout 1"
            )
            found = None
    if found is not None:
        layout = readable(found, pin_dir, problems)
        label = f"the pinned maps ({layout.name}, recorded by lbctl {found.lbctl})"
        return PinnedSet(pin_dir, label, layout, dict(found.settings), maps, found)
    layout = record.layout_1()
    sizes = {name: raw.info.max_entries for name, raw in maps.items()}
    settings = mapspec.infer_settings(layout, sizes, table_size)
    label = f"the pinned maps ({layout.name}: no layout record)"
    return PinnedSet(pin_dir, label, layout, settings, maps, None)


def readable(found: record.Record, where: Path, problems: list[str]) -> Layout:
    """The record's layout; one that declares no map when this version cannot read it."""
    try:
        return found.to_layout()
    except LayoutError as err:
        problems.append(
            f"layout record {where / record.NAME} (lbctl {found.lbctl}): {err}; its maps "
            "cannot be converted: they are replaced by empty ones (established flows through "
            "them are lost); fix: upgrade with an lbctl that reads that layout"
        )
        return Layout(f"layout {found.layout} (unreadable)", "", "")


def open_staging(directory: Path, found: record.Record, problems: list[str]) -> PinnedSet:
    maps = open_maps(directory, set(found.map_ids))
    layout = readable(found, directory, problems)
    label = f"the maps of an upgrade interrupted by a crash ({directory.name}, {layout.name})"
    return PinnedSet(directory, label, layout, dict(found.settings), maps, found)


def commit(
    pin_dir: Path,
    staging: Path,
    retire: set[str],
    after_first: Callable[[], None] | None = None,
) -> list[str]:
    """Move a staging directory's pins over the live ones; the retired map names.

    Idempotent, so a restart finishes a commit a crash interrupted: the
    staging record says COMMITTING until everything else moved, and it moves
    last.  Other staging directories are discarded first: this one already
    holds what they had.
    """
    pin = staging / record.NAME
    for other in staging_dirs(pin_dir):
        if other != staging:
            discard(other)
    for entry in sorted(staging.iterdir()):
        if entry.name != record.NAME:
            os.replace(entry, pin_dir / entry.name)
            if after_first is not None:  # tests: a crash in the middle of the commit
                after_first()
                after_first = None
    retired = []
    for name in sorted(retire):
        target = pin_dir / name
        if target.exists() and _is_map_pin(target):
            target.unlink()
            retired.append(name)
    if pin.exists():
        record.set_state(pin, record.LIVE)
        os.replace(pin, pin_dir / record.NAME)
    with contextlib.suppress(FileNotFoundError):
        staging.rmdir()
    return retired
