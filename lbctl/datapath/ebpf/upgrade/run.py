"""Upgrading pinned maps in place: other layouts and capacities, no flow dropped.

An agent starts on maps an older agent pinned, perhaps with other structs
(a new lbctl) or other sizes (a capacity flag changed).  Before bcc runs,
`Upgrade` compares every pinned map with what this build and these settings
need (kind, capacity, and the struct layout field by field: the pinned
layout record, lbctl/datapath/ebpf/upgrade/record.py, or layout 1 without one):

- a map that is the same is kept: bcc opens the pin, nothing is copied;
- one that differs gets a new map, in a staging directory `upgrade_<ns>`
  (the kept maps are pinned there too, so bcc opens them), and once the
  programs are loaded:

  1. copy: every entry, converted by name (lbctl/datapath/ebpf/upgrade/convert.py, the
     rules), in batches; a record in state COPIED marks the staging maps
     complete;
  2. delta: the entries the old programs changed meanwhile
     (lbctl/datapath/ebpf/upgrade/migrate.py);
  3. swap: every hook running an lbctl program gets the new one, atomically
     per hook (lbctl/datapath/ebpf/upgrade/swap.py);
  4. delta again, for what the old programs did until the swap;
  5. commit: the record goes to COMMITTING, each staging pin is renamed over
     the live one, maps this version no longer has are unpinned, the
     record moves last and becomes LIVE.

A crash (kill -9) anywhere leaves what the next start repairs: a staging
directory without a COPIED record was never served and is discarded; one
in COMMITTING is committed; one in COPIED may be served by some hooks and
the live maps by others, so both are sources of the next upgrade, which
merges them (the newer entry wins, counters take the larger count).

A capacity smaller than the entries a map holds is not applied: the
setting keeps its pinned value, and `lbctl status` and the log say so
with the fix; nothing is dropped.  A map whose layout changed in a way no
rule converts starts empty, reported the same way.  Neither stops the agent.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

from lbctl import __version__
from lbctl.datapath.ebpf import libbpf
from lbctl.datapath.ebpf.settings import BpfSettings
from lbctl.datapath.ebpf.upgrade import convert, mapspec, migrate, pinsets, record, swap
from lbctl.datapath.ebpf.upgrade import plan as upgradeplan
from lbctl.datapath.ebpf.upgrade.mapspec import MapSpec
from lbctl.datapath.ebpf.upgrade.pinsets import PinnedSet
from lbctl.datapath.ebpf.upgrade.rawmap import RawMap
from lbctl.datapath.ebpf.upgrade.structs import Layout, LayoutError

log = logging.getLogger(__name__)

SWAP_GRACE_S = 0.05  # packets already inside an old program finish within it
# Tests only: the step (copying, copied, swapped, committing) at which an upgrade
# stops and waits, so that a `kill -9` lands exactly there (tests/test_upgrade*.py).
PAUSE_ENV = "LBCTL_TEST_UPGRADE_PAUSE"


def _pause(step: str) -> None:
    if os.environ.get(PAUSE_ENV) == step:
        log.warning("upgrade paused at step %s (%s is set: tests only)", step, PAUSE_ENV)
        while True:
            time.sleep(3600)


Move = tuple[upgradeplan.MapPlan, migrate.MapMove, list[migrate.Source]]


class Upgrade:
    """Prepared before bcc compiles (which directory, which sizes); `finish`ed after."""

    def __init__(self, settings: BpfSettings) -> None:
        started = time.monotonic()
        self.pin_dir = settings.pin_dir
        self.layout = Layout.current()
        self.report = upgradeplan.Report(layout=self.layout.fingerprint)
        self._recover()
        self.sources = self._open_sources(settings.table_size)
        self.settings = upgradeplan.fit(self.layout, self.sources, settings, self.report.problems)
        self.specs = mapspec.specs(self.layout, self.settings)
        self.plans = upgradeplan.plan(self.specs, self.sources)
        live = next((s for s in self.sources if s.directory == self.pin_dir), None)
        known = set(live.layout.maps) if live else set()
        self.retire = (set(live.maps) & known) - set(self.specs) if live else set()
        moving = any(p.action in ("copy", "merge") for p in self.plans.values())
        self.staging: Path | None = None
        self._committed = False
        if moving or self.retire or len(self.sources) > 1:
            self._stage()
        self._prepare_s = time.monotonic() - started

    @property
    def compile_settings(self) -> BpfSettings:
        """The settings bcc compiles with: the staging directory when maps move."""
        return dataclasses.replace(self.settings, pin_dir=self.staging or self.pin_dir)

    # -- before compiling ---------------------------------------------------------

    def _recover(self) -> None:
        for staging in pinsets.staging_dirs(self.pin_dir):
            try:
                found = record.read(staging / record.NAME)
            except (record.RecordError, OSError):
                found = None
            if found is not None and found.state >= record.COMMITTING:
                retire = self._known_live_names() - set(found.map_ids)
                pinsets.commit(self.pin_dir, staging, retire)
                self.report.notes.append(
                    f"finished committing an upgrade a crash interrupted ({staging.name})"
                )
        for staging in pinsets.staging_dirs(self.pin_dir):
            try:
                found = record.read(staging / record.NAME)
            except (record.RecordError, OSError):
                found = None
            if found is None:
                pinsets.discard(staging)
                self.report.notes.append(
                    f"discarded {staging.name}: an upgrade interrupted before its copy was "
                    "complete (never served; the pinned maps it copied from are intact)"
                )

    def _known_live_names(self) -> set[str]:
        """Names of the live directory's maps that some lbctl layout declares."""
        known = set(record.layout_1().maps) | set(self.layout.maps)
        try:
            live = record.read(self.pin_dir / record.NAME)
        except (record.RecordError, OSError):
            live = None
        if live is not None:
            known |= set(live.to_layout().maps)
        maps = pinsets.open_maps(self.pin_dir)
        for raw in maps.values():
            raw.close()
        return set(maps) & known

    def _open_sources(self, table_size: int) -> list[PinnedSet]:
        out = []
        live = pinsets.open_live(self.pin_dir, table_size, self.report.problems)
        if live is not None:
            out.append(live)
        for staging in pinsets.staging_dirs(self.pin_dir):
            found = record.read(staging / record.NAME)
            assert found is not None and found.state == record.COPIED  # _recover saw to it
            out.append(pinsets.open_staging(staging, found, self.report.problems))
            self.report.notes.append(
                f"found {staging.name}, an upgrade interrupted after its copy: its maps and "
                "the pinned ones are merged (the newer entry wins)"
            )
        if out:
            self.report.found = "; ".join(s.label for s in out)
        return out

    def _stage(self) -> None:
        self.staging = pinsets.new_staging(self.pin_dir)
        for plan in self.plans.values():
            keep = plan.target if plan.action == "merge" else None
            if plan.action == "keep":
                keep = plan.sources[0][1]
            if keep is not None:
                libbpf.obj_pin(keep.fd, str(self.staging / plan.name))

    # -- after loading ------------------------------------------------------------

    def finish(self, map_fds: Mapping[str, int], prog_fds: Mapping[str, int]) -> upgradeplan.Report:
        """Move the entries, swap the programs, commit; or just record the layout."""
        started = time.monotonic()
        targets = {name: RawMap(fd, f"{name} (new)", owns_fd=False) for name, fd in map_fds.items()}
        self._check(targets)
        self.report.time = time.time()
        if self.staging is None:
            self.report.action = "adopted" if self.sources else "created"
            self._write_record(self.pin_dir / record.NAME, targets, record.LIVE)
            self._close()
            return self.report
        self.report.action = "migrated"
        try:
            moves = self._copy(targets)
            _pause("copying")
            self._write_record(self.staging / record.NAME, targets, record.COPIED)
        except BaseException:
            self.abandon()
            raise
        # From here on the staging maps may be served: never discard them again.
        _pause("copied")
        self._delta(moves)
        swapped = swap.swap(prog_fds, self.pin_dir)
        time.sleep(SWAP_GRACE_S)
        self._delta(moves)
        _pause("swapped")
        moved = [raw for p in self.plans.values() if p.action != "keep" for _, raw in p.sources]
        moved += [self.sources[0].maps[name] for name in self.retire]
        old = {raw.id for raw in moved} - {t.id for t in targets.values()}
        for hook in swap.users(old, self.pin_dir):
            self.report.problems.append(
                f"{hook} still runs a program that uses the old maps: it serves stale "
                "entries until lbctl's program is attached there again"
            )
        self.report.problems += swapped.errors
        record.set_state(self.staging / record.NAME, record.COMMITTING)
        retired = pinsets.commit(
            self.pin_dir, self.staging, self.retire, after_first=lambda: _pause("committing")
        )
        self._committed = True
        for plan in self.plans.values():
            if plan.action in ("copy", "merge"):
                self.report.maps.append(
                    {
                        "name": plan.name,
                        "action": "copied" if plan.action == "copy" else "merged",
                        "why": plan.why,
                        "written": plan.counts.written,
                        "notCarried": plan.counts.unconvertible + plan.counts.refused,
                    }
                )
        for name in retired:
            self.report.maps.append(
                {"name": name, "action": "retired", "why": "not in this build", "written": 0}
                | {"notCarried": 0}
            )
        self.report.hooks = swapped.summary()
        self.report.seconds = self._prepare_s + time.monotonic() - started
        self.report.time = time.time()
        self._close()
        self._append_history()
        return self.report

    def _check(self, targets: Mapping[str, RawMap]) -> None:
        for name, spec in self.specs.items():
            raw = targets.get(name)
            if raw is None:
                continue
            info = raw.info
            have = (info.kind, info.key_size, info.value_size, info.max_entries, info.flags)
            want = (spec.kind, spec.key_size, spec.value_size, spec.max_entries, spec.flags)
            if have != want:
                from lbctl.datapath import DatapathError

                raise DatapathError(
                    f"map {name} as loaded is {have} but {want} was planned; this is a bug "
                    "in lbctl's map declarations (bpf/maps.h against "
                    "lbctl/datapath/ebpf/upgrade/mapspec.py)"
                )

    def _copy(self, targets: Mapping[str, RawMap]) -> list[Move]:
        moves = []
        for plan in self.plans.values():
            if plan.action not in ("copy", "merge"):
                continue
            spec = self.specs[plan.name]
            target = targets[plan.name]
            if plan.action == "merge":
                assert plan.target is not None and plan.target.id == target.id
            move = migrate.MapMove(spec, target)
            sources: list[migrate.Source] = []
            for i, (pinned, raw) in enumerate(plan.sources):
                source = self._source(spec, pinned, raw)
                if source is None:
                    continue
                fresh = plan.action == "copy" and not sources
                prefer = plan.action == "copy" and i > 0
                plan.counts.add(move.copy(source, fresh, prefer))
                sources.append(source)
            moves.append((plan, move, sources))
        return moves

    def _source(self, spec: MapSpec, pinned: PinnedSet, raw: RawMap) -> migrate.Source | None:
        decl = pinned.layout.maps.get(spec.name)
        if decl is None:
            self.report.problems.append(
                f"map {spec.name} of {pinned.label}: its layout does not describe it, so it "
                "cannot be read; the new map starts without its entries"
            )
            return None
        try:
            old_key = pinned.layout.describe(decl.key)
            old_value = pinned.layout.describe(decl.value)
        except LayoutError as err:
            self.report.problems.append(
                f"map {spec.name} of {pinned.label}: {err}; the new map starts without its entries"
            )
            return None
        if (raw.info.key_size, raw.info.value_size) != (old_key.size, old_value.size):
            self.report.problems.append(
                f"map {spec.name} of {pinned.label} has key/value sizes {raw.info.key_size}/"
                f"{raw.info.value_size}, not the {old_key.size}/{old_value.size} of its layout: "
                "it is not read; the new map starts without its entries"
            )
            return None
        key, value = convert.plan(old_key, spec.key), convert.plan(old_value, spec.value)
        if not (key.ok and value.ok):
            for problem in key.problems + value.problems:
                self.report.problems.append(
                    f"map {spec.name}: {problem}; the new map starts without the entries of "
                    f"{pinned.label}"
                )
            return None
        for note in key.notes + value.notes:
            if note not in self.report.notes:
                self.report.notes.append(f"map {spec.name}: {note}")
        source = migrate.Source(raw, key, value)
        if spec.name == "lb_tables":
            source.key_fix = upgradeplan.table_index(pinned, self.settings)
        if spec.value.leaf("table_len") is not None:
            source.value_fix = upgradeplan.clamp_table_len(pinned, self.settings)
        return source

    def _delta(self, moves: list[Move]) -> None:
        for plan, move, sources in moves:
            for source in sources:
                plan.counts.add(move.delta(source))

    def _write_record(self, pin: Path, targets: Mapping[str, RawMap], state: int) -> None:
        previous = next((s.record for s in reversed(self.sources) if s.record), None)
        self._history = list(previous.history) if previous else []
        rec = record.Record(
            layout=self.layout.fingerprint,
            lbctl=__version__,
            header=self.layout.header,
            declarations=self.layout.declarations_text,
            settings=mapspec.settings_dict(self.settings),
            map_ids={name: raw.id for name, raw in targets.items()},
            history=self._history,
            state=state,
        )
        record.write(pin, rec)
        self._record = rec

    def _append_history(self) -> None:
        """The live record keeps the last upgrades, for `lbctl status`."""
        entry = {k: v for k, v in self.report.as_dict().items() if k != "notes"}
        self._record.history = [*self._history, entry][-record.HISTORY :]
        self._record.state = record.LIVE
        record.write(self.pin_dir / record.NAME, self._record)

    def _close(self) -> None:
        for pinned in self.sources:
            pinned.close()

    def abandon(self) -> None:
        """Drop a staging directory that was never served (the compile failed)."""
        self._close()
        if self.staging is not None and not self._committed:
            staged = self.staging / record.NAME
            if not staged.exists():
                pinsets.discard(self.staging)
            self.staging = None
