"""Random, hostile and mutated Ethernet frames for the packet fuzzing suite.

Everything comes from one `random.Random`, so a seed names a run.  The world the
frames are aimed at (tests/test_reliability_packets.py programs it): frontends
of several kinds, their backends, the node's masquerade address, clients
inside and outside the cluster, and the balanced flows opened before fuzzing
(`Flow`), whose packets, replies and ICMP errors are the valid templates that
mutations start from.
"""

from __future__ import annotations

import dataclasses
import random
import struct
from collections.abc import Callable, Iterator

from tests import packets

ETH = packets.ETH_HLEN
Tuple = tuple[str, int, int]  # (address, port, IP protocol)


@dataclasses.dataclass(frozen=True)
class Flow:
    """A balanced flow as the program translated its first packet."""

    proto: int
    client: str
    cport: int
    vip: str
    vport: int
    backend: str
    bport: int
    src: str  # the client's address as the backend sees it (the node's, if masqueraded)
    sport: int


def ip_checksum_fixed(frame: bytearray) -> None:
    """Recompute the IPv4 header checksum (and TCP/UDP/ICMP ones where they fit)."""
    if len(frame) < ETH + 20 or frame[12:14] != b"\x08\x00":
        return
    ihl = (frame[ETH] & 0x0F) * 4
    if ihl < 20 or len(frame) < ETH + ihl:
        return
    frame[ETH + 10 : ETH + 12] = b"\0\0"
    frame[ETH + 10 : ETH + 12] = struct.pack("!H", packets.checksum(bytes(frame[ETH : ETH + ihl])))
    total = struct.unpack("!H", frame[ETH + 2 : ETH + 4])[0]
    proto, l4 = frame[ETH + 9], ETH + ihl
    end = ETH + total
    frag = struct.unpack("!H", frame[ETH + 6 : ETH + 8])[0] & 0x3FFF
    if frag or end > len(frame) or end < l4:
        return
    segment = frame[l4:end]
    where = {packets.IPPROTO_TCP: 16, packets.IPPROTO_UDP: 6, packets.IPPROTO_ICMP: 2}.get(proto)
    if where is None or len(segment) < where + 2:
        return
    segment[where : where + 2] = b"\0\0"
    if proto == packets.IPPROTO_ICMP:
        csum = packets.checksum(bytes(segment))
    else:
        pseudo = bytes(frame[ETH + 12 : ETH + 20]) + struct.pack("!BBH", 0, proto, len(segment))
        csum = packets.checksum(pseudo + bytes(segment))
        if proto == packets.IPPROTO_UDP and csum == 0:
            csum = 0xFFFF
    frame[l4 + where : l4 + where + 2] = struct.pack("!H", csum)


class Generator:
    """Frames of every family, each with the name of how it was made."""

    def __init__(
        self,
        rng: random.Random,
        frontends: list[Tuple],
        backends: list[Tuple],
        clients: list[str],
        flows: list[Flow],
        node: str,
    ) -> None:
        self.rng = rng
        self.frontends = frontends
        self.backends = backends
        self.clients = clients
        self.flows = flows
        self.node = node
        self.families: list[tuple[str, Callable[[], bytes]]] = [
            ("random bytes", self.random_bytes),
            ("valid frame of the world", self.template),
            ("mutated valid frame", self.mutated),
            ("mutated valid frame, checksums fixed", self.mutated_fixed),
            ("truncated valid frame", self.truncated),
            ("bad IHL", self.bad_ihl),
            ("IP options", self.ip_options),
            ("fragment", self.fragment),
            ("TCP flags", self.tcp_flags),
            ("bad lengths", self.bad_lengths),
            ("ICMP error quoting garbage", self.icmp_garbage),
            ("ICMP error about a flow, mutated", self.icmp_mutated),
            ("other ethertype or protocol", self.other_protocol),
        ]

    def every_flag_combination(self) -> Iterator[tuple[str, bytes]]:
        """All 256 TCP flag bytes on a new flow, a flow's packet and its reply."""
        rng = self.rng
        tcp = [f for f in self.frontends if f[2] == packets.IPPROTO_TCP]
        flows = [f for f in self.flows if f.proto == packets.IPPROTO_TCP]
        for bits in range(256):
            flags = packets.tcp_flag_letters(bits)
            address, port, _ = rng.choice(tcp)
            client = rng.choice(self.clients)
            yield "TCP flags, all 256", packets.ipv4_tcp(client, address, self._port(), port, flags)
            flow = rng.choice(flows)
            yield (
                "TCP flags, all 256",
                packets.ipv4_tcp(flow.client, flow.vip, flow.cport, flow.vport, flags),
            )
            yield (
                "TCP flags, all 256",
                packets.ipv4_tcp(flow.backend, flow.src, flow.bport, flow.sport, flags),
            )

    def next(self) -> tuple[str, bytes]:
        name, make = self.rng.choice(self.families)
        return name, make()

    # -- valid templates ------------------------------------------------------------------

    def _port(self) -> int:
        return self.rng.randint(1024, 65535)

    def _l4(self, proto: int, src: str, dst: str, sport: int, dport: int) -> bytes:
        rng = self.rng
        if proto == packets.IPPROTO_TCP:
            flags = rng.choice(["S", "A", "PA", "FA", "R", "SA", "RA"])
            payload = b"x" * rng.randint(0, 40)
            return packets.ipv4_tcp(src, dst, sport, dport, flags, payload)
        return packets.ipv4_udp(src, dst, sport, dport, b"q" * rng.randint(0, 40))

    def template(self) -> bytes:
        """A valid frame this world sees: a new flow, a packet or reply of an open
        flow, an ICMP error about one, a client straight to a backend, or traffic
        that is nobody's business here."""
        rng = self.rng
        kind = rng.randrange(7)
        if kind == 0 or not self.flows:
            address, port, proto = rng.choice(self.frontends)
            return self._l4(proto, rng.choice(self.clients), address, self._port(), port)
        flow = rng.choice(self.flows)
        if kind == 1:
            return self._l4(flow.proto, flow.client, flow.vip, flow.cport, flow.vport)
        if kind == 2:  # the backend's reply, before reverse NAT
            return self._l4(flow.proto, flow.backend, flow.src, flow.bport, flow.sport)
        if kind == 3:  # an error about the forward packet, from a router or the backend
            about = self._l4(flow.proto, flow.src, flow.backend, flow.sport, flow.bport)
            sender = rng.choice([flow.backend, "10.244.0.1"])
            return packets.ipv4_icmp_error(sender, flow.src, about, *rng.choice(ICMP_ERRORS))
        if kind == 4:  # an error about the reply, from the client's side
            about = self._l4(flow.proto, flow.vip, flow.client, flow.vport, flow.cport)
            return packets.ipv4_icmp_error(flow.client, flow.vip, about, *rng.choice(ICMP_ERRORS))
        if kind == 5:  # straight to a backend, not through its Service
            backend, port, proto = rng.choice(self.backends)
            return self._l4(proto, rng.choice(self.clients), backend, self._port(), port)
        proto = rng.choice([packets.IPPROTO_TCP, packets.IPPROTO_UDP])
        return self._l4(proto, rng.choice(self.clients), "10.96.9.9", self._port(), 80)

    # -- families ---------------------------------------------------------------------

    def random_bytes(self) -> bytes:
        rng = self.rng
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 128)))
        if rng.random() < 0.5 and len(raw) >= ETH:  # IPv4 on the outside, garbage inside
            raw = raw[:12] + b"\x08\x00" + raw[14:]
        return raw

    def mutated(self) -> bytes:
        frame = bytearray(self.template())
        for _ in range(self.rng.randint(1, 4)):
            at = self.rng.randrange(len(frame))
            if self.rng.random() < 0.5:
                frame[at] ^= 1 << self.rng.randrange(8)
            else:
                frame[at] = self.rng.randrange(256)
        return bytes(frame)

    def mutated_fixed(self) -> bytes:
        """Mutated, then made consistent again: the damage reaches past the checksums."""
        frame = bytearray(self.mutated())
        ip_checksum_fixed(frame)
        return bytes(frame)

    def truncated(self) -> bytes:
        frame = self.template()
        return frame[: self.rng.randint(0, len(frame) - 1)]

    def bad_ihl(self) -> bytes:
        frame = bytearray(self.template())
        ihl = self.rng.choice([0, 1, 4, 6, 7, 15])
        frame[ETH] = 0x40 | ihl
        if self.rng.random() < 0.5:
            ip_checksum_fixed(frame)
        return bytes(frame)

    def ip_options(self) -> bytes:
        rng = self.rng
        options = rng.choice(
            [
                b"\x01" * rng.choice([4, 8, 40]),  # NOPs
                b"\x00\x00\x00\x00",  # end of options
                b"\x94\x04\x00\x00",  # router alert
                bytes(rng.randrange(256) for _ in range(4 * rng.randint(1, 10))),
            ]
        )
        address, port, proto = rng.choice(self.frontends)
        client = rng.choice(self.clients)
        if proto == packets.IPPROTO_TCP:
            return packets.ipv4_tcp(client, address, self._port(), port, "S", ip_options=options)
        return packets.ipv4_udp(client, address, self._port(), port, b"q", ip_options=options)

    def fragment(self) -> bytes:
        rng = self.rng
        address, port, proto = rng.choice(self.frontends)
        offset = rng.choice([0, 8, 1480, 8 * rng.randint(1, 8000)])
        more = offset == 0 or rng.random() < 0.5
        body = b"f" * rng.randint(0, 64)
        client = rng.choice(self.clients)
        if proto == packets.IPPROTO_TCP:
            return packets.ipv4_tcp(client, address, self._port(), port, "S", body,
                                    frag_off=offset, more_fragments=more)  # fmt: skip
        return packets.ipv4_udp(client, address, self._port(), port, body, frag_off=offset,
                                more_fragments=more)  # fmt: skip

    def tcp_flags(self) -> bytes:
        rng = self.rng
        flags = "".join(f for f in packets.TCP_FLAGS if rng.random() < 0.4)
        tcp = [f for f in self.frontends if f[2] == packets.IPPROTO_TCP]
        tcp_flows = [f for f in self.flows if f.proto == packets.IPPROTO_TCP]
        if tcp_flows and rng.random() < 0.5:
            flow = rng.choice(tcp_flows)
            if rng.random() < 0.5:
                return packets.ipv4_tcp(flow.client, flow.vip, flow.cport, flow.vport, flags)
            return packets.ipv4_tcp(flow.backend, flow.src, flow.bport, flow.sport, flags)
        address, port, _ = rng.choice(tcp)
        return packets.ipv4_tcp(rng.choice(self.clients), address, self._port(), port, flags)

    def bad_lengths(self) -> bytes:
        frame = bytearray(self.template())
        rng = self.rng
        field = rng.choice(["tot_len", "udp_len", "doff", "trailer"])
        if field == "tot_len":
            frame[ETH + 2 : ETH + 4] = struct.pack("!H", rng.choice([0, 1, 20, 21, 0xFFFF]))
        elif field == "udp_len" and frame[ETH + 9] == packets.IPPROTO_UDP:
            frame[ETH + 24 : ETH + 26] = struct.pack("!H", rng.choice([0, 1, 7, 0xFFFF]))
        elif field == "doff" and frame[ETH + 9] == packets.IPPROTO_TCP:
            frame[ETH + 32] = rng.choice([0, 1, 4, 15]) << 4
        else:
            frame += bytes(rng.randrange(256) for _ in range(rng.randint(1, 60)))
        if rng.random() < 0.5:
            ip_checksum_fixed(frame)
        return bytes(frame)

    def icmp_garbage(self) -> bytes:
        rng = self.rng
        quote = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
        if rng.random() < 0.5 and len(quote) >= 20:  # a plausible IPv4 header, then junk
            quote = bytes([0x45]) + quote[1:9] + bytes([rng.choice([6, 17])]) + quote[10:]
        icmp_type, code = rng.choice(ICMP_ERRORS)
        message = struct.pack("!BBHI", icmp_type, code, 0, 0) + quote
        message = message[:2] + struct.pack("!H", packets.checksum(message)) + message[4:]
        frame = bytearray(packets.ipv4_icmp_echo(rng.choice(self.clients), self.node, payload=b""))
        frame[ETH + 2 : ETH + 4] = struct.pack("!H", 20 + len(message))
        frame = frame[: ETH + 20] + message
        ip_checksum_fixed(frame)
        return bytes(frame)

    def icmp_mutated(self) -> bytes:
        """An ICMP error about a flow whose quote is damaged (checksums made right)."""
        for _ in range(10):
            frame = bytearray(self.template())
            if frame[ETH + 9] == packets.IPPROTO_ICMP:
                break
        else:
            return self.icmp_garbage()
        rng = self.rng
        quote = ETH + 20 + 8
        for _ in range(rng.randint(1, 3)):
            at = quote + rng.randrange(len(frame) - quote)
            frame[at] = rng.randrange(256)
        if rng.random() < 0.3:  # a quoted fragment
            frame[quote + 6] |= 0x20
        ip_checksum_fixed(frame)
        return bytes(frame)

    def other_protocol(self) -> bytes:
        rng = self.rng
        address, port, proto = rng.choice(self.frontends)
        client = rng.choice(self.clients)
        kind = rng.randrange(5)
        if kind == 0:
            return packets.arp_request(client, address)
        if kind == 1:
            return packets.ipv6_udp("fd00::1", "fd00::2", self._port(), port, b"v6")
        if kind == 2:  # ping a frontend
            return packets.ipv4_icmp_echo(client, address)
        if kind == 3:  # IPv4 in a VLAN tag
            inner = self._l4(proto, client, address, self._port(), port)
            return inner[:12] + b"\x81\x00\x00\x07" + inner[12:]
        frame = bytearray(self._l4(proto, client, address, self._port(), port))
        frame[ETH + 9] = rng.choice([0, 2, 4, 41, 47, 50, 132, 255])  # GRE, SCTP...
        ip_checksum_fixed(frame)
        return bytes(frame)


ICMP_ERRORS = [(3, 4), (3, 3), (3, 1), (11, 0), (12, 0)]  # frag needed, port, host, TTL, param
