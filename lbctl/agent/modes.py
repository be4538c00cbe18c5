"""Choosing the datapath at start-up: ebpf, ipvs, or auto (ebpf when it can run).

`select` probes (lbctl/datapath/ebpf/probe.py) and starts the BPF compiler in
the background; `settle` waits for it.  Under auto a missing feature or a
program that fails to compile or load falls back to IPVS; under ebpf it is
the error.  The reason, with what was probed, goes to `lbctl status`.
"""

from __future__ import annotations

import dataclasses
import logging

from lbctl.agent.config import Config
from lbctl.datapath import Datapath
from lbctl.datapath.ebpf import probe

log = logging.getLogger(__name__)


class ModeError(Exception):
    """No datapath can run; the message names what is missing and the fix."""


@dataclasses.dataclass
class Selection:
    datapath: Datapath
    reason: str
    chosen_by: str  # "--mode auto", "mode in FILE", ...


def _ipvs(chosen_by: str, why: str, bpf_missing: str | None = None) -> Selection:
    """The IPVS datapath; bpf_missing: why the eBPF one cannot run (None: forced)."""
    from lbctl.datapath.ipvs.datapath import IpvsDatapath
    from lbctl.datapath.ipvs.probe import probe_ipvs

    found = probe_ipvs()
    if not found.ok:
        if bpf_missing is None:
            raise ModeError(
                f"the IPVS datapath ({chosen_by}) is unavailable: {found.missing}; "
                "use a kernel with IPVS, or run with --mode auto (or ebpf)"
            )
        raise ModeError(
            f"the eBPF datapath cannot run ({bpf_missing}), and the IPVS fallback "
            f"({chosen_by}) is unavailable: {found.missing}"
        )
    return Selection(IpvsDatapath(), f"{chosen_by}: {why}", chosen_by)


def select(cfg: Config, chosen_by: str) -> Selection:
    """The datapath for cfg.mode; a BPF one may still be compiling (see `settle`)."""
    if cfg.mode == "ipvs":
        return _ipvs(chosen_by, "IPVS forced, BPF not probed")
    found = probe.probe_bpf(xdp=cfg.xdp != "off")
    if not found.ok:
        why = f"BPF feature missing: {found.missing}"
        if cfg.mode == "ebpf":
            raise ModeError(
                f"the eBPF datapath cannot run on this kernel: {why}; fix that, or run with "
                "--mode auto (or ipvs) to fall back to IPVS"
            )
        log.warning("%s: %s; falling back to IPVS", chosen_by, why)
        return _ipvs(chosen_by, f"fell back to IPVS, {why}", why)
    from lbctl.datapath import DatapathError
    from lbctl.datapath.ebpf.datapath import BpfDatapath

    reason = f"{chosen_by}: BPF features probed, all {found.summary()}"
    try:
        datapath = BpfDatapath(cfg.bpf_settings(), wait=False)
    except DatapathError as err:  # no bpffs to pin the maps on
        if cfg.mode == "ebpf":
            raise
        log.warning("%s: %s; falling back to IPVS", chosen_by, err)
        return _ipvs(chosen_by, f"fell back to IPVS, {err}", str(err))
    return Selection(datapath, reason, chosen_by)


def settle(selection: Selection, cfg: Config) -> Selection:
    """Wait for the BPF compiler; under auto, fall back to IPVS if it failed."""
    from lbctl.datapath import DatapathError
    from lbctl.datapath.ebpf.datapath import BpfDatapath

    dp = selection.datapath
    if not isinstance(dp, BpfDatapath):
        return selection
    try:
        dp.load()
    except DatapathError as err:
        dp.close()
        lines = str(err).splitlines()
        hint = next((line for line in lines if line.startswith("bcc needs")), "")
        first = lines[0] + (f" ({hint})" if hint else "")
        if cfg.mode == "ebpf":
            raise
        log.warning("%s: %s; falling back to IPVS", selection.chosen_by, first)
        why = f"BPF programs did not load: {first}"
        return _ipvs(selection.chosen_by, f"fell back to IPVS, {why}", why)
    return dataclasses.replace(selection, reason=selection.reason + ", the programs loaded")
