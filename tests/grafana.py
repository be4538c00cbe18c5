"""Grafana dashboards' queries as Grafana sends them to Prometheus.

Grafana replaces template variables and its macros before a query leaves
it, following its documented rules for a Prometheus data source:

- `$__interval`: the time range over the panel's data points (`maxDataPoints`,
  about the panel's width in pixels), no less than the data source's scrape
  interval, which is also the step of the range query;
- `$__rate_interval`: max(`$__interval` + scrape interval, 4 x scrape interval);
- `$__range` (and `_s`, `_ms`): the time range;
- a multi-value or include-All variable: its `allValue` when All is
  selected; selected values escaped for a regex and joined as `(a|b)`.

Only what the dashboards under deploy/ use is handled; anything else is an
error rather than a query Grafana would not send.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Doc = dict[str, Any]
REGEX_SPECIALS = re.compile(r"[$^*{}\[\]'+?.()|]")
MAX_DATA_POINTS = 1000


@dataclasses.dataclass(frozen=True)
class Target:
    dashboard: str
    panel: str
    ref: str
    expr: str
    instant: bool = False

    def __str__(self) -> str:
        return f"{self.dashboard}: panel {self.panel!r} {self.ref}"


def dashboards(root: Path) -> dict[str, Doc]:
    """Every Grafana dashboard (JSON with panels) under `root`."""
    found = {}
    for path in sorted(root.rglob("*.json")):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and "panels" in doc:
            found[str(path.relative_to(root))] = doc
    return found


def _panels(panels: list[Doc]) -> Iterator[Doc]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # inside (collapsed) rows


def targets(name: str, board: Doc) -> list[Target]:
    return [
        Target(name, p["title"], t["refId"], t["expr"], bool(t.get("instant")))
        for p in _panels(board["panels"])
        for t in p.get("targets", [])
        if not t.get("hide")
    ]


def variable_queries(board: Doc) -> dict[str, tuple[str, str]]:
    """Query variables: name -> (metric selector, label) of their label_values()."""
    out = {}
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
        if match is None:
            raise ValueError(f"variable {var['name']}: {query!r} is not label_values(expr, label)")
        out[var["name"]] = (match.group(1), match.group(2))
    return out


def regex_escape(value: str) -> str:
    """A value in a PromQL regex string: a regex backslash, written as `\\\\`."""
    return REGEX_SPECIALS.sub(lambda m: "\\\\" + m.group(), value.replace("\\", "\\\\\\\\"))


def variable_value(var: Doc, selected: list[str] | None) -> str:
    """What Grafana puts in for `var`; `selected` None: All."""
    if selected is None:
        if not var.get("includeAll"):
            raise ValueError(f"variable {var['name']} has no All option")
        if "allValue" not in var:
            raise ValueError(f"variable {var['name']}: All without allValue")
        return str(var["allValue"])
    if not (var.get("multi") or var.get("includeAll")):
        return selected[0]
    escaped = [regex_escape(v) for v in selected]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def interval(range_s: float, scrape_s: float) -> float:
    return max(scrape_s, range_s / MAX_DATA_POINTS)


def interpolate(
    expr: str,
    board: Doc,
    selected: dict[str, list[str] | None],
    range_s: float,
    scrape_s: float,
) -> str:
    """`expr` as Grafana sends it: variables set to `selected`, macros for the range."""
    step = interval(range_s, scrape_s)
    macros = {
        "__rate_interval": duration(max(step + scrape_s, 4 * scrape_s)),
        "__interval": duration(step),
        "__interval_ms": str(round(step * 1000)),
        "__range": duration(range_s),
        "__range_s": str(round(range_s)),
        "__range_ms": str(round(range_s * 1000)),
    }
    variables = {v["name"]: v for v in board["templating"]["list"]}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name in macros:
            return macros[name]
        if name not in variables or name not in selected:
            raise ValueError(f"{expr!r}: no value for ${name}")
        return variable_value(variables[name], selected[name])

    return re.sub(r"\$\{(\w+)\}|\$(\w+)|\[\[(\w+)\]\]", value, expr)
