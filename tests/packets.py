"""Build and inspect raw Ethernet frames for BPF_PROG_TEST_RUN tests (no scapy).

Builders return complete frames (Ethernet header included, no trailer padding) with
correct checksums unless asked otherwise; :func:`parse` decodes a frame and verifies
the IPv4 header checksum and the TCP/UDP/ICMP checksum.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD

IPPROTO_ICMP = 1
ETH_HLEN = 14
IPPROTO_TCP = 6
IPPROTO_UDP = 17

SRC_MAC = "02:00:00:00:00:01"
DST_MAC = "02:00:00:00:00:02"
BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"

IP_DF = 0x4000
IP_MF = 0x2000
IP_OFFMASK = 0x1FFF

# Canonical letter order; parse() renders flags in this order ("SA", "PA", "FA", "RA").
TCP_FLAGS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20, "E": 0x40, "C": 0x80}

_ETH = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_ICMP_ECHO = struct.Struct("!BBHHH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")


# ------------------------------------------------------------------------------- helpers


def checksum(data: bytes) -> int:
    """Internet checksum (RFC 1071) of ``data``: one's complement of the one's complement sum."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    """``"aa:bb:cc:dd:ee:ff"`` -> 6 bytes."""
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return raw


def mac_str(raw: bytes) -> str:
    """6 bytes -> ``"aa:bb:cc:dd:ee:ff"``."""
    return ":".join(f"{b:02x}" for b in raw)


def tcp_flag_bits(flags: str) -> int:
    """``"SA"`` -> 0x12; letters F S R P A U E C, any order."""
    bits = 0
    for letter in flags.upper():
        if letter not in TCP_FLAGS:
            raise ValueError(f"unknown TCP flag {letter!r} in {flags!r}")
        bits |= TCP_FLAGS[letter]
    return bits


def tcp_flag_letters(bits: int) -> str:
    """0x12 -> ``"SA"`` (canonical order F S R P A U E C)."""
    return "".join(letter for letter, bit in TCP_FLAGS.items() if bits & bit)


def _v4(addr: str) -> bytes:
    return ipaddress.IPv4Address(addr).packed


def _v6(addr: str) -> bytes:
    return ipaddress.IPv6Address(addr).packed


def _eth(dst_mac: str, src_mac: str, ethertype: int) -> bytes:
    return _ETH.pack(mac_bytes(dst_mac), mac_bytes(src_mac), ethertype)


def _pseudo_v4(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, proto, length)


def _pseudo_v6(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + struct.pack("!IxxxB", length, proto)


def _ipv4(
    src: str,
    dst: str,
    proto: int,
    body: bytes,
    *,
    ttl: int,
    ident: int,
    options: bytes,
    frag_off: int,
    more_fragments: bool,
    dont_fragment: bool,
    csum_ok: bool,
) -> bytes:
    if len(options) % 4:
        options += b"\x00" * (4 - len(options) % 4)  # pad with End-of-Options-List
    if len(options) > 40:
        raise ValueError("IPv4 options are limited to 40 bytes")
    if frag_off % 8 or not 0 <= frag_off // 8 <= IP_OFFMASK:
        raise ValueError(f"frag_off is a byte offset and must be a multiple of 8, got {frag_off}")
    ihl = 5 + len(options) // 4
    frag = (frag_off // 8) | (IP_MF if more_fragments else 0) | (IP_DF if dont_fragment else 0)
    total = ihl * 4 + len(body)
    header = _IPV4.pack(0x40 | ihl, 0, total, ident, frag, ttl, proto, 0, _v4(src), _v4(dst))
    csum = checksum(header + options)
    if not csum_ok:
        csum ^= 0x5A5A
    return header[:10] + struct.pack("!H", csum) + header[12:] + options + body


def _l4_csum(pseudo: bytes, segment: bytes, offset: int, *, udp: bool, ok: bool) -> bytes:
    """Fill the checksum at ``offset`` of ``segment`` (whose checksum field is zero)."""
    csum = checksum(pseudo + segment)
    if udp and csum == 0:
        csum = 0xFFFF  # 0 means "no checksum" for UDP
    if not ok:
        csum ^= 0x5A5A
    return segment[:offset] + struct.pack("!H", csum) + segment[offset + 2 :]


# ------------------------------------------------------------------------------ builders


def ipv4_tcp(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    flags: str = "S",
    payload: bytes = b"",
    *,
    seq: int = 1000,
    ack: int = 0,
    window: int = 65535,
    tcp_options: bytes = b"",
    ttl: int = 64,
    ident: int = 1,
    ip_options: bytes = b"",
    frag_off: int = 0,
    more_fragments: bool = False,
    dont_fragment: bool = True,
    csum_ok: bool = True,
    ip_csum_ok: bool = True,
    src_mac: str = SRC_MAC,
    dst_mac: str = DST_MAC,
) -> bytes:
    """Ethernet + IPv4 + TCP frame with correct IPv4 and TCP (pseudo-header) checksums.

    ``flags`` are letters such as "S", "SA", "A", "PA", "F", "R".  ``csum_ok=False``
    corrupts the TCP checksum, ``ip_csum_ok=False`` the IPv4 header checksum.
    ``frag_off`` is the fragment offset in bytes (multiple of 8); a non-first fragment
    (``frag_off > 0``) carries only ``payload`` and no TCP header, as on the wire.
    """
    s, d = _v4(src), _v4(dst)
    if frag_off:
        body = payload
    else:
        if len(tcp_options) % 4:
            tcp_options += b"\x00" * (4 - len(tcp_options) % 4)
        offset = (5 + len(tcp_options) // 4) << 4
        header = _TCP.pack(sport, dport, seq, ack, offset, tcp_flag_bits(flags), window, 0, 0)
        segment = header + tcp_options + payload
        pseudo = _pseudo_v4(s, d, IPPROTO_TCP, len(segment))
        body = _l4_csum(pseudo, segment, 16, udp=False, ok=csum_ok)
    ip = _ipv4(
        src,
        dst,
        IPPROTO_TCP,
        body,
        ttl=ttl,
        ident=ident,
        options=ip_options,
        frag_off=frag_off,
        more_fragments=more_fragments,
        dont_fragment=dont_fragment and not (frag_off or more_fragments),
        csum_ok=ip_csum_ok,
    )
    return _eth(dst_mac, src_mac, ETH_P_IP) + ip


def ipv4_udp(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    zero_checksum: bool = False,
    csum_ok: bool = True,
    ttl: int = 64,
    ident: int = 1,
    ip_options: bytes = b"",
    frag_off: int = 0,
    more_fragments: bool = False,
    ip_csum_ok: bool = True,
    src_mac: str = SRC_MAC,
    dst_mac: str = DST_MAC,
) -> bytes:
    """Ethernet + IPv4 + UDP frame with correct checksums.

    ``zero_checksum=True`` writes a UDP checksum of 0 ("no checksum", legal on IPv4);
    ``csum_ok=False`` writes a wrong one.  Fragments behave as in :func:`ipv4_tcp`.
    """
    s, d = _v4(src), _v4(dst)
    if frag_off:
        body = payload
    else:
        datagram = _UDP.pack(sport, dport, 8 + len(payload), 0) + payload
        if zero_checksum:
            body = datagram
        else:
            pseudo = _pseudo_v4(s, d, IPPROTO_UDP, len(datagram))
            body = _l4_csum(pseudo, datagram, 6, udp=True, ok=csum_ok)
    ip = _ipv4(
        src,
        dst,
        IPPROTO_UDP,
        body,
        ttl=ttl,
        ident=ident,
        options=ip_options,
        frag_off=frag_off,
        more_fragments=more_fragments,
        dont_fragment=False,
        csum_ok=ip_csum_ok,
    )
    return _eth(dst_mac, src_mac, ETH_P_IP) + ip


def ipv6_udp(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    hop_limit: int = 64,
    csum_ok: bool = True,
    src_mac: str = SRC_MAC,
    dst_mac: str = DST_MAC,
) -> bytes:
    """Ethernet + IPv6 + UDP frame with a correct checksum (mandatory on IPv6)."""
    s, d = _v6(src), _v6(dst)
    datagram = _UDP.pack(sport, dport, 8 + len(payload), 0) + payload
    body = _l4_csum(_pseudo_v6(s, d, IPPROTO_UDP, len(datagram)), datagram, 6, udp=True, ok=csum_ok)
    header = _IPV6.pack(6 << 28, len(body), IPPROTO_UDP, hop_limit, s, d)
    return _eth(dst_mac, src_mac, ETH_P_IPV6) + header + body


def arp_request(
    sender_ip: str,
    target_ip: str,
    *,
    sender_mac: str = SRC_MAC,
) -> bytes:
    """Broadcast Ethernet ARP "who-has ``target_ip`` tell ``sender_ip``" request."""
    arp = _ARP.pack(
        1,  # hardware type Ethernet
        ETH_P_IP,
        6,
        4,
        1,  # op: request
        mac_bytes(sender_mac),
        _v4(sender_ip),
        bytes(6),
        _v4(target_ip),
    )
    return _eth(BROADCAST_MAC, sender_mac, ETH_P_ARP) + arp


def ipv4_icmp_echo(
    src: str,
    dst: str,
    ident: int = 1,
    seq: int = 1,
    payload: bytes = b"ping",
    *,
    reply: bool = False,
    ttl: int = 64,
    src_mac: str = SRC_MAC,
    dst_mac: str = DST_MAC,
) -> bytes:
    """Ethernet + IPv4 + ICMP echo request (or reply with ``reply=True``)."""
    icmp_type = 0 if reply else 8
    message = _ICMP_ECHO.pack(icmp_type, 0, 0, ident, seq) + payload
    message = message[:2] + struct.pack("!H", checksum(message)) + message[4:]
    ip = _ipv4(
        src,
        dst,
        IPPROTO_ICMP,
        message,
        ttl=ttl,
        ident=ident,
        options=b"",
        frag_off=0,
        more_fragments=False,
        dont_fragment=False,
        csum_ok=True,
    )
    return _eth(dst_mac, src_mac, ETH_P_IP) + ip


def ipv4_icmp_error(
    src: str,
    dst: str,
    about: bytes,
    icmp_type: int = 3,
    code: int = 4,
    mtu: int = 1400,
    *,
    ttl: int = 64,
    src_mac: str = SRC_MAC,
    dst_mac: str = DST_MAC,
) -> bytes:
    """Ethernet + IPv4 + an ICMP error about the Ethernet frame ``about``,
    quoting its IP header and first 8 bytes of payload (RFC 792); by default
    "fragmentation needed" with the next hop's MTU (RFC 1191)."""
    ihl = (about[ETH_HLEN] & 0x0F) * 4
    quote = about[ETH_HLEN : ETH_HLEN + ihl + 8]
    message = struct.pack("!BBHHH", icmp_type, code, 0, 0, mtu) + quote
    message = message[:2] + struct.pack("!H", checksum(message)) + message[4:]
    ip = _ipv4(
        src,
        dst,
        IPPROTO_ICMP,
        message,
        ttl=ttl,
        ident=1,
        options=b"",
        frag_off=0,
        more_fragments=False,
        dont_fragment=False,
        csum_ok=True,
    )
    return _eth(dst_mac, src_mac, ETH_P_IP) + ip


def truncate(frame: bytes, length: int) -> bytes:
    """The first ``length`` bytes of ``frame`` (headers keep claiming the full length)."""
    if not 0 <= length <= len(frame):
        raise ValueError(f"length {length} outside 0..{len(frame)}")
    return frame[:length]


# ------------------------------------------------------------------------------- parsing


@dataclass
class Parsed:
    """Decoded view of a frame; fields a frame does not have stay ``None``/empty.

    ``ip_csum_ok`` is True for IPv6 (no header checksum).  ``l4_csum_ok`` is None when
    the L4 checksum cannot be checked (fragment, truncated frame, other protocol);
    a UDP checksum of 0 on IPv4 counts as ok and sets ``udp_csum_zero``.
    For ARP, ``src``/``dst`` are the sender/target protocol addresses.
    """

    ethertype: int
    src_mac: str
    dst_mac: str
    src: str | None = None
    dst: str | None = None
    proto: int | None = None
    ttl: int | None = None
    ip_header_len: int = 0
    ip_total_len: int = 0
    ip_id: int = 0
    frag_off: int = 0  # in bytes
    more_fragments: bool = False
    dont_fragment: bool = False
    sport: int | None = None
    dport: int | None = None
    seq: int | None = None
    ack: int | None = None
    flags: str = ""  # TCP flag letters, e.g. "SA"
    icmp_type: int | None = None
    icmp_code: int | None = None
    arp_op: int | None = None
    payload: bytes = b""
    ip_csum_ok: bool = False
    l4_csum_ok: bool | None = None
    udp_csum_zero: bool = False
    truncated: bool = False

    @property
    def is_fragment(self) -> bool:
        """True for any IPv4 fragment (first, middle or last)."""
        return self.more_fragments or self.frag_off > 0


def parse(frame: bytes) -> Parsed:
    """Decode an Ethernet frame (IPv4/IPv6 with TCP/UDP/ICMP, or ARP) and verify checksums."""
    if len(frame) < _ETH.size:
        raise ValueError(f"frame of {len(frame)} bytes is shorter than an Ethernet header")
    dst_mac, src_mac, ethertype = _ETH.unpack_from(frame)
    p = Parsed(ethertype=ethertype, src_mac=mac_str(src_mac), dst_mac=mac_str(dst_mac))
    rest = frame[_ETH.size :]
    if ethertype == ETH_P_IP:
        _parse_ipv4(p, rest)
    elif ethertype == ETH_P_IPV6:
        _parse_ipv6(p, rest)
    elif ethertype == ETH_P_ARP:
        _parse_arp(p, rest)
    else:
        p.payload = rest
    return p


def _parse_arp(p: Parsed, data: bytes) -> None:
    if len(data) < _ARP.size:
        p.truncated = True
        return
    _htype, _ptype, _hlen, _plen, op, _sha, spa, _tha, tpa = _ARP.unpack_from(data)
    p.arp_op = op
    p.src = str(ipaddress.IPv4Address(spa))
    p.dst = str(ipaddress.IPv4Address(tpa))


def _parse_ipv4(p: Parsed, data: bytes) -> None:
    if len(data) < _IPV4.size:
        p.truncated = True
        return
    ver_ihl, _tos, total, ident, frag, ttl, proto, _csum, src, dst = _IPV4.unpack_from(data)
    ihl = (ver_ihl & 0x0F) * 4
    p.src, p.dst = str(ipaddress.IPv4Address(src)), str(ipaddress.IPv4Address(dst))
    p.proto, p.ttl, p.ip_id = proto, ttl, ident
    p.ip_header_len, p.ip_total_len = ihl, total
    p.frag_off = (frag & IP_OFFMASK) * 8
    p.more_fragments = bool(frag & IP_MF)
    p.dont_fragment = bool(frag & IP_DF)
    if ver_ihl >> 4 != 4 or ihl < _IPV4.size or len(data) < ihl:
        p.truncated = len(data) < ihl
        return
    p.ip_csum_ok = checksum(data[:ihl]) == 0
    p.truncated = len(data) < total
    body = data[ihl:total]  # ignores Ethernet trailer padding
    if p.frag_off:
        p.payload = body  # no L4 header in non-first fragments
        return
    pseudo = _pseudo_v4(src, dst, proto, total - ihl)
    _parse_l4(p, body, pseudo, complete=not p.truncated and not p.more_fragments, v6=False)


def _parse_ipv6(p: Parsed, data: bytes) -> None:
    if len(data) < _IPV6.size:
        p.truncated = True
        return
    _vtcfl, plen, nxt, hop, src, dst = _IPV6.unpack_from(data)
    p.src, p.dst = str(ipaddress.IPv6Address(src)), str(ipaddress.IPv6Address(dst))
    p.proto, p.ttl, p.ip_csum_ok = nxt, hop, True
    p.ip_header_len, p.ip_total_len = _IPV6.size, _IPV6.size + plen
    p.truncated = len(data) < p.ip_total_len
    body = data[_IPV6.size : p.ip_total_len]
    pseudo = _pseudo_v6(src, dst, nxt, plen)
    _parse_l4(p, body, pseudo, complete=not p.truncated, v6=True)


def _parse_l4(p: Parsed, body: bytes, pseudo: bytes, *, complete: bool, v6: bool) -> None:
    """Fill ports/flags/payload; verify the checksum only over a complete segment."""
    if p.proto == IPPROTO_TCP and len(body) >= _TCP.size:
        sport, dport, seq, ack, offset, flags, _win, _csum, _urg = _TCP.unpack_from(body)
        p.sport, p.dport, p.seq, p.ack = sport, dport, seq, ack
        p.flags = tcp_flag_letters(flags)
        p.payload = body[(offset >> 4) * 4 :]
        if complete:
            p.l4_csum_ok = checksum(pseudo + body) == 0
    elif p.proto == IPPROTO_UDP and len(body) >= _UDP.size:
        p.sport, p.dport, _length, csum = _UDP.unpack_from(body)
        p.payload = body[_UDP.size :]
        p.udp_csum_zero = csum == 0
        if p.udp_csum_zero:
            p.l4_csum_ok = not v6  # "no checksum" is only legal on IPv4
        elif complete:
            p.l4_csum_ok = checksum(pseudo + body) == 0
    elif p.proto == IPPROTO_ICMP and not v6 and len(body) >= 4:
        p.icmp_type, p.icmp_code = body[0], body[1]
        p.payload = body[_ICMP_ECHO.size :] if len(body) >= _ICMP_ECHO.size else b""
        if complete:
            p.l4_csum_ok = checksum(body) == 0
    else:
        p.payload = body
        if p.proto in (IPPROTO_TCP, IPPROTO_UDP):
            p.truncated = True
