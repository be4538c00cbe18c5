"""What the benchmarks ran on, for their reports."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """CPUs, their model and the kernel."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release()}
