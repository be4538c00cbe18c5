"""The Kubernetes API schemas of every release deploy/ supports, for strict checks.

kubernetes-validate (a test extra) bundles the schemas of recent releases
(1.25 on, in the version installed); the older ones it dropped come from an
earlier release of the same package, whose wheel scripts/install-deps.sh
downloads next to the venv (OLD_WHEEL), read here in place.  Both are
checked the way kubernetes_validate.validate checks, with the validators
kept: a manifest passes a version when every object validates strictly (an
unknown field fails, as `kubectl apply` with the server's schema refuses it).
"""

from __future__ import annotations

import functools
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import referencing
from kubernetes_validate import utils

# The oldest release deploy/ supports, and where its schemas are.
OLDEST = (1, 24)
OLD_WHEEL = (
    Path(sys.prefix) / "share" / "lbctl-test" / "kubernetes_validate-1.30.0-py3-none-any.whl"
)
_OLD_DIR = "kubernetes_validate/kubernetes-json-schema"


class SchemaProblem(Exception):
    """An object does not pass a version's schema; says where and why."""


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def bundled() -> list[str]:
    """The releases whose schemas kubernetes-validate bundles, as "1.N"."""
    return sorted({".".join(map(str, _minor(v))) for v in utils.all_versions()}, key=_minor)


def supported() -> list[str]:
    """Every release from OLDEST to the newest bundled, as "1.N"."""
    newest = _minor(bundled()[-1])
    return [f"1.{minor}" for minor in range(OLDEST[1], newest[1] + 1)]


@functools.cache
def _old_schemas() -> zipfile.ZipFile:
    if not OLD_WHEEL.exists():
        raise FileNotFoundError(
            f"{OLD_WHEEL} is missing: it holds the schemas of Kubernetes releases before "
            f"{bundled()[0]}; `make deps` downloads it"
        )
    return zipfile.ZipFile(OLD_WHEEL)


@functools.cache
def _schema(version: str, name: str) -> Any:
    """A strict schema file of a release, from kubernetes-validate or the older wheel."""
    directory = f"v{version}.0-local-strict"
    if version in bundled():
        path = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / directory
        try:
            return json.loads((path / name).read_text())
        except FileNotFoundError:
            raise SchemaProblem(f"no schema {name} for Kubernetes {version}") from None
    try:
        return json.loads(_old_schemas().read(f"{_OLD_DIR}/{directory}/{name}"))
    except KeyError:
        raise SchemaProblem(f"no schema {name} for Kubernetes {version}") from None


@functools.cache
def _validator(version: str, kind: str, api_version: str) -> jsonschema.Draft202012Validator:
    # as kubernetes_validate builds it: the kind's schema, refs into _definitions.json
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema = _schema(version, f"{kind.lower()}-{api}.json")
    registry: referencing.Registry[Any] = referencing.Registry()
    registry = referencing.Resource.from_contents(schema) @ registry
    registry = referencing.Resource.from_contents(_schema(version, "_definitions.json")) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(doc: dict[str, Any], version: str) -> None:
    """Raise SchemaProblem unless `doc` passes Kubernetes `version`'s schema strictly."""
    where = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
    validator = _validator(version, doc["kind"], doc["apiVersion"])
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        at = ".".join(str(p) for p in error.path) or "(top)"
        raise SchemaProblem(f"{where}: {at}: {error.message}")
