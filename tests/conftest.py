"""Shared fixtures.

The suite runs as root: it compiles BPF programs, pins maps under
/sys/fs/bpf and builds network namespaces.  The pure test modules (marked
`unit`, `make unit`) run without root.  Every fixture removes what it
made, and the session ends by checking that nothing was left behind.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.datapath.ebpf.maps import MAP_TYPES
from lbctl.datapath.ebpf.settings import BpfSettings

BPFFS = Path("/sys/fs/bpf")
PIN_PREFIX = f"lbctl-test-{os.getpid()}-"
_pins = itertools.count()


@pytest.hookimpl(trylast=True)  # after -m and -k deselected what they do not ask for
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Root is needed unless every test selected is a pure one (marked `unit`: make unit)."""
    if os.geteuid() != 0 and any(item.get_closest_marker("unit") is None for item in items):
        pytest.exit(
            "lbctl's tests need root (BPF, bpffs, network namespaces); "
            "the pure ones run without it: make unit (pytest -m unit tests)",
            returncode=1,
        )


def remove_pins(path: Path) -> None:
    for name in MAP_TYPES:
        (path / name).unlink(missing_ok=True)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    """A fresh bpffs directory for one test's pinned maps."""
    path = BPFFS / f"{PIN_PREFIX}{next(_pins)}"
    try:
        yield path
    finally:
        remove_pins(path)


@contextlib.contextmanager
def compiled_datapath(name: str) -> Iterator[BpfDatapath]:
    """A compiled datapath attached nowhere, its maps pinned under a test directory."""
    path = BPFFS / f"{PIN_PREFIX}{name}"
    try:
        dp = BpfDatapath(BpfSettings(pin_dir=path))
    except BaseException:
        remove_pins(path)  # a program that fails to load leaves its maps pinned
        raise
    try:
        yield dp
    finally:
        dp.close()
        remove_pins(path)


@pytest.fixture(scope="session")
def datapath() -> Iterator[BpfDatapath]:
    """One compiled datapath for the session's map and BPF_PROG_TEST_RUN tests.

    It is attached nowhere; tests call `reset_datapath` to start from empty maps.
    """
    with compiled_datapath("session") as dp:
        yield dp


def reset_datapath(dp: BpfDatapath) -> None:
    from lbctl.datapath import NodeConfig

    dp.reconcile({})
    dp.configure(NodeConfig())
    for bpf_map in (dp.maps.ct4, dp.maps.nat4, dp.maps.lb4_affinity):
        for key in list(bpf_map.keys()):
            bpf_map.delete(key)


@pytest.fixture
def clean_datapath(datapath: BpfDatapath) -> Iterator[BpfDatapath]:
    reset_datapath(datapath)
    yield datapath
    reset_datapath(datapath)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    yield
    from tests.netlab import alive_namespaces

    leftovers = [p.name for p in BPFFS.glob(f"{PIN_PREFIX}*")]
    assert not leftovers, f"tests left pinned maps behind: {leftovers}"
    namespaces = alive_namespaces()
    assert not namespaces, f"tests left network namespaces behind: {namespaces}"
