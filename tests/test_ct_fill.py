"""A nearly full conntrack table: which flows the agent's sweep ends to make room.

The programs mark a flow `assured` once its client spoke after a reply (a
TCP handshake completed); the sweep (lbctl/datapath/ebpf/conntrack_gc.py) ends idle
flows, then not-assured ones, newest first, and never an established TCP
connection in use, as netfilter never early-drops an assured connection.  Real frames through the
real tc program under BPF_PROG_TEST_RUN make the entries; a datapath of its
own has a 100-entry table.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from lbctl.datapath.ebpf import conntrack_gc, layout
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.datapath.ebpf.settings import BpfSettings
from tests import packets
from tests.conftest import BPFFS, PIN_PREFIX, remove_pins
from tests.test_bpf_prog import (
    CLIENT,
    CT_DIR_FORWARD,
    TC_ACT_SHOT,
    TCP_PORT,
    TCP_TARGET,
    VIP,
    checked,
    ct_key,
    run,
    syn,
    tcp_service,
)

TCP = packets.IPPROTO_TCP
CT_SIZE = 100  # entries: 50 unmasqueraded flows (a forward and a reverse entry each)


@pytest.fixture(scope="module")
def small() -> Iterator[BpfDatapath]:
    path = BPFFS / f"{PIN_PREFIX}ctfill"
    try:
        dp = BpfDatapath(BpfSettings(pin_dir=path, ct_size=CT_SIZE))
    except BaseException:
        remove_pins(path)
        raise
    try:
        yield dp
    finally:
        dp.close()
        remove_pins(path)


@pytest.fixture
def dp(small: BpfDatapath) -> Iterator[BpfDatapath]:
    from tests.conftest import reset_datapath

    reset_datapath(small)
    yield small
    reset_datapath(small)


def forward(dp: BpfDatapath, sport: int) -> object:
    return dp.maps.ct4.lookup(ct_key(CLIENT, VIP, sport, TCP_PORT, TCP, CT_DIR_FORWARD))


def established(dp: BpfDatapath, sport: int) -> None:
    """SYN, SYN-ACK, the client's ACK: a handshake through the program."""
    backend = syn(dp, sport)
    checked(run(dp, packets.ipv4_tcp(backend, CLIENT, TCP_TARGET, sport, "SA")))
    checked(run(dp, packets.ipv4_tcp(CLIENT, VIP, sport, TCP_PORT, "A")))


def half_open(dp: BpfDatapath, sport: int) -> None:
    """A SYN the backend answers and the client never acknowledges (a flood's)."""
    backend = syn(dp, sport)
    checked(run(dp, packets.ipv4_tcp(backend, CLIENT, TCP_TARGET, sport, "SA")))


def test_a_flow_is_assured_once_its_client_speaks_after_a_reply(dp: BpfDatapath) -> None:
    tcp_service(dp)
    half_open(dp, 45000)
    entry = forward(dp, 45000)
    assert entry is not None and entry.assured == 0, "a SYN-ACK alone is no handshake"
    # the SYN-ACK was lost after the node: the client sends its SYN again, the
    # backend its SYN-ACK
    backend = checked(run(dp, packets.ipv4_tcp(CLIENT, VIP, 45000, TCP_PORT, "S"))).dst
    assert forward(dp, 45000).assured == 0  # type: ignore[attr-defined]
    checked(run(dp, packets.ipv4_tcp(backend, CLIENT, TCP_TARGET, 45000, "SA")))
    checked(run(dp, packets.ipv4_tcp(CLIENT, VIP, 45000, TCP_PORT, "A")))
    assert forward(dp, 45000).assured == 1  # type: ignore[attr-defined]
    # a new connection on the same tuple starts unassured
    syn(dp, 45000)
    assert forward(dp, 45000).assured == 0  # type: ignore[attr-defined]


def test_the_sweep_ends_half_open_flows_newest_first_never_established_ones(
    dp: BpfDatapath,
) -> None:
    tcp_service(dp)
    for sport in range(46000, 46010):
        established(dp, sport)
    flood = list(range(47000, 47038))
    for sport in flood:
        half_open(dp, sport)
        time.sleep(0.001)  # created_ns orders them
    used = len(list(dp.maps.ct4.keys()))
    assert used == 2 * (10 + len(flood)) >= conntrack_gc.HIGH * CT_SIZE, used
    swept = conntrack_gc.sweep(dp.maps, dp.settings)
    left = {layout.port_num(k.sport) for k, _ in dp.maps.ct4.items() if k.dir == CT_DIR_FORWARD}
    assert set(range(46000, 46010)) <= left, "an established flow was ended to make room"
    assert swept.conntrack_used <= conntrack_gc.LOW * CT_SIZE, swept
    gone = [p for p in flood if p not in left]
    assert gone and gone == flood[-len(gone) :], "the newest half-open flows go first"
    assert swept.evicted == len(gone)


def test_a_table_full_of_established_flows_keeps_them_and_refuses_new_ones(
    dp: BpfDatapath,
) -> None:
    tcp_service(dp)
    sports = range(48000, 48000 + CT_SIZE // 2)
    for sport in sports:
        established(dp, sport)
    swept = conntrack_gc.sweep(dp.maps, dp.settings)
    assert swept.evicted == 0 and swept.conntrack_used == CT_SIZE, swept
    result = run(dp, packets.ipv4_tcp(CLIENT, VIP, 49000, TCP_PORT, "S"))
    assert result.retval == TC_ACT_SHOT, "a new flow that finds the table full is dropped"
    for sport in sports:
        assert forward(dp, sport) is not None
    # established connections idle for IDLE_TCP_S are fair game
    then = time.monotonic_ns() - (conntrack_gc.IDLE_TCP_S + 1) * 1_000_000_000
    for key, e in list(dp.maps.ct4.items()):
        e.last_seen_ns = then
        dp.maps.ct4.update(key, e)
    swept = conntrack_gc.sweep(dp.maps, dp.settings)
    assert swept.evicted > 0 and swept.conntrack_used <= conntrack_gc.LOW * CT_SIZE, swept
