"""BpfDatapath: the tc program compiled with bcc, its pinned maps, its hooks."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from lbctl.datapath import DatapathError, NodeConfig
from lbctl.datapath.ebpf import conntrack_gc, layout, nodeconf, tc
from lbctl.datapath.ebpf.compiler import Compilation, CompileError
from lbctl.datapath.ebpf.entries import has_source_ranges
from lbctl.datapath.ebpf.frontends import FrontendWriter
from lbctl.datapath.ebpf.maps import Maps
from lbctl.datapath.ebpf.ranges import SourceRangeTable, Vip, ranges_of, vip_of
from lbctl.datapath.ebpf.settings import BpfSettings
from lbctl.datapath.ebpf.upgrade.plan import Report
from lbctl.datapath.ebpf.upgrade.record import RecordError
from lbctl.datapath.ebpf.upgrade.run import Upgrade
from lbctl.datapath.ebpf.upgrade.structs import LayoutError
from lbctl.plan.planner import SCOPE_NAMES, Frontend, FrontendKey, PlanDiff

log = logging.getLogger(__name__)

BPF_FS_MAGIC = 0xCAFE4A11


def check_bpffs(pin_dir: Path) -> None:
    """The pin directory must sit on a bpf file system, or pins are lost."""
    probe = pin_dir
    while not probe.exists():
        probe = probe.parent
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = _Statfs()
    if libc.statfs(str(probe).encode(), ctypes.byref(buf)) != 0:
        raise DatapathError(f"bpffs path {pin_dir}: {os.strerror(ctypes.get_errno())}")
    if buf.f_type & 0xFFFFFFFF != BPF_FS_MAGIC:
        raise DatapathError(
            f"bpffs path {pin_dir} is not on a bpf file system (is /sys/fs/bpf mounted? "
            "`mount -t bpf bpf /sys/fs/bpf`; under `ip netns exec` /sys is remounted: "
            "use `nsenter --net=...` instead)"
        )


# The capabilities the datapath needs (deploy/daemonset.yaml says why), by number.
CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}
_DENIED = ("Operation not permitted", "EPERM", "Permission denied", "EACCES")


def missing_capabilities(status: Path = Path("/proc/self/status")) -> list[str]:
    """The capabilities of CAPABILITIES this process lacks (CapEff); [] when unreadable."""
    try:
        text = status.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            held = int(line.split()[1], 16)
            return [name for name, bit in CAPABILITIES.items() if not held >> bit & 1]
    return []


def load_failure(said: str) -> str:
    """Why compiling or loading the programs failed, and the fix, from what bcc said.

    A refusal (EPERM) is a missing capability, not missing kernel headers:
    the message says so first, naming the capabilities this process lacks."""
    denied = next((ln.strip() for ln in said.splitlines() if any(w in ln for w in _DENIED)), "")
    if denied:
        missing = missing_capabilities()
        lacking = (
            f"this process lacks {', '.join(missing)}"
            if missing
            else "this process holds the capabilities, so something else (a security "
            "module, seccomp, kernel.unprivileged_bpf_disabled) refuses"
        )
        return (
            f"compiling or loading the BPF program failed: not permitted (EPERM): {lacking} "
            f"(bcc: {denied[:160]}); the datapath needs CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN "
            f"and CAP_SYS_ADMIN (deploy/daemonset.yaml says why each)\nbcc said: {said}"
        )
    return (
        f"compiling or loading the BPF program failed: {said}\nbcc needs kernel "
        f"headers at /lib/modules/{os.uname().release}/build (run `make deps`, or "
        "mount the host's /lib/modules and /usr/src into the container)"
    )


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


class BpfDatapath:
    """Compiles and loads the programs, adopts or creates the pinned maps."""

    mode = "ebpf"

    def __init__(self, settings: BpfSettings, wait: bool = True) -> None:
        """Start compiling; with `wait` False, `load()` finishes the job later."""
        check_bpffs(settings.pin_dir)
        settings.pin_dir.mkdir(parents=True, exist_ok=True)
        # What is pinned already decides where bcc pins and which sizes hold
        # (lbctl/datapath/ebpf/upgrade/run.py): the settings may keep a pinned capacity.
        try:
            self.upgrade: Upgrade | None = Upgrade(settings)
        except (OSError, LayoutError, RecordError) as err:
            raise DatapathError(
                f"reading the maps pinned under {settings.pin_dir}: {err}; to start over, "
                f"`lbctl cleanup --bpffs {settings.pin_dir}` (established connections through "
                "them are lost)"
            ) from err
        self.settings = self.upgrade.settings
        self.upgrade_report: Report | None = None
        try:
            self._compilation: Compilation | None = Compilation(self.upgrade.compile_settings)
        except BaseException:
            self.upgrade.abandon()
            raise
        self.prog_fd = -1
        self.prog_fds: dict[str, int] = {}  # every program that loaded, by name
        self.failed_programs: dict[str, str] = {}  # optional programs that did not, and why
        self.interfaces: dict[str, int] = {}  # name -> ifindex attached
        self.xdp_interfaces: dict[str, int] = {}  # name -> ifindex with the XDP program
        self._refused: dict[str, int] = {}  # lb_stats of refused flows, at the last sweep
        self._warned: dict[str, float] = {}  # full-table warnings, when last logged
        if wait:
            self.load()

    @property
    def loaded(self) -> bool:
        return self._compilation is None and self.prog_fd >= 0

    def load(self) -> None:
        """Wait for the compiler; open the maps and adopt what they hold."""
        if self._compilation is None:
            return
        compilation, self._compilation = self._compilation, None
        upgrade, self.upgrade = self.upgrade, None
        assert upgrade is not None
        try:
            loaded = compilation.result()
        except CompileError as err:
            upgrade.abandon()
            raise DatapathError(load_failure(str(err))) from err
        if loaded.log:
            log.debug("the BPF compiler said: %s", loaded.log)
        self.prog_fds = loaded.prog_fds
        self.prog_fd = loaded.prog_fd
        self.failed_programs = loaded.failed
        for name, why in loaded.failed.items():
            log.error("BPF program %s did not load, its feature is off: %s", name, why)
        try:
            report = upgrade.finish(loaded.map_fds, loaded.prog_fds)
        except BaseException as err:
            loaded.close()
            self.prog_fds, self.prog_fd = {}, -1
            if isinstance(err, (OSError, LayoutError, RecordError)):
                raise DatapathError(
                    f"adopting the maps pinned under {self.settings.pin_dir}: {err}"
                ) from err
            raise
        self.upgrade_report = report
        for line in report.lines():
            log.info("%s", line)
        for problem in report.problems:
            log.error("%s", problem)
        self.maps = Maps.from_fds(loaded.map_fds.__getitem__, owns_fds=True)
        self.table = FrontendWriter(self.maps, self.settings.table_size)
        self.table.counters.enabled = self.settings.service_counters
        self.table.adopt()
        self.ranges = SourceRangeTable(self.maps)
        self.ranges.adopt()

    # -- hooks ------------------------------------------------------------------

    def attach(self, links: Iterable[tc.Link]) -> list[str]:
        """Attach to the given interfaces; return the error of each failure.

        An interface is known by name and index, so a veth deleted and made
        again under the same name (a restarted pod) is attached again.
        """
        errors = []
        for link in links:
            if self.interfaces.get(link.name) == link.index:
                continue
            try:
                tc.attach(link, self.prog_fds)
            except tc.AttachError as err:
                errors.append(str(err))
                continue
            self.interfaces[link.name] = link.index
            log.info("attached tc ingress and egress programs to %s", link.name)
        return errors

    def attach_xdp(self, links: Iterable[tc.Link], mode: str) -> list[str]:
        """The XDP fast path on the external interfaces; the error of each failure,
        at every call while it lasts (the agent logs each change once).

        Mode "off" removes lbctl's XDP program from every interface instead."""
        from lbctl.datapath.ebpf import xdp

        if mode == "off":  # remove what an earlier run with --xdp attached
            try:
                for name in xdp.detach(link.name for link in tc.all_links()):
                    log.info("XDP program detached from %s (--xdp off)", name)
            except (tc.AttachError, OSError) as err:
                return [f"removing the XDP program of an earlier run: {err}"]
            return []
        fd = self.prog_fds.get("lbctl_xdp")
        if fd is None:
            why = self.failed_programs.get("lbctl_xdp", "it is not part of this build")
            return [f"XDP fast path (--xdp {mode}) is off: the program did not load: {why}"]
        errors = []
        for link in links:
            if self.xdp_interfaces.get(link.name) == link.index:
                continue
            try:
                xdp.attach(link, fd, mode)
            except tc.AttachError as err:
                errors.append(str(err))
                continue
            self.xdp_interfaces[link.name] = link.index
            log.info("attached XDP program (%s) to %s", mode, link.name)
        return errors

    def attach_cgroup(self, path: str | None) -> list[str]:
        """Socket hooks for the node's own processes, on a cgroup v2 directory.

        A path: that cgroup2 directory, or the cgroup2 mounted at its `unified`
        (cgroup.find_cgroup2); None: the root of the cgroup2 mount (every process
        of the node); "": no hooks, and links a former run left are removed."""
        from lbctl.datapath.ebpf import cgroup

        pin_dir = self.settings.pin_dir
        try:
            if path == "":
                for hook in cgroup.detach(pin_dir):
                    log.info("socket hook %s detached (socket hooks are off)", hook)
                return []
            where = cgroup.find_cgroup2(Path(path)) if path is not None else cgroup.cgroup2_mount()
            done = cgroup.attach(where, self.prog_fds, pin_dir)
        except (cgroup.CgroupError, OSError) as err:
            return [f"socket hooks for the node's own processes are off: {err}"]
        missing = [n for n in self.failed_programs if n.startswith("lbctl_sock_")]
        log.info(
            "socket hooks on cgroup %s: %s%s",
            where,
            ", ".join(a.hook for a in done) or "none",
            f" (not loaded: {', '.join(missing)})" if missing else "",
        )
        return []

    def forget_missing(self, present: Iterable[tc.Link]) -> None:
        """Interfaces that went away (a pod's veth) took their filter with them."""
        alive = {(link.name, link.index) for link in present}
        self.interfaces = {n: i for n, i in self.interfaces.items() if (n, i) in alive}
        self.xdp_interfaces = {n: i for n, i in self.xdp_interfaces.items() if (n, i) in alive}

    def forget_detached(self) -> list[str]:
        """Interfaces whose program someone removed (`tc filter del`, `ip link set
        xdp off`): forgotten, so the next attach puts it back.  Returns them."""
        from lbctl.datapath.ebpf import xdp

        gone = []
        for hook in tc.HOOKS:
            tc_now = set(tc.attached_interfaces(hook)) if self.interfaces else set()
            for name in [n for n in self.interfaces if n not in tc_now]:
                del self.interfaces[name]
                gone.append(f"{name} (tc {hook.name})")
        xdp_now = set(xdp.attached_interfaces()) if self.xdp_interfaces else set()
        for name in [n for n in self.xdp_interfaces if n not in xdp_now]:
            del self.xdp_interfaces[name]
            gone.append(f"{name} (XDP)")
        return gone

    # -- maps -----------------------------------------------------------------------

    def collect_garbage(self) -> list[str]:
        """Delete conntrack and NAT entries of flows that timed out, and
        affinity entries past their timeout or of backends that left; make
        room in a nearly full flow table.  Returns what the operator should
        know: a table that was full since the last sweep, and what to do."""
        swept = conntrack_gc.sweep(self.maps, self.settings, affinity=self.table.affinities())
        if swept.conntrack or swept.nat or swept.affinity:
            log.debug(
                "swept %d conntrack, %d NAT and %d affinity entries",
                swept.conntrack,
                swept.nat,
                swept.affinity,
            )
        refused = {}
        for name, stat in (("ct", "LB_STAT_CT_FULL"), ("nat", "LB_STAT_NAT_EXHAUSTED")):
            per_cpu = self.maps.lb_stats.lookup(layout.ffi.new("__u32 *", layout.const(stat)))
            refused[name] = int(sum(per_cpu)) if per_cpu is not None else 0
        news = []
        s = self.settings
        if refused["ct"] > self._refused.get("ct", refused["ct"]) or swept.evicted:
            news.append(
                f"conntrack table full ({s.ct_size} entries, two per flow, one if "
                "masqueraded): new flows are refused (lbctl_verdicts_total"
                '{verdict="conntrack_full"}), and idle or half-open flows ended to make '
                "room; established flows keep theirs; raise --conntrack-size"
            )
        if refused["nat"] > self._refused.get("nat", refused["nat"]):
            if swept.nat_used >= conntrack_gc.HIGH * s.nat_size or swept.evicted:
                news.append(
                    f"NAT table full ({s.nat_size} entries, one per masqueraded flow): new "
                    'masqueraded flows are refused (lbctl_verdicts_total{verdict="nat_exhausted"}'
                    "); raise --nat-size"
                )
            else:
                news.append(
                    "NAT ports exhausted: new masqueraded flows to a backend found no free "
                    'port (lbctl_verdicts_total{verdict="nat_exhausted"}); widen '
                    "--nat-port-range, or spread clients over more backends or node addresses"
                )
        if swept.affinity_used >= conntrack_gc.HIGH * s.affinity_size:
            news.append(
                f"affinity table full ({s.affinity_size} entries, one per client and "
                "Service port with sessionAffinity ClientIP): the least recently seen "
                "clients' affinity is forgotten; raise --affinity-size"
            )
        self._refused = refused
        now = time.monotonic()
        for message in news:
            if now - self._warned.get(message, -3600.0) >= 60:
                self._warned[message] = now
                log.warning("%s", message)
        return news

    def configure(self, conf: NodeConfig) -> None:
        """The node's address, NAT ports and cluster CIDRs; where backends are."""
        nodeconf.write(self.maps, conf)
        for error in self.table.set_placement(nodeconf.Placement.of(conf)):
            log.error("%s: its flags stay as they were until the next sync", error)

    def reconcile(
        self, desired: Mapping[FrontendKey, Frontend], remove_stale: bool = True
    ) -> list[str]:
        ranges = ranges_of(desired.values())
        errors, failed = self._set_ranges(ranges, desired.values())
        desired = {k: fe for k, fe in desired.items() if vip_of(k) not in failed}
        errors += self.table.reconcile(desired, remove_stale)
        if remove_stale:
            self.ranges.remove_except(ranges)
        return errors

    def apply(self, change: PlanDiff) -> list[str]:
        # Ranges go in before the frontends that check them, and out after.
        errors, failed = self._set_ranges(ranges_of(change.upserts), change.upserts)
        upserts = [fe for fe in change.upserts if vip_of(fe.key) not in failed]
        errors += self.table.apply(upserts, change.removals)
        maybe_unused = {vip_of(k) for k in change.removals}
        maybe_unused |= {vip_of(fe.key) for fe in upserts if not fe.source_ranges}
        for vip in maybe_unused & set(self.ranges.held):
            # the address's frontends are its scopes: look them up, never walk all
            held = (self.table.frontends.get(FrontendKey(*vip, scope)) for scope in SCOPE_NAMES)
            if not any(fe is not None and has_source_ranges(fe) for fe in held):
                self.ranges.set(vip, frozenset())
        return errors

    def _set_ranges(
        self, ranges: Mapping[Vip, frozenset[IPv4Network]], frontends: Iterable[Frontend]
    ) -> tuple[list[str], set[Vip]]:
        """Write the ranges; a frontend whose ranges do not fit is left as it was."""
        errors: list[str] = []
        failed: set[Vip] = set()
        for vip, wanted in ranges.items():
            try:
                self.ranges.set(vip, wanted)
            except OSError as err:
                failed.add(vip)
                users = sorted({str(fe.service) for fe in frontends if vip_of(fe.key) == vip})
                errors.append(
                    f"Service {', '.join(users)}: loadBalancerSourceRanges of "
                    f"{vip[0]}:{vip[1]}/{vip[2].name} not programmed: {err}"
                )
        return errors, failed

    def describe(self) -> dict[str, Any]:
        return {
            "bpffs": str(self.settings.pin_dir),
            "attached": sorted(dict(self.interfaces)),
            "xdpAttached": sorted(dict(self.xdp_interfaces)),
            "programsNotLoaded": dict(self.failed_programs),
            # what this start did with the maps it found pinned (lbctl/datapath/ebpf/upgrade/run.py)
            "upgrade": self.upgrade_report.as_dict() if self.upgrade_report else None,
        }

    def close(self) -> None:
        """Release this process's handles; programs and pins stay in place."""
        if self._compilation is not None:  # never loaded: take and drop its result
            with contextlib.suppress(CompileError):
                self._compilation.result().close()
            self._compilation = None
        if self.upgrade is not None:  # its staging directory was never served
            self.upgrade.abandon()
            self.upgrade = None
        if hasattr(self, "maps"):
            self.maps.close()
        for fd in self.prog_fds.values():
            os.close(fd)
        self.prog_fds = {}
        self.prog_fd = -1
