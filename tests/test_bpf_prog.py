"""The tc program under BPF_PROG_TEST_RUN: frames in, verdict and frame out, no network.

Each test programs services through FrontendWriter (as the agent does), runs frames
built by tests/packets.py through the loaded program, and checks the frame that comes
out (addresses, ports, checksums, TTL), the verdict, the conntrack map and the
per-CPU lb_stats counters.

In a test run the skb has no ingress ifindex, so the FIB lookup after NAT normally
fails and the program returns TC_ACT_OK with the TTL untouched; if it ever redirects
(TC_ACT_REDIRECT), it must have decremented the TTL like a router.  Both are accepted
for a forwarded packet, never TC_ACT_SHOT.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import time
from collections.abc import Iterable, Sequence
from typing import Any

import pytest

from lbctl.datapath.ebpf import layout, libbpf
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.model import Protocol, ServiceRef
from lbctl.plan.planner import Backend, Frontend, FrontendKey
from tests import packets

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7
FORWARDED = (TC_ACT_OK, TC_ACT_REDIRECT)

VIP = "10.96.0.10"
OTHER_IP = "10.96.0.11"  # no service there
CLIENT = "10.0.0.1"
BACKENDS = ("10.244.0.20", "10.244.0.21", "10.244.0.22")
TCP_PORT, TCP_TARGET = 80, 8080
UDP_PORT, UDP_TARGET = 53, 5353

ETH_HLEN = 14
IP_HLEN = 20

STAT_PASS = layout.const("LB_STAT_PASS")
STAT_DNAT_NEW = layout.const("LB_STAT_DNAT_NEW")
STAT_DNAT_EST = layout.const("LB_STAT_DNAT_EST")
STAT_RNAT = layout.const("LB_STAT_RNAT")
STAT_DROP_NO_BACKEND = layout.const("LB_STAT_DROP_NO_BACKEND")
STAT_PASS_FRAGMENT = layout.const("LB_STAT_PASS_FRAGMENT")
STAT_REDIRECT = layout.const("LB_STAT_REDIRECT")
STAT_REJECT = layout.const("LB_STAT_REJECT")
STAT_MAX = layout.const("LB_STAT_MAX")

CT_DIR_FORWARD = layout.const("CT_DIR_FORWARD")
CT_DIR_REVERSE = layout.const("CT_DIR_REVERSE")
CT_F_SEEN_REPLY = layout.const("CT_F_SEEN_REPLY")


# ------------------------------------------------------------------------------ helpers


def ip(addr: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(addr)


def tcp_key(vip: str = VIP, port: int = TCP_PORT) -> FrontendKey:
    return FrontendKey(ip(vip), port, Protocol.TCP)


def udp_key(vip: str = VIP, port: int = UDP_PORT) -> FrontendKey:
    return FrontendKey(ip(vip), port, Protocol.UDP)


def frontend(key: FrontendKey, backends: Iterable[str], target: int, name: str = "web") -> Frontend:
    return Frontend(
        key,
        ServiceRef("ns", name),
        "http" if key.protocol is Protocol.TCP else "dns",
        "ClusterIP",
        tuple(Backend(ip(addr), target, key.protocol) for addr in backends),
    )


def tcp_service(dp: BpfDatapath, backends: Sequence[str] = BACKENDS) -> FrontendKey:
    key = tcp_key()
    dp.table.upsert(frontend(key, backends, TCP_TARGET))
    return key


def udp_service(dp: BpfDatapath, backends: Sequence[str] = BACKENDS) -> FrontendKey:
    key = udp_key()
    dp.table.upsert(frontend(key, backends, UDP_TARGET))
    return key


def run(dp: BpfDatapath, frame: bytes) -> libbpf.TestRun:
    result = libbpf.prog_test_run(dp.prog_fd, frame)
    assert len(result.data) == len(frame), "the program must not resize the frame"
    return result


def stats(dp: BpfDatapath) -> list[int]:
    """lb_stats summed over CPUs, by LB_STAT_* index."""
    out = []
    for idx in range(STAT_MAX):
        per_cpu = dp.maps.lb_stats.lookup(layout.ffi.new("__u32 *", idx))
        assert per_cpu is not None
        out.append(sum(int(v) for v in per_cpu))
    return out


def stat_delta(before: list[int], after: list[int]) -> dict[int, int]:
    """The counters that moved, and by how much."""
    return {i: a - b for i, (b, a) in enumerate(zip(before, after, strict=True)) if a != b}


def forward_stats(results: Iterable[libbpf.TestRun], want: dict[int, int]) -> dict[int, int]:
    """The stat delta of forwarded packets: `want` plus one REDIRECT per redirected one."""
    out = dict(want)
    redirects = sum(1 for r in results if r.retval == TC_ACT_REDIRECT)
    if redirects:
        out[STAT_REDIRECT] = redirects
    return out


def ttl_after(retval: int, ttl_in: int) -> int:
    """TC_ACT_OK hands the packet to the stack (which decrements); a redirect decrements."""
    assert retval in FORWARDED, f"a forwarded packet got verdict {retval}"
    return ttl_in - 1 if retval == TC_ACT_REDIRECT else ttl_in


def normalized(frame: bytes) -> bytes:
    """The frame with its IPv4 and TCP/UDP checksum fields zeroed.

    Checksums are verified separately by packets.parse; zeroing them lets a frame
    rewritten incrementally be compared with one built from scratch even where the
    two legitimately differ (0x0000 vs 0xffff for a one's complement zero).
    """
    out = bytearray(frame)
    ihl = (out[ETH_HLEN] & 0x0F) * 4
    out[ETH_HLEN + 10 : ETH_HLEN + 12] = b"\0\0"
    l4 = ETH_HLEN + ihl
    proto = out[ETH_HLEN + 9]
    if proto == packets.IPPROTO_TCP:
        out[l4 + 16 : l4 + 18] = b"\0\0"
    elif proto == packets.IPPROTO_UDP:
        out[l4 + 6 : l4 + 8] = b"\0\0"
    return bytes(out)


def checked(result: libbpf.TestRun) -> packets.Parsed:
    """Parse a forwarded frame and insist on valid IPv4 and L4 checksums."""
    assert result.retval in FORWARDED, f"verdict {result.retval}, expected OK or REDIRECT"
    out = packets.parse(result.data)
    assert out.ip_csum_ok, "IPv4 header checksum is wrong after NAT"
    assert out.l4_csum_ok is True, f"L4 checksum is wrong after NAT: {out}"
    return out


def assert_dnat(
    result: libbpf.TestRun, backends: Iterable[str], frame_of: Any, ttl: int = 64
) -> str:
    """The output is `frame_of(backend, ttl)` for one of `backends`; return that backend.

    Everything but the destination (and the TTL on the redirect path) must be
    byte-identical to the input; checksums must verify.
    """
    out = checked(result)
    assert out.dst in set(backends), f"DNATed to {out.dst}, not a backend {sorted(backends)}"
    want = frame_of(out.dst, ttl_after(result.retval, ttl))
    assert normalized(result.data) == normalized(want)
    return out.dst


def assert_passes_unchanged(dp: BpfDatapath, frame: bytes, stat: int = STAT_PASS) -> None:
    before = stats(dp)
    ct_before = ct_entries(dp)
    result = run(dp, frame)
    assert result.retval == TC_ACT_OK, f"verdict {result.retval}, expected TC_ACT_OK"
    assert result.data == frame, "a pass-through frame was modified"
    assert stat_delta(before, stats(dp)) == {stat: 1}
    assert [dataclasses.replace(e, last_seen_ns=0) for e in ct_entries(dp)] == [
        dataclasses.replace(e, last_seen_ns=0) for e in ct_before
    ], "a pass-through frame changed conntrack"


@dataclasses.dataclass(frozen=True)
class Ct:
    """One decoded ct4 entry."""

    saddr: str
    daddr: str
    sport: int
    dport: int
    proto: int
    dir: int
    nat_addr: str
    nat_port: int
    flags: int
    backend_id: int
    frontend_id: int
    created_ns: int
    last_seen_ns: int


def ct_entries(dp: BpfDatapath) -> list[Ct]:
    out = []
    for k, v in dp.maps.ct4.items():
        assert k.pad == 0
        out.append(
            Ct(
                layout.ip4_str(k.saddr),
                layout.ip4_str(k.daddr),
                layout.port_num(k.sport),
                layout.port_num(k.dport),
                k.proto,
                k.dir,
                layout.ip4_str(v.nat_addr),
                layout.port_num(v.nat_port),
                v.flags,
                v.backend_id,
                v.frontend_id,
                v.created_ns,
                v.last_seen_ns,
            )
        )
    return out


def ct_key(saddr: str, daddr: str, sport: int, dport: int, proto: int, direction: int) -> Any:
    return layout.new(
        "struct ct4_key",
        saddr=layout.ip4(saddr),
        daddr=layout.ip4(daddr),
        sport=layout.port(sport),
        dport=layout.port(dport),
        proto=proto,
        dir=direction,
    )


def tcp_to_backend(sport: int, flags: str = "S", payload: bytes = b"", **kw: Any) -> Any:
    """frame_of for assert_dnat: the client's TCP packet as it should leave."""

    def build(backend: str, ttl: int) -> bytes:
        return packets.ipv4_tcp(CLIENT, backend, sport, TCP_TARGET, flags, payload, ttl=ttl, **kw)

    return build


def syn(dp: BpfDatapath, sport: int, **kw: Any) -> str:
    """Open a flow from CLIENT:sport to the TCP VIP; return the chosen backend."""
    frame = packets.ipv4_tcp(CLIENT, VIP, sport, TCP_PORT, "S", **kw)
    return assert_dnat(run(dp, frame), BACKENDS, tcp_to_backend(sport, "S", **kw))


# ---------------------------------------------------------------------- 1, 2: new flows


def test_tcp_syn_is_dnated_to_a_backend(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    tcp_service(dp)
    before = stats(dp)
    frame = packets.ipv4_tcp(CLIENT, VIP, 40000, TCP_PORT, "S", tcp_options=b"\x02\x04\x05\xb4")
    assert packets.parse(frame).l4_csum_ok is True  # the input carries full checksums
    result = run(dp, frame)
    backend = assert_dnat(
        result, BACKENDS, tcp_to_backend(40000, "S", tcp_options=b"\x02\x04\x05\xb4")
    )
    out = packets.parse(result.data)
    assert (out.src, out.sport, out.dst, out.dport) == (CLIENT, 40000, backend, TCP_TARGET)
    assert (out.src_mac, out.dst_mac, out.flags, out.seq) == (
        packets.SRC_MAC,
        packets.DST_MAC,
        "S",
        1000,
    )
    assert stat_delta(before, stats(dp)) == forward_stats([result], {STAT_DNAT_NEW: 1})


def test_tcp_syns_from_many_ports_use_every_backend_and_only_backends(
    clean_datapath: BpfDatapath,
) -> None:
    dp = clean_datapath
    tcp_service(dp)
    before = stats(dp)
    chosen = [syn(dp, sport) for sport in range(41000, 41090)]
    assert set(chosen) == set(BACKENDS)  # P(a backend unused in 90 draws) ~ 4e-16
    assert stats(dp)[STAT_DNAT_NEW] - before[STAT_DNAT_NEW] == 90
    assert len(ct_entries(dp)) == 2 * 90


def test_udp_is_dnated_with_a_valid_checksum(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    udp_service(dp)
    before = stats(dp)
    chosen = []
    results = []
    for sport in range(42000, 42060):
        payload = b"query-%d" % sport
        frame = packets.ipv4_udp(CLIENT, VIP, sport, UDP_PORT, payload)
        assert packets.parse(frame).l4_csum_ok is True

        def build(backend: str, ttl: int, sport: int = sport, payload: bytes = payload) -> bytes:
            return packets.ipv4_udp(CLIENT, backend, sport, UDP_TARGET, payload, ttl=ttl)

        result = run(dp, frame)
        results.append(result)
        chosen.append(assert_dnat(result, BACKENDS, build))
        out = packets.parse(result.data)
        assert (out.src, out.sport, out.dport, out.payload) == (CLIENT, sport, UDP_TARGET, payload)
        assert not out.udp_csum_zero
    assert set(chosen) == set(BACKENDS)
    assert stat_delta(before, stats(dp)) == forward_stats(results, {STAT_DNAT_NEW: 60})


def test_udp_zero_checksum_stays_zero(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    udp_service(dp)
    for sport in range(43000, 43020):
        frame = packets.ipv4_udp(CLIENT, VIP, sport, UDP_PORT, b"no-csum", zero_checksum=True)
        result = run(dp, frame)
        out = checked(result)
        assert out.udp_csum_zero, "a UDP checksum of 0 (none) must stay 0 after DNAT"
        assert out.dst in BACKENDS
        want = packets.ipv4_udp(
            CLIENT,
            out.dst,
            sport,
            UDP_TARGET,
            b"no-csum",
            zero_checksum=True,
            ttl=ttl_after(result.retval, 64),
        )
        assert normalized(result.data) == normalized(want)
        assert result.data[-len(b"no-csum") - 2 : -len(b"no-csum")] == b"\0\0"


def test_udp_checksum_that_becomes_zero_is_sent_as_ffff(clean_datapath: BpfDatapath) -> None:
    """A computed UDP checksum of 0 must go out as 0xffff, never as 0 ("none")."""
    dp = clean_datapath
    udp_service(dp, backends=BACKENDS[:1])
    backend, sport = BACKENDS[0], 44000
    # Pick the 2-byte payload that makes the DNATed datagram's checksum fold to zero:
    # with payload 0 the sum is ~c, so adding the word c brings it to 0xffff (= -0).
    pseudo = _pseudo(backend, 8 + 2)
    plain = packets.ipv4_udp(CLIENT, backend, sport, UDP_TARGET, b"\0\0", zero_checksum=True)
    payload = packets.checksum(pseudo + plain[ETH_HLEN + IP_HLEN :]).to_bytes(2, "big")
    after = packets.ipv4_udp(CLIENT, backend, sport, UDP_TARGET, payload, zero_checksum=True)
    assert packets.checksum(pseudo + after[ETH_HLEN + IP_HLEN :]) == 0
    frame = packets.ipv4_udp(CLIENT, VIP, sport, UDP_PORT, payload)
    assert not packets.parse(frame).udp_csum_zero
    result = run(dp, frame)
    out = checked(result)
    assert out.dst == backend
    assert not out.udp_csum_zero, "checksum 0 after NAT was written as 0 (= no checksum)"
    assert result.data[ETH_HLEN + IP_HLEN + 6 : ETH_HLEN + IP_HLEN + 8] == b"\xff\xff"


def _pseudo(dst: str, udp_len: int) -> bytes:
    return (
        ip(CLIENT).packed + ip(dst).packed + bytes([0, packets.IPPROTO_UDP]) + udp_len.to_bytes(2)
    )


# ---------------------------------------------------------------------- 3: conntrack


def test_established_flow_sticks_to_its_backend(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    tcp_service(dp)
    sport = 45000
    backend = syn(dp, sport)
    before = stats(dp)
    results = []
    for n in range(50):
        flags = "A" if n % 2 == 0 else "PA"
        payload = b"" if flags == "A" else b"GET /%d HTTP/1.1\r\n\r\n" % n
        kw: dict[str, Any] = {"seq": 1001 + n, "ack": 5000 + n}
        frame = packets.ipv4_tcp(CLIENT, VIP, sport, TCP_PORT, flags, payload, **kw)
        result = run(dp, frame)
        results.append(result)
        got = assert_dnat(result, BACKENDS, tcp_to_backend(sport, flags, payload, **kw))
        assert got == backend, f"packet {n} ({flags}) of the flow left for {got}, not {backend}"
        out = packets.parse(result.data)
        assert (out.flags, out.seq, out.ack, out.payload) == (flags, 1001 + n, 5000 + n, payload)
    assert stat_delta(before, stats(dp)) == forward_stats(results, {STAT_DNAT_EST: 50})
    assert len(ct_entries(dp)) == 2  # no new entries for established packets


def test_conntrack_holds_forward_and_reverse_entries(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    key = tcp_service(dp)
    sport = 45100
    backend = syn(dp, sport)
    backend_id = dp.table.backends[(ip(backend), TCP_TARGET, Protocol.TCP)].ident
    frontend_id = dp.table.frontends[key].ident

    entries = {e.dir: e for e in ct_entries(dp)}
    assert len(ct_entries(dp)) == 2 and set(entries) == {CT_DIR_FORWARD, CT_DIR_REVERSE}
    fwd, rev = entries[CT_DIR_FORWARD], entries[CT_DIR_REVERSE]
    tcp = packets.IPPROTO_TCP
    assert (fwd.saddr, fwd.daddr, fwd.sport, fwd.dport, fwd.proto) == (
        CLIENT,
        VIP,
        sport,
        TCP_PORT,
        tcp,
    )
    assert (fwd.nat_addr, fwd.nat_port) == (backend, TCP_TARGET)
    assert (rev.saddr, rev.daddr, rev.sport, rev.dport, rev.proto) == (
        backend,
        CLIENT,
        TCP_TARGET,
        sport,
        tcp,
    )
    assert (rev.nat_addr, rev.nat_port) == (VIP, TCP_PORT)
    for e in (fwd, rev):
        assert (e.backend_id, e.frontend_id) == (backend_id, frontend_id)
        assert e.flags == 0  # no reply seen yet, not closing
        assert 0 < e.created_ns <= e.last_seen_ns

    # The maps answer the same when asked by key, built through layout.
    value = dp.maps.ct4.lookup(ct_key(CLIENT, VIP, sport, TCP_PORT, tcp, CT_DIR_FORWARD))
    assert value is not None and layout.ip4_str(value.nat_addr) == backend
    value = dp.maps.ct4.lookup(ct_key(backend, CLIENT, TCP_TARGET, sport, tcp, CT_DIR_REVERSE))
    assert value is not None and layout.port_num(value.nat_port) == TCP_PORT


# ---------------------------------------------------------------------- 4, 5: replies


def reply_frame(backend: str, sport: int, flags: str = "SA", **kw: Any) -> bytes:
    return packets.ipv4_tcp(backend, CLIENT, TCP_TARGET, sport, flags, seq=5000, ack=1001, **kw)


def test_reply_from_backend_is_reverse_nated(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    tcp_service(dp)
    sport = 46000
    backend = syn(dp, sport)
    before = stats(dp)
    results = []
    for flags, payload in [("SA", b""), ("PA", b"HTTP/1.1 200 OK\r\n\r\n"), ("A", b"")]:
        result = run(dp, reply_frame(backend, sport, flags, payload=payload))
        results.append(result)
        out = checked(result)
        assert (out.src, out.sport, out.dst, out.dport) == (VIP, TCP_PORT, CLIENT, sport)
        want = packets.ipv4_tcp(
            VIP,
            CLIENT,
            TCP_PORT,
            sport,
            flags,
            payload,
            seq=5000,
            ack=1001,
            ttl=ttl_after(result.retval, 64),
        )
        assert normalized(result.data) == normalized(want)
    assert stat_delta(before, stats(dp)) == forward_stats(results, {STAT_RNAT: 3})
    fwd = dp.maps.ct4.lookup(
        ct_key(CLIENT, VIP, sport, TCP_PORT, packets.IPPROTO_TCP, CT_DIR_FORWARD)
    )
    assert fwd is not None and fwd.flags & CT_F_SEEN_REPLY


def test_udp_reply_from_backend_is_reverse_nated(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    udp_service(dp)
    result = run(dp, packets.ipv4_udp(CLIENT, VIP, 46100, UDP_PORT, b"q"))
    backend = checked(result).dst
    assert backend in BACKENDS
    result = run(dp, packets.ipv4_udp(backend, CLIENT, UDP_TARGET, 46100, b"answer"))
    out = checked(result)
    assert (out.src, out.sport, out.dst, out.dport, out.payload) == (
        VIP,
        UDP_PORT,
        CLIENT,
        46100,
        b"answer",
    )
    assert not out.udp_csum_zero


def test_reply_without_a_flow_passes_unchanged(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    tcp_service(dp)
    assert_passes_unchanged(dp, reply_frame(BACKENDS[0], 46200))
    backend = syn(dp, 46201)
    # A flow exists, but not for these tuples: other client port, other backend port.
    assert_passes_unchanged(dp, reply_frame(backend, 46202))
    assert_passes_unchanged(dp, packets.ipv4_tcp(backend, CLIENT, 9090, 46201, "SA"))
    other = next(b for b in BACKENDS if b != backend)
    assert_passes_unchanged(dp, reply_frame(other, 46201))


def test_reverse_entry_without_forward_twin_is_not_rewritten(
    clean_datapath: BpfDatapath,
) -> None:
    dp = clean_datapath
    tcp_service(dp)
    sport = 46300
    backend = syn(dp, sport)
    tcp = packets.IPPROTO_TCP
    assert dp.maps.ct4.delete(ct_key(CLIENT, VIP, sport, TCP_PORT, tcp, CT_DIR_FORWARD))
    assert dp.maps.ct4.lookup(ct_key(backend, CLIENT, TCP_TARGET, sport, tcp, CT_DIR_REVERSE))
    assert_passes_unchanged(dp, reply_frame(backend, sport))
    assert_passes_unchanged(dp, reply_frame(backend, sport, "PA", payload=b"data"))


def test_reverse_entry_whose_twin_names_another_backend_is_not_rewritten(
    clean_datapath: BpfDatapath,
) -> None:
    """A direct connection to a pod reusing a balanced tuple must not become the VIP."""
    dp = clean_datapath
    tcp_service(dp)
    sport = 46400
    backend = syn(dp, sport)
    other = next(b for b in BACKENDS if b != backend)
    tcp = packets.IPPROTO_TCP
    key = ct_key(CLIENT, VIP, sport, TCP_PORT, tcp, CT_DIR_FORWARD)
    fwd = dp.maps.ct4.lookup(key)
    assert fwd is not None
    fwd.nat_addr = layout.ip4(other)
    dp.maps.ct4.update(key, fwd)
    assert_passes_unchanged(dp, reply_frame(backend, sport))


# ---------------------------------------------------------------------- 6: pass-through

_VIP_SYN = packets.ipv4_tcp(CLIENT, VIP, 47000, TCP_PORT, "S", b"0123456789abcdef")
_VIP_UDP = packets.ipv4_udp(CLIENT, VIP, 47000, UDP_PORT, b"0123456789abcdef")

PASS_THROUGH: dict[str, tuple[bytes, int]] = {
    "tcp-other-ip": (packets.ipv4_tcp(CLIENT, OTHER_IP, 47000, TCP_PORT, "S"), STAT_PASS),
    "tcp-other-port": (packets.ipv4_tcp(CLIENT, VIP, 47000, 81, "S"), STAT_PASS),
    "tcp-to-udp-port": (packets.ipv4_tcp(CLIENT, VIP, 47000, UDP_PORT, "S"), STAT_PASS),
    "tcp-from-vip-port": (packets.ipv4_tcp(CLIENT, OTHER_IP, TCP_PORT, 47000, "S"), STAT_PASS),
    "udp-other-ip": (packets.ipv4_udp(CLIENT, OTHER_IP, 47000, UDP_PORT, b"x"), STAT_PASS),
    "udp-other-port": (packets.ipv4_udp(CLIENT, VIP, 47000, 54, b"x"), STAT_PASS),
    "udp-to-tcp-port": (packets.ipv4_udp(CLIENT, VIP, 47000, TCP_PORT, b"x"), STAT_PASS),
    "icmp-echo-to-vip": (packets.ipv4_icmp_echo(CLIENT, VIP), STAT_PASS),
    "arp-for-vip": (packets.arp_request(CLIENT, VIP), STAT_PASS),
    "ipv6-udp": (packets.ipv6_udp("fd00::1", "fd00::10", 47000, UDP_PORT, b"x"), STAT_PASS),
    "tcp-first-fragment-to-vip": (
        packets.ipv4_tcp(CLIENT, VIP, 47000, TCP_PORT, "S", b"01234567", more_fragments=True),
        STAT_PASS_FRAGMENT,
    ),
    "tcp-later-fragment-to-vip": (
        packets.ipv4_tcp(CLIENT, VIP, 47000, TCP_PORT, payload=b"\0\0\0\x50rest", frag_off=24),
        STAT_PASS_FRAGMENT,
    ),
    "tcp-last-fragment-to-vip": (
        packets.ipv4_tcp(
            CLIENT, VIP, 47000, TCP_PORT, payload=b"x" * 8, frag_off=8, more_fragments=True
        ),
        STAT_PASS_FRAGMENT,
    ),
    "udp-first-fragment-to-vip": (
        packets.ipv4_udp(CLIENT, VIP, 47000, UDP_PORT, b"01234567", more_fragments=True),
        STAT_PASS_FRAGMENT,
    ),
    "udp-later-fragment-to-vip": (
        packets.ipv4_udp(CLIENT, VIP, 47000, UDP_PORT, b"\xb7\x98\0\x35rest", frag_off=16),
        STAT_PASS_FRAGMENT,
    ),
    "ipv4-header-only": (_VIP_SYN[: ETH_HLEN + IP_HLEN], STAT_PASS),
    "tcp-ports-only": (_VIP_SYN[: ETH_HLEN + IP_HLEN + 4], STAT_PASS),
    "tcp-header-cut": (_VIP_SYN[: ETH_HLEN + IP_HLEN + 19], STAT_PASS),
    "udp-header-cut": (_VIP_UDP[: ETH_HLEN + IP_HLEN + 7], STAT_PASS),
    "ip-options-to-other-ip": (
        packets.ipv4_tcp(CLIENT, OTHER_IP, 47000, TCP_PORT, "S", ip_options=b"\x94\x04\0\0"),
        STAT_PASS,
    ),
    "ip-options-cut-to-vip": (
        packets.ipv4_tcp(CLIENT, VIP, 47000, TCP_PORT, "S", ip_options=b"\x01" * 40)[
            : ETH_HLEN + 40
        ],
        STAT_PASS,
    ),
    "tcp-cut-after-ip-options-to-vip": (
        packets.ipv4_tcp(CLIENT, VIP, 47000, TCP_PORT, "S", ip_options=b"\x01" * 40)[
            : ETH_HLEN + 60 + 3
        ],
        STAT_PASS,
    ),
}


@pytest.mark.parametrize("name", list(PASS_THROUGH))
def test_pass_through_is_byte_identical(clean_datapath: BpfDatapath, name: str) -> None:
    dp = clean_datapath
    tcp_service(dp)
    udp_service(dp)
    frame, stat = PASS_THROUGH[name]
    parsed = packets.parse(frame)
    if "fragment" in name:
        assert parsed.is_fragment and parsed.dst == VIP
    if "cut" in name or "only" in name:
        assert parsed.truncated and parsed.ethertype == packets.ETH_P_IP
    assert_passes_unchanged(dp, frame, stat)
    assert ct_entries(dp) == []


@pytest.mark.parametrize(
    "length", [ETH_HLEN, ETH_HLEN + 10, ETH_HLEN + IP_HLEN - 1], ids=["eth-only", "ip-10", "ip-19"]
)
def test_frame_shorter_than_an_ipv4_header_passes_unchanged(
    clean_datapath: BpfDatapath, length: int
) -> None:
    dp = clean_datapath
    tcp_service(dp)
    frame = _VIP_SYN[:length]
    try:
        assert_passes_unchanged(dp, frame)
    except libbpf.MapError as err:
        # Recent kernels refuse such frames before the program runs (the IPv4
        # header must be in the linear data), so the program's own bounds check
        # cannot be reached from BPF_PROG_TEST_RUN.
        assert err.errno == errno.EINVAL
        pytest.skip(f"this kernel refuses a {length}-byte IPv4 frame in BPF_PROG_TEST_RUN")


# ---------------------------------------------------------------------- 7: IP options


@pytest.mark.parametrize(
    "options",
    [b"\x94\x04\0\0", b"\x01\x01\x01\0", b"\x07\x27\x04" + b"\0" * 37],
    ids=["router-alert", "nops", "record-route-40"],
)
def test_ip_options_to_vip_are_dnated(clean_datapath: BpfDatapath, options: bytes) -> None:
    dp = clean_datapath
    tcp_service(dp)
    udp_service(dp)
    frame = packets.ipv4_tcp(CLIENT, VIP, 48000, TCP_PORT, "S", b"data", ip_options=options)
    assert packets.parse(frame).ip_header_len == IP_HLEN + len(options)
    result = run(dp, frame)
    backend = assert_dnat(result, BACKENDS, tcp_to_backend(48000, "S", b"data", ip_options=options))
    out = packets.parse(result.data)
    assert (out.src, out.sport, out.dst, out.dport, out.payload) == (
        CLIENT,
        48000,
        backend,
        TCP_TARGET,
        b"data",
    )
    assert result.data[ETH_HLEN + IP_HLEN : ETH_HLEN + IP_HLEN + len(options)] == options

    frame = packets.ipv4_udp(CLIENT, VIP, 48001, UDP_PORT, b"dgram", ip_options=options)
    result = run(dp, frame)
    out = checked(result)
    assert (out.dst, out.sport, out.dport) in {(b, 48001, UDP_TARGET) for b in BACKENDS}


# ---------------------------------------------------------------------- 8: no backends


def test_service_without_backends_rejects_new_flows(clean_datapath: BpfDatapath) -> None:
    """kube-proxy's REJECT: a TCP reset, an ICMP port unreachable, back where it came from."""
    dp = clean_datapath
    key = tcp_service(dp)
    dp.table.upsert(frontend(key, (), TCP_TARGET))
    ukey = udp_service(dp)
    dp.table.upsert(frontend(ukey, (), UDP_TARGET))
    before = stats(dp)

    syn_in = packets.ipv4_tcp(CLIENT, VIP, 49000, TCP_PORT, "S", b"early data", seq=7000)
    rst = libbpf.prog_test_run(dp.prog_fd, syn_in)
    assert rst.retval == TC_ACT_REDIRECT  # out of the interface it came in on
    out, sent = packets.parse(rst.data), packets.parse(syn_in)
    assert (out.src, out.dst, out.sport, out.dport) == (VIP, CLIENT, TCP_PORT, 49000)
    assert (out.src_mac, out.dst_mac) == (sent.dst_mac, sent.src_mac)
    # no ACK on the SYN: RST|ACK acknowledging the SYN and its data (RFC 9293)
    assert out.flags == "RA" and out.seq == 0 and out.ack == 7000 + 1 + len(b"early data")
    assert out.payload == b"" and out.ip_csum_ok and out.l4_csum_ok is True

    dgram = packets.ipv4_udp(CLIENT, VIP, 49002, UDP_PORT, b"query")
    icmp = libbpf.prog_test_run(dp.prog_fd, dgram)
    assert icmp.retval == TC_ACT_REDIRECT
    out = packets.parse(icmp.data)
    assert (out.src, out.dst, out.proto) == (VIP, CLIENT, packets.IPPROTO_ICMP)
    assert (out.icmp_type, out.icmp_code) == (3, 3)
    # it quotes the datagram's IP header and first 8 bytes, as RFC 792 asks
    assert out.payload == dgram[14 : 14 + 28]
    assert out.ip_csum_ok and out.l4_csum_ok is True

    # a later segment of a flow, or a reset, is dropped, never answered
    for frame in (
        packets.ipv4_tcp(CLIENT, VIP, 49001, TCP_PORT, "A"),
        packets.ipv4_tcp(CLIENT, VIP, 49001, TCP_PORT, "R"),
    ):
        assert run(dp, frame).retval == TC_ACT_SHOT
    assert stat_delta(before, stats(dp)) == {STAT_REJECT: 2, STAT_DROP_NO_BACKEND: 2}
    assert ct_entries(dp) == []
    # Backends again: the service balances again.
    dp.table.upsert(frontend(key, BACKENDS, TCP_TARGET))
    syn(dp, 49003)


# ---------------------------------------------------------------------- 9: backend removal


def test_removed_backend_keeps_established_flow_but_gets_no_new_ones(
    clean_datapath: BpfDatapath,
) -> None:
    dp = clean_datapath
    key = tcp_service(dp)
    sport = 50000
    removed = syn(dp, sport)
    live = tuple(b for b in BACKENDS if b != removed)
    dp.table.upsert(frontend(key, live, TCP_TARGET))
    assert (ip(removed), TCP_TARGET, Protocol.TCP) not in dp.table.backends

    before = stats(dp)
    for n in range(20):
        kw: dict[str, Any] = {"seq": 1001 + n, "ack": 5001}
        result = run(dp, packets.ipv4_tcp(CLIENT, VIP, sport, TCP_PORT, "A", **kw))
        assert assert_dnat(result, [removed], tcp_to_backend(sport, "A", **kw)) == removed
    assert stats(dp)[STAT_DNAT_EST] - before[STAT_DNAT_EST] == 20
    # Its replies are still reverse-NATed.
    out = checked(run(dp, reply_frame(removed, sport, "A")))
    assert (out.src, out.sport) == (VIP, TCP_PORT)

    chosen = [syn(dp, p) for p in range(50100, 50160)]
    assert removed not in chosen
    assert set(chosen) == set(live)


# ---------------------------------------------------------------------- 10: frontend removal


def test_removed_frontend_passes_new_syns(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    key = tcp_service(dp)
    syn(dp, 51000)
    dp.table.remove(key)
    for sport in range(51001, 51011):
        assert_passes_unchanged(dp, packets.ipv4_tcp(CLIENT, VIP, sport, TCP_PORT, "S"))
    assert len(ct_entries(dp)) == 2  # only the flow from before the removal


# ---------------------------------------------------------------------- 11: tuple reuse


def test_syn_reusing_tuple_of_removed_backend_picks_live_backend(
    clean_datapath: BpfDatapath,
) -> None:
    dp = clean_datapath
    key = tcp_service(dp)
    sport = 52000
    removed = syn(dp, sport)
    live = tuple(b for b in BACKENDS if b != removed)
    dp.table.upsert(frontend(key, live, TCP_TARGET))

    before = stats(dp)
    result = run(dp, packets.ipv4_tcp(CLIENT, VIP, sport, TCP_PORT, "S", seq=777))
    chosen = assert_dnat(result, live, tcp_to_backend(sport, "S", seq=777))
    assert stat_delta(before, stats(dp)) == forward_stats([result], {STAT_DNAT_NEW: 1})
    fwd = dp.maps.ct4.lookup(
        ct_key(CLIENT, VIP, sport, TCP_PORT, packets.IPPROTO_TCP, CT_DIR_FORWARD)
    )
    assert fwd is not None and layout.ip4_str(fwd.nat_addr) == chosen
    # The flow now belongs to the new backend: its packets and replies follow it.
    result = run(dp, packets.ipv4_tcp(CLIENT, VIP, sport, TCP_PORT, "A", seq=778))
    assert assert_dnat(result, live, tcp_to_backend(sport, "A", seq=778)) == chosen
    out = checked(run(dp, reply_frame(chosen, sport)))
    assert (out.src, out.sport) == (VIP, TCP_PORT)
    assert_passes_unchanged(dp, reply_frame(removed, sport))


def test_syn_retransmit_keeps_its_live_backend(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    tcp_service(dp)
    sport = 52100
    backend = syn(dp, sport)
    before = stats(dp)
    assert all(syn(dp, sport) == backend for _ in range(20))
    # A SYN on a known tuple may be a retransmit or a new connection reusing the
    # port; either way it keeps a live backend and starts from fresh entries.
    assert stat_delta(before, stats(dp)).get(STAT_DNAT_NEW) == 20


def test_syn_reusing_tuple_of_removed_backend_shared_with_another_service(
    clean_datapath: BpfDatapath,
) -> None:
    dp = clean_datapath
    key = tcp_service(dp)
    other = tcp_key(OTHER_IP)
    dp.table.upsert(frontend(other, BACKENDS, TCP_TARGET, name="web-alias"))
    sport = 52200
    removed = syn(dp, sport)
    live = tuple(b for b in BACKENDS if b != removed)
    dp.table.upsert(frontend(key, live, TCP_TARGET))
    # The backend entry stays: the other service still balances to it.
    assert (ip(removed), TCP_TARGET, Protocol.TCP) in dp.table.backends

    for n in range(30):
        frame = packets.ipv4_tcp(CLIENT, VIP, sport, TCP_PORT, "S", seq=900 + n)
        result = run(dp, frame)
        got = assert_dnat(result, BACKENDS, tcp_to_backend(sport, "S", seq=900 + n))
        assert got != removed, f"SYN {n} reusing the tuple went to removed backend {removed}"


# ---------------------------------------------------------------------- expiry


def age_flow(dp: BpfDatapath, backend: str, sport: int, seconds: int) -> None:
    """Pretend both ct4 entries of a TCP flow were last seen `seconds` ago.

    bpf_ktime_get_ns() and time.monotonic_ns() read the same clock (CLOCK_MONOTONIC).
    """
    tcp = packets.IPPROTO_TCP
    then = time.monotonic_ns() - seconds * 1_000_000_000
    for key in (
        ct_key(CLIENT, VIP, sport, TCP_PORT, tcp, CT_DIR_FORWARD),
        ct_key(backend, CLIENT, TCP_TARGET, sport, tcp, CT_DIR_REVERSE),
    ):
        value = dp.maps.ct4.lookup(key)
        assert value is not None
        value.created_ns = value.last_seen_ns = then
        dp.maps.ct4.update(key, value)


def test_unanswered_flow_expires_and_is_balanced_again(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    tcp_service(dp)
    sport = 55000
    backend = syn(dp, sport)
    age_flow(dp, backend, sport, 30)  # within the 60 s SYN timeout: the same backend
    before = stats(dp)
    assert syn(dp, sport) == backend
    assert stat_delta(before, stats(dp)).get(STAT_DNAT_NEW) == 1

    age_flow(dp, backend, sport, 120)  # no reply for 2 minutes: the flow is gone
    before = stats(dp)
    syn(dp, sport)
    assert stat_delta(before, stats(dp)).get(STAT_DNAT_NEW) == 1
    fwd = dp.maps.ct4.lookup(
        ct_key(CLIENT, VIP, sport, TCP_PORT, packets.IPPROTO_TCP, CT_DIR_FORWARD)
    )
    assert fwd is not None and time.monotonic_ns() - fwd.created_ns < 10_000_000_000


def test_idle_established_flow_still_reverse_nats_replies(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    tcp_service(dp)
    sport = 55100
    backend = syn(dp, sport)
    checked(run(dp, reply_frame(backend, sport, "SA")))  # established: a reply was seen
    age_flow(dp, backend, sport, 120)  # idle for 2 minutes, far below the TCP timeout

    before = stats(dp)
    result = run(dp, packets.ipv4_tcp(CLIENT, VIP, sport, TCP_PORT, "PA", b"query", seq=1001))
    assert checked(result).dst == backend
    assert stat_delta(before, stats(dp)).get(STAT_DNAT_EST) == 1
    result = run(dp, reply_frame(backend, sport, "PA", payload=b"answer"))
    out = packets.parse(result.data)
    assert (out.src, out.sport) == (VIP, TCP_PORT), (
        f"the reply of an established flow left with source {out.src}:{out.sport}"
    )


# ---------------------------------------------------------------------- 12: TTL


def test_ttl_follows_the_verdict(clean_datapath: BpfDatapath) -> None:
    dp = clean_datapath
    tcp_service(dp)
    for sport, ttl in [(53000, 64), (53001, 2), (53002, 255)]:
        before = stats(dp)
        result = run(dp, packets.ipv4_tcp(CLIENT, VIP, sport, TCP_PORT, "S", ttl=ttl))
        out = checked(result)
        if result.retval == TC_ACT_REDIRECT:
            assert out.ttl == ttl - 1, "a redirected packet must have its TTL decremented"
            assert stat_delta(before, stats(dp)).get(STAT_REDIRECT) == 1
        else:
            assert result.retval == TC_ACT_OK
            assert out.ttl == ttl, "the stack decrements the TTL of a TC_ACT_OK packet"
            assert STAT_REDIRECT not in stat_delta(before, stats(dp))
        assert out.dst in BACKENDS

    # TTL 1 is never redirected (the stack must send time-exceeded), but is still DNATed.
    result = run(dp, packets.ipv4_tcp(CLIENT, VIP, 53003, TCP_PORT, "S", ttl=1))
    assert result.retval == TC_ACT_OK
    out = checked(result)
    assert (out.ttl, out.dport) == (1, TCP_TARGET) and out.dst in BACKENDS
