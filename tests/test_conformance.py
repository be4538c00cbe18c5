"""kube-proxy's packet-flow conformance data, every packet a real connection.

One test per packet of every scenario of
`../shared/conformance/kube-proxy-packet-flows.yaml` (id "scenario/packet"),
sent through the real agent in network namespaces (see tests/conformance.py
for the lab).  Packets that need something lbctl does not have yet are
strict expected failures, with the reason: they must fail, so the gap stays
visible and a feature that lands turns them into errors to clean up.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import conformance
from tests.conftest import PIN_PREFIX, remove_pins

pytestmark = pytest.mark.netns

DATA = conformance.load()


def _params() -> list[object]:
    out = []
    for case in conformance.cases(DATA):
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        out.append(pytest.param(case.packet, id=case.id, marks=marks))
    return out


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[conformance.Harness]:
    h = conformance.Harness(DATA, tmp_path_factory.mktemp("conformance"), PIN_PREFIX)
    try:
        yield h.start()
    finally:
        h.close(remove_pins)


def test_data_has_every_scenario_with_packets() -> None:
    """The cases cover every packet of the data, each exactly once."""
    ids = [case.id for case in conformance.cases(DATA)]
    assert len(ids) == len(set(ids)) == sum(len(s.packets) for s in DATA.scenarios)
    assert all(s.packets for s in DATA.scenarios)


@pytest.mark.parametrize("packet", _params())
def test_packet(harness: conformance.Harness, packet: conformance.Packet) -> None:
    verdict = harness.check(packet)
    assert verdict.ok, verdict.report()
