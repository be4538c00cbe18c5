"""Where lbctl's pinned maps are: one answer for every command that reads the datapath.

`lbctl status`, `trace`, `maps dump` and `cleanup` find the bpffs directory
the same way, the first step that answers deciding:

1. `--bpffs DIR`, when given;
2. the running agent's own directory, as its /statusz on `--address` says
   (`datapath.bpffs`), so a command run beside the agent (on the node, or
   with `kubectl exec` in its pod) needs no flag whatever `--bpffs` the agent
   was started with;
3. with the agent down (or in IPVS mode): the directory whose pinned maps
   lbctl's programs attached in this network namespace use (tc ingress and
   XDP), found by map id among the directories of the mounted bpf file
   systems; the programs outlive the agent, so this finds its maps after a
   crash or a `kill -9`, and never another namespace's;
4. the default, /sys/fs/bpf/lbctl.

`PinDir` keeps what each step found, so a command that finds no maps there
says where it looked.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lbctl.datapath.ebpf.settings import DEFAULT_PIN_DIR

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:10256"  # the agent's --healthz-bind-address port, from this node
_SCAN_DEPTH = 3  # directory levels below a bpffs mount searched for lbctl's maps
_MARKER = "lb4_services"  # the map whose pin marks a directory of lbctl's maps
MISSING_FIX = (
    "run the command in the agent's network namespace (`kubectl exec` into its pod, or on "
    "the node), point --address at its --healthz-bind-address, or give its --bpffs"
)


@dataclasses.dataclass(frozen=True)
class PinDir:
    """The directory, how it was found, and every step tried on the way."""

    path: Path
    found_by: str
    looked: tuple[str, ...]

    def missing(self) -> str:
        """Why no maps were found, naming the directory and where else it looked."""
        return f"no lbctl maps under {self.path} ({self.where()})"

    def where(self) -> str:
        return "; ".join([*self.looked, f"used {self.found_by}"])

    def document(self) -> dict[str, Any]:
        return {"directory": str(self.path), "foundBy": self.found_by, "looked": list(self.looked)}


def agent_bpffs(doc: dict[str, Any] | None) -> str | None:
    """The directory a status document (/statusz) names; None in IPVS mode."""
    bpffs = ((doc or {}).get("datapath") or {}).get("bpffs")
    return str(bpffs) if bpffs else None


def resolve(
    explicit: Path | None,
    address: str,
    timeout: float,
    *,
    agent_doc: dict[str, Any] | None = None,
    agent_error: str | None = None,
) -> PinDir:
    """The bpffs directory of lbctl's maps (see the module docstring).

    A caller that has the agent's status document already (or its failure)
    passes it as `agent_doc` / `agent_error` instead of asking again.
    """
    if explicit is not None:
        return PinDir(explicit, "--bpffs", ())
    looked = ["no --bpffs given"]
    if agent_doc is None and agent_error is None:
        agent_doc, agent_error = _ask_agent(address, timeout)
    if agent_doc is not None:
        said = agent_bpffs(agent_doc)
        if said:
            return PinDir(
                Path(said), f"the agent's, as its /statusz at {address} says", tuple(looked)
            )
        looked.append(
            f"the agent at {address} names no bpffs directory (mode {agent_doc.get('mode')})"
        )
    else:
        looked.append(f"no agent answers at {address} ({agent_error})")
    found, note = attached_pin_dir()
    if found is not None:
        return PinDir(found, note, tuple(looked))
    looked.append(note)
    return PinDir(DEFAULT_PIN_DIR, f"the default {DEFAULT_PIN_DIR}", tuple(looked))


def _ask_agent(address: str, timeout: float) -> tuple[dict[str, Any] | None, str | None]:
    from lbctl.agent.config import parse_bind_address
    from lbctl.cli.agentclient import get_json

    try:
        parsed = parse_bind_address(address)
    except ValueError as err:
        return None, str(err)
    if parsed is None:
        return None, "--address is empty"
    try:
        doc: dict[str, Any] = get_json(address, parsed, "/statusz", timeout)
    except OSError as err:
        return None, str(err)
    return doc, None


def attached_pin_dir() -> tuple[Path | None, str]:
    """The directory whose maps lbctl's programs attached here use, and how it was
    found; (None, what was seen) when there is none."""
    try:
        used = _attached_map_ids()
    except Exception as err:  # netlink or BPF refused: say so, fall back
        return None, f"could not read the programs attached here ({err})"
    if not used:
        return None, "no lbctl program is attached in this network namespace"
    roots = bpffs_mounts()
    for directory in _lbctl_dirs(roots):
        if _marker_id(directory) in used:
            return directory, "the maps of lbctl's programs attached in this network namespace"
    where = ", ".join(str(r) for r in roots) or "no bpf file system is mounted"
    return None, f"lbctl's programs attached here use maps pinned nowhere under {where}"


def _attached_map_ids() -> set[int]:
    """Ids of the maps of lbctl's tc ingress and XDP programs on this namespace's links."""
    from lbctl.cli import status
    from lbctl.datapath.ebpf import libbpf

    ids: set[int] = set()
    for interface in status.interfaces():
        for prog in interface["programs"]:
            if prog["owner"] != "lbctl" or not prog["id"]:
                continue
            try:
                fd = libbpf.prog_fd_by_id(prog["id"])
            except OSError:  # detached meanwhile
                continue
            try:
                ids.update(libbpf.prog_map_ids(fd))
            finally:
                os.close(fd)
    return ids


def bpffs_mounts(mounts: Path = Path("/proc/self/mounts")) -> list[Path]:
    """Mount points of bpf file systems, as this process sees them."""
    out = []
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[2] == "bpf":
            out.append(Path(fields[1].replace("\\040", " ")))
    return sorted(set(out))


def _lbctl_dirs(roots: list[Path]) -> Iterator[Path]:
    """Directories below these roots that hold a pin of lbctl's marker map."""

    def walk(directory: Path, depth: int) -> Iterator[Path]:
        if (directory / _MARKER).exists():
            yield directory
        if depth == 0:
            return
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from walk(Path(entry.path), depth - 1)

    for root in roots:
        yield from walk(root, _SCAN_DEPTH)


def _marker_id(directory: Path) -> int | None:
    from lbctl.datapath.ebpf import libbpf

    try:
        fd = libbpf.obj_get(str(directory / _MARKER))
    except OSError:
        return None
    try:
        return libbpf.map_info(fd).id
    except OSError:
        return None
    finally:
        os.close(fd)
