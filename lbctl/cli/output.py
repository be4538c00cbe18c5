"""The CLI's output conventions, shared by every command: `-o table|json|yaml`
and aligned columns."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any


def columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows as left-aligned columns two spaces apart, no trailing blanks."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def render(data: dict[str, Any], output: str, table: Callable[[dict[str, Any]], str]) -> str:
    """`data` as JSON or YAML, or as `table` renders it."""
    if output == "json":
        return json.dumps(data, indent=2) + "\n"
    if output == "yaml":
        import yaml

        return str(yaml.safe_dump(data, sort_keys=False))
    return table(data)
