"""Service frontends in the BPF maps, written so no packet sees a bad slot.

A frontend (VIP, port, protocol) has a header in lb4_services holding its
id and backend count, and numbered slots 1..count in lb_slots naming
backends of lb4_backends.  The rules:

- adding backends: write the backend entries and the new slots beyond the
  count, then raise the count;
- removing a backend: copy the last slot into its hole, lower the count,
  then delete the old last slot; a backend entry goes only when no slot
  names it any more;
- a new frontend becomes visible with its header, written last; a removed
  one disappears with its header, deleted first.

Every write of one frontend either completes or is undone, so a full map
costs that one frontend, never a half-written entry.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from lbctl.datapath import DatapathError
from lbctl.datapath.ebpf import conntrack_gc, entries, layout
from lbctl.datapath.ebpf.entries import (
    MAX_BACKENDS_PER_FRONTEND,
    SCHED_CODES,
    Batch,
    IdPool,
    ProgrammedBackend,
    ProgrammedFrontend,
    Target,
    Undo,
    backend_flags,
)
from lbctl.datapath.ebpf.libbpf import MapError
from lbctl.datapath.ebpf.maps import Maps
from lbctl.datapath.ebpf.nodeconf import PLACEMENT_FLAGS, Placement
from lbctl.datapath.ebpf.servicecounters import Labels, ServiceCounters
from lbctl.datapath.ebpf.tables import RowsExhausted, TableRows
from lbctl.model import Protocol, ServiceRef
from lbctl.plan import scheduling
from lbctl.plan.planner import Backend, Frontend, FrontendKey

log = logging.getLogger(__name__)


class FrontendWriter:
    """What the maps hold, mirrored in Python, and the only code writing them."""

    def __init__(self, maps: Maps, table_size: int = scheduling.DEFAULT_TABLE_SIZE) -> None:
        self.maps = maps
        self.rows = TableRows(maps.lb_tables, table_size)
        self.frontends: dict[FrontendKey, ProgrammedFrontend] = {}
        self.backends: dict[Target, ProgrammedBackend] = {}
        self._frontend_ids = IdPool()
        self._backend_ids = IdPool()
        self.map_ops = 0  # map writes and deletes, for tests and metrics
        self.counters = ServiceCounters(maps.lb_fe_stats)  # per-Service packets and drops
        self.placement = Placement()  # where backends are: part of their flags

    def _flags(self, b: Backend) -> int:
        """lb4_backend.flags: the endpoint's conditions and where it is."""
        return backend_flags(b) | self.placement.flags(b.address)

    def set_placement(self, placement: Placement) -> list[str]:
        """The pod network or the node's addresses changed: rewrite the flags of
        the backends whose place changes (one write each; a new flow reads
        either the old or the new entry, whole).  Returns the failures."""
        if placement.same(self.placement):
            return []
        self.placement = placement
        errors = []
        for (address, port, protocol), have in list(self.backends.items()):
            flags = have.flags & ~PLACEMENT_FLAGS | placement.flags(address)
            if flags == have.flags:
                continue
            old, have.flags = have.flags, flags
            try:
                self._write_backend((address, port, protocol), have)
            except OSError as err:
                have.flags = old  # the next reconcile finds it differs and retries
                errors.append(f"backend {address}:{port}/{protocol.name}: {err}")
        return errors

    # -- reading what is already there (a restart adopts pinned maps) --------

    def adopt(self) -> None:
        """Rebuild the mirror from the maps; drop what cannot be decoded."""
        m = self.maps
        targets: dict[int, Target] = {}
        for key, be in m.lb4_backends.items():
            target = (
                entries.ipv4(be.addr),
                layout.port_num(be.port),
                Protocol(be.proto),
            )
            ident = int(key[0])
            targets[ident] = target
            self.backends[target] = ProgrammedBackend(self._backend_ids.take(ident), be.flags)
        slots: dict[int, dict[int, int]] = {}
        for key, slot in m.lb_slots.items():
            slots.setdefault(key.frontend_id, {})[key.slot] = slot.backend_id
        metas = {int(k[0]): v for k, v in m.lb_frontend_meta.items()}
        for key, svc in m.lb4_services.items():
            fkey = FrontendKey(
                entries.ipv4(key.addr), layout.port_num(key.port), Protocol(key.proto), key.scope
            )
            meta = metas.get(svc.frontend_id)
            ref = (
                ServiceRef(layout.c_string(meta.namespace), layout.c_string(meta.name))
                if meta
                else ServiceRef("", "")
            )
            raw = [slots.get(svc.frontend_id, {}).get(n) for n in range(1, svc.count + 1)]
            clean = list(dict.fromkeys(targets[b] for b in raw if b in targets))
            fe = ProgrammedFrontend(
                self._frontend_ids.take(svc.frontend_id),
                ref,
                layout.c_string(meta.port_name) if meta else "",
                clean,
                svc.flags,
                layout.c_string(meta.kind) if meta else "",
                svc.sched,
                svc.affinity_s,
            )
            if svc.table and self.rows.adopt(svc.table):
                # Kept as found; the first sync rebuilds it (its spec is
                # unknown), writing only the entries that differ.
                fe.table = svc.table
                fe.row = self.rows.read(svc.table, svc.table_len)
            # the header as the map holds it: a row not adopted makes them differ
            fe.written = entries.header_fields(svc)
            self.frontends[fkey] = fe
            for target in clean:
                self.backends[target].refs += 1
            if [targets.get(b) if b is not None else None for b in raw] != clean:
                # A crash between two writes left a duplicate or a hole.
                log.warning("frontend %s: repairing slots left by an interrupted update", fkey)
                for n, target in enumerate(clean, start=1):
                    self._write_slot(fe.ident, n, target)
                self._write_header(fkey, fe)
        self._sweep(slots, metas)
        log.info(
            "adopted %d frontends and %d backends from pinned maps",
            len(self.frontends),
            len(self.backends),
        )

    def _sweep(self, slots: dict[int, dict[int, int]], metas: Mapping[int, Any]) -> None:
        """Delete what no live frontend uses: it can only be left by a crash."""
        live = {fe.ident: fe for fe in self.frontends.values()}
        for ident, own in slots.items():
            fe = live.get(ident)
            for n in own:
                if fe is None or n > len(fe.slots):
                    self._delete_slot(ident, n)
        for ident in metas:
            if ident not in live:
                self._delete(self.maps.lb_frontend_meta, entries.id_key(ident))
        wanted = {(fe.ident, t) for fe in live.values() for t in fe.slots}
        by_ids = {(ident, self.backends[t].ident): (ident, t) for ident, t in wanted}
        present = set()
        for key, _ in self.maps.lb_members.items():
            member = by_ids.get((key.frontend_id, key.backend_id))
            if member is None:
                self._delete(self.maps.lb_members, key)
            else:
                present.add(member)
        # Maps pinned by an older lbctl, or a crash mid-update, may lack some.
        for ident, target in wanted - present:
            self._write_member(ident, target)
        for target, be in list(self.backends.items()):
            if be.refs <= 0:
                del self.backends[target]
                self._delete(self.maps.lb4_backends, entries.id_key(be.ident))
        # Scheduler state of frontends and backends that are gone.
        backend_ids = {be.ident for be in self.backends.values()}
        for bpf_map, alive in (
            (self.maps.lb_rr, live),
            (self.maps.lb_conns, backend_ids),
            (self.maps.lb_conns_expired, backend_ids),
        ):
            for key in [int(k[0]) for k in list(bpf_map.keys())]:
                if key not in alive:
                    self._delete(bpf_map, entries.id_key(key))
        self.counters.sweep(live)

    # -- changes --------------------------------------------------------------

    def apply(self, upserts: Iterable[Frontend], removals: Iterable[FrontendKey]) -> list[str]:
        """Program changes; return one message per frontend that failed."""
        errors = []
        for key in removals:
            try:
                self.remove(key)
            except Exception as err:  # one frontend's failure must not stop the others
                errors.append(f"removing frontend {key}: {err}")
        for fe in upserts:
            try:
                if len(fe.backends) > MAX_BACKENDS_PER_FRONTEND:
                    raise DatapathError(
                        f"{len(fe.backends)} backends; a frontend holds at most "
                        f"{MAX_BACKENDS_PER_FRONTEND}"
                    )
                self.upsert(fe)
            except Exception as err:  # reported, retried by the agent
                errors.append(f"Service {fe.service} port {fe.port_name or fe.key.port}: {err}")
        return errors

    def reconcile(
        self, desired: Mapping[FrontendKey, Frontend], remove_stale: bool = True
    ) -> list[str]:
        """Make the maps hold exactly `desired`, touching only what differs."""
        stale = [key for key in self.frontends if key not in desired] if remove_stale else []
        errors = self.apply([], stale)
        new = [fe for key, fe in desired.items() if key not in self.frontends]
        errors += self.create_many(new)
        created = {fe.key for fe in new}
        changed = [fe for key, fe in desired.items() if key not in created and not self.matches(fe)]
        return errors + self.apply(changed, [])

    def create_many(self, fes: list[Frontend]) -> list[str]:
        """Create new frontends with one batched write per map (a first sync).

        The order of the one-by-one path holds map by map: backends, metadata,
        members and slots are all written before the headers that make the
        frontends visible.  When a batch fails (a full map), everything the
        batches wrote is deleted again and the frontends go one by one, which
        programs what fits and names each frontend that does not.
        """
        simple: list[tuple[Frontend, list[tuple[Target, ProgrammedBackend]]]] = []
        rest: list[Frontend] = []
        fresh: dict[Target, ProgrammedBackend] = {}
        for fe in fes:
            if (
                fe.key in self.frontends
                or len(fe.backends) > MAX_BACKENDS_PER_FRONTEND
                or fe.scheduler in scheduling.TABLE_SCHEDULERS
            ):
                rest.append(fe)  # one by one: the careful path, or a table row to fill
                continue
            wanted = [(b.target, self._flags(b)) for b in fe.backends]
            known = [self.backends.get(t) or fresh.get(t) for t, _ in wanted]
            if any(be and be.flags != f for be, (_, f) in zip(known, wanted, strict=True)):
                rest.append(fe)  # a shared backend changes its flags: the careful path
                continue
            uses = []
            for be, (target, flags) in zip(known, wanted, strict=True):
                if be is None:
                    be = fresh[target] = ProgrammedBackend(self._backend_ids.take(), flags)
                uses.append((target, be))
            simple.append((fe, uses))
        if not simple:
            return self.apply(rest, [])
        m = self.maps
        idents = [self._frontend_ids.take() for _ in simple]
        slots = sum(len(uses) for _, uses in simple)
        batches = [
            Batch(m.lb4_backends, len(fresh)),
            Batch(m.lb_frontend_meta, len(simple)),
            Batch(m.lb_members, slots),
            Batch(m.lb_slots, slots),
            Batch(m.lb4_services, len(simple)),
        ]
        backends, metas, members, slot_batch, headers = batches
        for target, be in fresh.items():
            backends.add_backend(be.ident, target, be.flags)
        made = []
        for (fe, uses), ident in zip(simple, idents, strict=True):
            metas.add_meta(ident, fe.service, fe.port_name, fe.kind)
            for n, (_, be) in enumerate(uses, start=1):
                members.add_member(ident, be.ident)
                slot_batch.add_slot(ident, n, be.ident)
            have = self._programmed(ident, fe, [target for target, _ in uses])
            headers.add_header(fe.key, have)
            have.written = have.header_state()
            made.append(have)
        self.counters.create_many(idents)  # before the headers: the first packets count
        try:
            for batch in batches:
                batch.write()
        except MapError as err:
            for batch in reversed(batches):
                batch.unwrite()
            for ident in idents:
                self.counters.discard(ident)
            for ident in idents:
                self._frontend_ids.release(ident)
            for be in fresh.values():
                self._backend_ids.release(be.ident)
            log.warning("batched write failed (%s); programming frontends one by one", err)
            return self.apply(fes, [])
        self.map_ops += sum(batch.count for batch in batches)
        self.backends.update(fresh)
        for (fe, uses), have in zip(simple, made, strict=True):
            self.frontends[fe.key] = have
            for _, be in uses:
                be.refs += 1
        return self.apply(rest, [])

    @staticmethod
    def _programmed(ident: int, fe: Frontend, slots: list[Target]) -> ProgrammedFrontend:
        return ProgrammedFrontend(
            ident,
            fe.service,
            fe.port_name,
            slots,
            entries.frontend_flags(fe),
            fe.kind,
            SCHED_CODES[fe.scheduler],
            fe.affinity_timeout,
        )

    def service_labels(self) -> dict[int, Labels]:
        """The Service port of each frontend id: what its counters are exported under."""
        return {have.ident: labels_of(key, have) for key, have in list(self.frontends.items())}

    def affinities(self) -> dict[int, conntrack_gc.Affinity]:
        """The frontends with ClientIP affinity, by id, for the sweep."""
        return {
            have.ident: conntrack_gc.Affinity(
                have.affinity_s, frozenset(self.backends[t].ident for t in have.slots)
            )
            for have in self.frontends.values()
            if have.affinity_s
        }

    def matches(self, fe: Frontend) -> bool:
        have = self.frontends.get(fe.key)
        if have is None or not have.describes(fe) or have.written != have.header_state():
            return False
        if sorted(have.slots) != sorted(b.target for b in fe.backends):
            return False
        if have.spec != entries.table_spec(fe):
            return False
        return all(self.backends[b.target].flags == self._flags(b) for b in fe.backends)

    def upsert(self, fe: Frontend) -> None:
        have = self.frontends.get(fe.key)
        if have is None:
            self._create(fe)
            return
        if (have.service, have.port_name, have.kind) != (fe.service, fe.port_name, fe.kind):
            self._write_meta(have.ident, fe.service, fe.port_name, fe.kind)
            have.service, have.port_name, have.kind = fe.service, fe.port_name, fe.kind
        undo = Undo()
        try:
            for b in fe.backends:
                self._hold_backend(b, undo)
            # The table names the wanted backends (all held) before the
            # header counts them, and before any leaves.
            self._fill_table(fe, have, undo)
            self._add_slots(fe.key, have, [b.target for b in fe.backends], undo)
        except Exception:
            undo.run()
            raise
        # The references taken above are now held by the slots (new ones) or
        # were taken twice (backends already in a slot): give back the extras.
        for b in fe.backends:
            self._release_backend(b.target)
        # The header takes its new scheduler and table before a backend
        # leaves, so it never names a row that names a deleted backend.
        self._finish_header(fe, have)
        # Remove only after adding, so replacing every backend never passes
        # through a count of zero.
        wanted = {b.target for b in fe.backends}
        leaving = [t for t in have.slots if t not in wanted]
        if leaving:
            slot_of = {t: n for n, t in enumerate(have.slots, start=1)}
            for target in leaving:
                self._remove_slot(fe.key, have, target, slot_of)

    def _finish_header(self, fe: Frontend, have: ProgrammedFrontend) -> None:
        """Write the header's settings (flags, scheduler, table, affinity) if
        they changed; a table no longer used is given up after the header
        stops naming it."""
        old = (have.flags, have.sched, have.affinity_s, have.table, have.row, have.spec)
        have.flags = entries.frontend_flags(fe)
        have.sched = SCHED_CODES[fe.scheduler]
        have.affinity_s = fe.affinity_timeout
        unused = have.table if entries.table_spec(fe) is None else 0
        if unused:
            have.table, have.row, have.spec = 0, [], None
        if have.header_state() != have.written:
            try:
                self._write_header(fe.key, have)
            except OSError:
                have.flags, have.sched, have.affinity_s, have.table, have.row, have.spec = old
                raise
        if unused:
            self.rows.release(unused)

    def _fill_table(self, fe: Frontend, have: ProgrammedFrontend, undo: Undo) -> None:
        """Build the frontend's wrr or Maglev table and write the entries that
        change (all of them in a row just taken).  The backends are held."""
        spec = entries.table_spec(fe)
        if spec is None or (have.table and have.spec == spec):
            return
        if not have.table:
            try:
                have.table = self.rows.take()
            except RowsExhausted as err:
                raise DatapathError(str(err)) from err
            have.row, have.spec = [], None
            row = have.table

            def give_back() -> None:
                have.table, have.row, have.spec = 0, [], None
                self.rows.release(row)

            undo.push(give_back)
        kind, pairs = spec
        named = [(entries.backend_name(target), weight) for target, weight in pairs]
        picks = scheduling.build_table(kind, named, self.rows.size)
        ids = [self.backends[target].ident for target, _ in pairs]
        new = [ids[i] for i in picks]
        old_row, old_spec, row = have.row, have.spec, have.table
        try:
            self.map_ops += self.rows.write(row, old_row, new)
        except OSError:
            # Part of the batch may be in: know the row as the map holds it.
            have.row, have.spec = self.rows.read(row, len(new)), None
            raise
        have.row, have.spec = new, spec

        def restore() -> None:  # a later step failed: the row names the old backends again
            if have.table == row:
                self.rows.write(row, have.row, old_row)
                have.row, have.spec = old_row, old_spec

        undo.push(restore)

    def remove(self, key: FrontendKey) -> None:
        have = self.frontends.get(key)
        if have is None:
            return
        self._delete(self.maps.lb4_services, entries.service_key(key))
        del self.frontends[key]  # only now: a failed delete is retried as stale
        self.counters.remove(have.ident, labels_of(key, have))
        if have.table:
            self.rows.release(have.table)
        if self.maps.lb_rr.delete(entries.id_key(have.ident)):
            self.map_ops += 1
        for n in range(len(have.slots), 0, -1):
            self._delete_slot(have.ident, n)
        for target in have.slots:
            self._delete_member(have.ident, target)
        self._delete(self.maps.lb_frontend_meta, entries.id_key(have.ident))
        for target in have.slots:
            self._release_backend(target)
        self._frontend_ids.release(have.ident)

    # -- the steps ------------------------------------------------------------

    def _create(self, fe: Frontend) -> None:
        ident = self._frontend_ids.take()
        have = self._programmed(ident, fe, [])
        undo = Undo()
        undo.push(lambda: self._frontend_ids.release(ident))
        try:
            self._write_meta(ident, fe.service, fe.port_name, fe.kind)
            undo.push(lambda: self._delete(self.maps.lb_frontend_meta, entries.id_key(ident)))
            self.counters.create(ident)
            undo.push(lambda: self.counters.discard(ident))
            for b in fe.backends:
                self._hold_backend(b, undo)
            for n, b in enumerate(fe.backends, start=1):
                self._write_member(ident, b.target)
                undo.push(functools.partial(self._delete_member, ident, b.target))
                self._write_slot(ident, n, b.target)
                undo.push(functools.partial(self._delete_slot, ident, n))
            have.slots = [b.target for b in fe.backends]
            self._fill_table(fe, have, undo)
            self._write_header(fe.key, have)  # the frontend becomes visible here
        except Exception:
            undo.run()
            raise
        self.frontends[fe.key] = have

    def _add_slots(
        self, key: FrontendKey, have: ProgrammedFrontend, targets: list[Target], undo: Undo
    ) -> None:
        present = set(have.slots)
        new = [t for t in targets if t not in present]
        if not new:
            return
        base = len(have.slots)
        for n, target in enumerate(new, start=base + 1):
            self._write_member(have.ident, target)
            undo.push(functools.partial(self._delete_member, have.ident, target))
            self._write_slot(have.ident, n, target)
            undo.push(functools.partial(self._delete_slot, have.ident, n))
        have.slots.extend(new)
        try:
            self._write_header(key, have)  # raise the count last
        except OSError:
            del have.slots[base:]
            raise
        for target in new:
            self.backends[target].refs += 1

    def _remove_slot(
        self,
        key: FrontendKey,
        have: ProgrammedFrontend,
        target: Target,
        slot_of: dict[Target, int],
    ) -> None:
        """Fill the target's slot with the last one; `slot_of` follows the move."""
        hole = slot_of.pop(target)
        last = len(have.slots)
        if hole != last:
            moved = have.slots[last - 1]
            self._write_slot(have.ident, hole, moved)
            have.slots[hole - 1] = moved
            slot_of[moved] = hole
        have.slots.pop()
        self._write_header(key, have)
        self._delete_slot(have.ident, last)
        self._delete_member(have.ident, target)
        self._release_backend(target)

    def _hold_backend(self, b: Backend, undo: Undo) -> None:
        """Make sure the backend entry exists with the right flags; take a ref."""
        flags = self._flags(b)
        have = self.backends.get(b.target)
        if have is None:
            have = ProgrammedBackend(self._backend_ids.take(), flags)
            try:
                self._write_backend(b.target, have)
            except OSError:
                self._backend_ids.release(have.ident)
                raise
            self.backends[b.target] = have
        elif have.flags != flags:
            old = have.flags
            have.flags = flags
            self._write_backend(b.target, have)
            undo.push(lambda: self._restore_flags(b.target, old))
        have.refs += 1
        undo.push(lambda: self._release_backend(b.target))

    def _restore_flags(self, target: Target, flags: int) -> None:
        have = self.backends.get(target)
        if have is not None:
            have.flags = flags
            self._write_backend(target, have)

    def _release_backend(self, target: Target) -> None:
        have = self.backends.get(target)
        if have is None:
            return
        have.refs -= 1
        if have.refs <= 0:
            del self.backends[target]
            self._delete(self.maps.lb4_backends, entries.id_key(have.ident))
            self._forget_counts(have.ident)
            self._backend_ids.release(have.ident)

    # -- map entries ------------------------------------------------------------

    def _write(self, bpf_map: Any, key: Any, value: Any) -> None:
        self.map_ops += 1
        bpf_map.update(key, value)

    def _delete(self, bpf_map: Any, key: Any) -> None:
        self.map_ops += 1
        bpf_map.delete(key)

    def _write_member(self, ident: int, target: Target) -> None:
        key = entries.member_key(ident, self.backends[target].ident)
        self._write(self.maps.lb_members, key, entries.member())

    def _delete_member(self, ident: int, target: Target) -> None:
        key = entries.member_key(ident, self.backends[target].ident)
        self._delete(self.maps.lb_members, key)

    def _delete_slot(self, ident: int, slot: int) -> None:
        self._delete(self.maps.lb_slots, entries.slot_key(ident, slot))

    def _write_slot(self, ident: int, n: int, target: Target) -> None:
        value = entries.slot(self.backends[target].ident)
        self._write(self.maps.lb_slots, entries.slot_key(ident, n), value)

    def _write_header(self, key: FrontendKey, have: ProgrammedFrontend) -> None:
        self._write(self.maps.lb4_services, entries.service_key(key), entries.header(have))
        have.written = have.header_state()

    def _forget_counts(self, backend_id: int) -> None:
        """A backend gone: its lc counts go too (ids are not reused)."""
        key = entries.id_key(backend_id)
        for counts in (self.maps.lb_conns, self.maps.lb_conns_expired):
            if counts.delete(key):
                self.map_ops += 1

    def _write_meta(self, ident: int, ref: ServiceRef, port_name: str, kind: str) -> None:
        value = entries.meta(ref, port_name, kind)
        self._write(self.maps.lb_frontend_meta, entries.id_key(ident), value)

    def _write_backend(self, target: Target, have: ProgrammedBackend) -> None:
        value = entries.backend(target, have.flags)
        self._write(self.maps.lb4_backends, entries.id_key(have.ident), value)


def labels_of(key: FrontendKey, have: ProgrammedFrontend) -> Labels:
    """(namespace, service, port name, protocol): where a frontend's counters add up."""
    return (have.service.namespace, have.service.name, have.port_name, key.protocol.name)
