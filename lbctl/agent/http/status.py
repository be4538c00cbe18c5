"""The agent's status document, served as JSON at `/statusz` for `lbctl status`.

What only the agent knows: the mode it runs and why, where its Services come
from, its last syncs and their result, what it planned and programmed, and
its errors.  What the kernel holds (programs attached, maps pinned) is read
by `lbctl status` itself, so it is right even when the agent is down.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from lbctl import __version__
from lbctl.agent.loop import Agent, SyncRecord

API_VERSION = "lbctl.io/v1alpha1"
KIND = "AgentStatus"
RECENT_ERRORS = 20  # the newest errors shown
T = TypeVar("T")


def rfc3339(wall: float) -> str:
    moment = datetime.datetime.fromtimestamp(wall, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def retry(read: Callable[[], T]) -> T:
    """Read state the agent's thread mutates: a dict may change while iterated."""
    for _ in range(10):
        try:
            return read()
        except RuntimeError:  # "dictionary changed size during iteration"
            time.sleep(0.001)
    return read()


def _sync(record: SyncRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {
        "time": rfc3339(record.at),
        "seconds": round(record.seconds, 6),
        "what": record.what,
        "result": "failed" if record.errors else "ok",
        "errors": list(record.errors),
    }


def _rejected(agent: Agent) -> list[dict[str, str]]:
    """Objects the source or the planner refused, with the reason."""
    out = agent.source.rejected()
    conflicts = dict(agent.planner.conflicts)
    out += [{"where": f"Service {ref}", "reason": conflicts[ref]} for ref in sorted(conflicts)]
    return out


def _datapath(agent: Agent) -> dict[str, Any]:
    options = agent.options
    out: dict[str, Any] = {
        "interfaces": sorted(options.interfaces) if options.interfaces is not None else "all",
        "xdp": options.xdp,
        "cgroup": options.cgroup_path,  # None: the root of the cgroup2 mount; "": none
    }
    return out | agent.datapath.describe()


def document(agent: Agent, healthy: bool, problems: list[str]) -> dict[str, Any]:
    """The status document; `healthy` and `problems` as /healthz says them."""
    wall = time.time()
    plans = retry(lambda: list(agent.planner.plans.values()))
    frontends = [fe for plan in plans for fe in plan.values()]
    recent = retry(lambda: list(agent.recent_errors.items()))[-RECENT_ERRORS:]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "version": __version__,
        "pid": os.getpid(),
        "node": agent.options.node_name,
        "currentTime": rfc3339(wall),
        "healthy": healthy,
        "synced": agent.synced.is_set(),
        "lastTick": rfc3339(wall - (time.monotonic() - agent.last_tick)),
        "problems": problems,
        "mode": agent.datapath.mode,
        "modeReason": agent.options.mode_reason,
        "source": agent.source.describe(),
        "lastSync": _sync(agent.last_sync),
        "lastChange": _sync(agent.last_change),
        "counts": {
            "services": len(plans),
            "frontends": len(frontends),
            "backends": len({be.target for fe in frontends for be in fe.backends}),
            "backendSlots": sum(len(fe.backends) for fe in frontends),
        },
        "datapath": _datapath(agent),
        "errors": {
            "current": list(agent.errors),  # of the last attempt; retried every few seconds
            "rejected": retry(lambda: _rejected(agent)),
            "recent": [{"time": rfc3339(at), "message": m} for m, at in recent],
        },
    }
