"""`lbctl status -o json` is a stable API: its schema and its documentation agree.

tests/test_status.py checks every report it makes (a healthy agent, a killed
one, a removed datapath, no agent) against docs/status-v1.schema.json; here
the schema is checked to be a valid one that holds the promises
docs/status-api.md makes, and the page to name every field of it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from lbctl.cli import status

pytestmark = pytest.mark.unit  # pure: make unit runs it without root

DOCS = Path(__file__).parents[1] / "docs"
SCHEMA = json.loads((DOCS / "status-v1.schema.json").read_text())
PAGE = (DOCS / "status-api.md").read_text()


def fields(schema: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Every property name the schema defines, with its dotted path."""
    for name, sub in schema.get("properties", {}).items():
        yield f"{prefix}{name}"
        yield from fields(resolve(sub), f"{prefix}{name}.")
    for sub in schema.get("oneOf", []):
        yield from fields(resolve(sub), prefix)
    items = schema.get("items")
    if isinstance(items, dict):
        yield from fields(resolve(items), prefix)


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    return resolve(SCHEMA["$defs"][ref.rsplit("/", 1)[1]])


def test_the_schema_is_valid_and_names_this_version() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["properties"]["apiVersion"] == {"const": status.API_VERSION}
    assert SCHEMA["properties"]["kind"] == {"const": status.KIND}
    # the exit codes a report can carry are the ones lbctl status decides
    assert SCHEMA["properties"]["verdict"]["properties"]["exitCode"]["enum"] == sorted(
        status.STATES
    )
    assert set(SCHEMA["properties"]["verdict"]["properties"]["state"]["enum"]) == set(
        status.STATES.values()
    )


def test_a_reader_of_v1_keeps_working_when_fields_are_added() -> None:
    """The compatibility rule: objects stay open to new fields."""

    def closed(schema: dict[str, Any], where: str) -> Iterator[str]:
        if schema.get("additionalProperties") is False:
            yield where
        for name, sub in schema.get("properties", {}).items():
            yield from closed(sub, f"{where}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(schema.get(key), dict):
                yield from closed(schema[key], f"{where}[]")
        for sub in schema.get("oneOf", []):
            yield from closed(sub, where)

    defs = [w for name, d in SCHEMA["$defs"].items() for w in closed(d, name)]
    assert [*closed(SCHEMA, "report"), *defs] == []


def test_the_page_names_every_field_of_the_schema() -> None:
    named = set(re.findall(r"`([A-Za-z][\w.\[\]/]*)`", PAGE))
    words = {w for n in named for w in re.split(r"[.\[\]/]+", n) if w}
    missing = sorted({f for f in fields(SCHEMA) if f.rsplit(".", 1)[-1] not in words})
    assert missing == []
    # and every field the page's tables name is one the schema defines
    table_fields = re.findall(r"^\| `([a-zA-Z.\[\]]+)`", PAGE, flags=re.M)
    known = {f.rsplit(".", 1)[-1] for f in fields(SCHEMA)}
    unknown = sorted(f for f in table_fields if f.replace("[]", "").rsplit(".", 1)[-1] not in known)
    assert unknown == []
