"""The IPVS fallback in a kernel that has IPVS: User-Mode Linux (see tests/uml.py).

One UML boot runs every test of tests/ipvs_inner.py with real traffic in
network namespaces inside it; each is reported here as its own test, with
the inner failure as its message.  The UML kernel and all it changes are
gone when it powers off; nothing touches the host's network namespace.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from tests import ipvs_inner, uml

pytestmark = pytest.mark.uml

INNER = sorted(
    name
    for name, fn in inspect.getmembers(ipvs_inner, inspect.isfunction)
    if name.startswith("test_")
)


@pytest.fixture(scope="module")
def uml_run(tmp_path_factory: pytest.TempPathFactory) -> uml.UmlRun:
    why = uml.available()
    if why:
        pytest.fail(why)
    return uml.run_pytest(tmp_path_factory.mktemp("uml"), ["tests/ipvs_inner.py"])


@pytest.mark.parametrize("name", INNER)
def test_in_uml(uml_run: uml.UmlRun, name: str) -> None:
    case = uml_run.cases.get(name)
    if case is None:
        pytest.fail(
            f"{name} did not run in UML (inner exit code {uml_run.returncode}, "
            f"{uml_run.seconds:.0f} s):\n{uml_run.console[-6000:]}"
        )
    if case.outcome == "xfailed":
        pytest.xfail(f"in UML: {case.message}")  # a known limit of the UML kernel, said so
    assert case.outcome == "passed", f"{name} {case.outcome} in UML:\n{case.message}"


def test_the_uml_session_passed_as_a_whole(uml_run: uml.UmlRun) -> None:
    """Fixture errors and teardown problems show here, not in one test."""
    assert uml_run.returncode == 0, uml_run.console[-6000:]
    assert Path(uml.UML).exists()
