"""ManifestSource: Services, EndpointSlices and this node from a directory of YAML.

The embedded default source.  Every *.yaml, *.yml and *.json file at the top
of the directory is read (several documents per YAML file, one per JSON file,
and `kind: List`).
A Node whose name is this node's gives its zone (for topology hints) and
addresses, as the API's Node does; other Nodes are left alone.
`poll` rescans the directory and applies what changed since the last call to
a ServiceTable: an edited, added or deleted file becomes a diff.

Bad input never costs the other objects: a file that does not parse keeps
the objects it held before, an invalid object keeps its last valid version,
and each problem is reported once, naming the file, the object and the
reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from lbctl.model import EndpointSlice, Node, Service, ServiceRef, ServiceTable
from lbctl.sources.parse import (
    Ignored,
    InvalidObject,
    meta_ref,
    parse_checked,
    parse_endpoint_slice,
    parse_node,
    parse_service,
)

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclasses.dataclass(frozen=True, order=True)
class ObjectId:
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        if not self.namespace:  # cluster-scoped (a Node)
            return f"{self.kind} {self.name}"
        return f"{self.kind} {self.namespace}/{self.name}"


Parsed = Service | EndpointSlice | Node


@dataclasses.dataclass
class _File:
    signature: tuple[int, int, int]
    objects: dict[ObjectId, Parsed]


class ManifestSource:
    def __init__(self, directory: Path, node_name: str | None = None) -> None:
        self.directory = directory
        self.node_name = node_name  # the Node of this name is the one lbctl runs on
        self._files: dict[Path, _File] = {}
        self._owner: dict[ObjectId, Path] = {}
        self._shadowed: dict[ObjectId, set[Path]] = {}  # duplicates waiting for the id
        self.errors: dict[Path, list[str]] = {}
        self.arrived: float | None = None
        self._stopped = threading.Event()

    # -- the Source interface: a directory is read whole on every poll --------------

    def start(self) -> None:
        self._stopped.clear()

    def stop(self) -> None:
        self._stopped.set()

    def wait_ready(self, timeout: float) -> bool:
        return True

    def wait(self, timeout: float) -> None:
        self._stopped.wait(timeout)

    # -- scanning ---------------------------------------------------------------

    def _scan(self) -> dict[Path, tuple[int, int, int]]:
        found = {}
        try:
            entries = list(os.scandir(self.directory))
        except OSError as err:
            raise SourceError(f"manifest directory {self.directory}: {err.strerror}") from err
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(SUFFIXES):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if entry.is_file():
                found[Path(entry.path)] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return found

    @property
    def complete(self) -> bool:
        """False while some file cannot be read at all: what it holds is unknown."""
        return not any(
            p.startswith("cannot parse the file") for msgs in self.errors.values() for p in msgs
        )

    def describe(self) -> dict[str, Any]:
        return {"kind": "manifests", "location": str(self.directory), "complete": self.complete}

    def rejected(self) -> list[dict[str, str]]:
        out = []
        for path, messages in sorted(dict(self.errors).items()):
            out += [{"where": str(path), "reason": m} for m in messages]
        return out

    def poll(self, table: ServiceTable) -> set[ServiceRef]:
        """Apply what changed in the directory; return the services touched."""
        touched: set[ServiceRef] = set()
        self.arrived = time.monotonic()
        current = self._scan()
        for path in sorted(set(self._files) - set(current)):
            log.info("%s: removed", path)
            touched |= self._replace(table, path, {})
            del self._files[path]
            self.errors.pop(path, None)
        for path, signature in sorted(current.items()):
            known = self._files.get(path)
            if known is not None and known.signature == signature:
                continue
            objects = self._load(path, known.objects if known else {})
            touched |= self._replace(table, path, objects)
            self._files[path] = _File(signature, objects)
        return touched

    # -- one file ---------------------------------------------------------------

    def _report(self, path: Path, problems: list[str]) -> None:
        for problem in problems:
            log.error("%s: %s", path, problem)
        if problems:
            self.errors[path] = problems
        else:
            self.errors.pop(path, None)

    def _load(self, path: Path, previous: dict[ObjectId, Parsed]) -> dict[ObjectId, Parsed]:
        try:
            text = path.read_text()
            if path.suffix == ".json":  # 30 times faster than reading it as YAML
                documents = [json.loads(text)]
            else:
                documents = list(yaml.load_all(text, Loader=_Loader))
        except (OSError, ValueError, RecursionError, yaml.YAMLError) as err:
            # ValueError: UnicodeDecodeError, or a number of over 4300 digits
            kept = f"; keeping its {len(previous)} previously loaded objects" if previous else ""
            self._report(path, [f"cannot parse the file: {_one_line(err)}{kept}"])
            return previous
        objects: dict[ObjectId, Parsed] = {}
        problems: list[str] = []
        for index, doc in _documents(documents):
            if doc is None:
                continue
            if not isinstance(doc, Mapping):
                problems.append(f"document {index}: not a Kubernetes object (a mapping)")
                continue
            kind, api = doc.get("kind", ""), doc.get("apiVersion", "")
            if not isinstance(kind, str) or not isinstance(api, str):
                problems.append(f"document {index}: kind and apiVersion must be strings")
                continue
            namespace, name = meta_ref(doc)
            oid = ObjectId(kind, "" if kind == "Node" else namespace, name)
            parser = _PARSERS.get((api, kind))
            if parser is None:
                log.debug("%s: document %s: %s %s is not used by lbctl", path, index, api, kind)
                continue
            try:
                objects[oid] = parse_checked(parser, doc)
            except Ignored as why:
                log.info("%s: %s: ignored: %s", path, oid, why)
            except InvalidObject as err:
                old = previous.get(oid)
                kept = "; keeping its previous version" if old is not None else ""
                problems.append(f"{oid}: {err}{kept}")
                if old is not None:
                    objects[oid] = old
        self._report(path, problems)
        return objects

    def _replace(
        self, table: ServiceTable, path: Path, objects: dict[ObjectId, Parsed]
    ) -> set[ServiceRef]:
        """Swap a file's objects in the table; an id owned by another file wins there."""
        touched: set[ServiceRef] = set()
        old = self._files[path].objects if path in self._files else {}
        for oid in [o for o in objects if self._owner.get(o, path) != path]:
            log.error(
                "%s: %s is already defined in %s; this copy is ignored",
                path,
                oid,
                self._owner[oid],
            )
            del objects[oid]
            self._shadowed.setdefault(oid, set()).add(path)
        for oid, obj in old.items():
            if oid not in objects:
                touched |= self._remove(table, obj)
                self._owner.pop(oid, None)
                # A file whose copy was ignored as a duplicate gets its turn.
                for waiting in self._shadowed.pop(oid, set()):
                    if waiting in self._files:
                        self._files[waiting].signature = (0, 0, 0)
        for oid, obj in objects.items():
            if old.get(oid) != obj:
                if oid in old:
                    touched |= self._remove(table, old[oid])
                touched |= self._set(table, obj)
            self._owner[oid] = path
        return touched

    def _set(self, table: ServiceTable, obj: Parsed) -> set[ServiceRef]:
        if isinstance(obj, Service):
            return {table.set_service(obj)}
        if isinstance(obj, Node):
            if obj.name == self.node_name:
                table.node = obj  # the agent's node scan re-plans what it changes
            return set()
        return table.set_slice(obj)

    def _remove(self, table: ServiceTable, obj: Parsed) -> set[ServiceRef]:
        if isinstance(obj, Service):
            return {table.remove_service(obj.ref)}
        if isinstance(obj, Node):
            if obj.name == self.node_name:
                table.node = None
            return set()
        return table.remove_slice(obj.key)


class SourceError(Exception):
    """The source itself is unusable (its directory is missing...)."""


def _documents(documents: list[Any]) -> Iterator[tuple[str, Any]]:
    for i, doc in enumerate(documents, start=1):
        if isinstance(doc, Mapping) and doc.get("kind") == "List":
            items = doc.get("items") or []
            for j, item in enumerate(items if isinstance(items, list) else [], start=1):
                yield f"{i} item {j}", item
        else:
            yield str(i), doc


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:500]


_PARSERS: dict[tuple[str, str], Any] = {
    ("v1", "Service"): parse_service,
    ("discovery.k8s.io/v1", "EndpointSlice"): parse_endpoint_slice,
    ("v1", "Node"): parse_node,
}
