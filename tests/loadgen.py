"""Load for the reliability suites: new connections and long-lived sessions,
with every failure recorded, from threads in test namespaces.

- `NewFlows`: workers that each open a new TCP connection (one line each
  way, then a close: FIN mostly, RST every `rst_every`th) or send a UDP
  datagram from a fresh socket, as fast as `rate` allows.  A UDP flow gets
  `udp_tries` tries on its own socket before it counts as failed (a datagram
  may be lost without anything being wrong; a missing flow is).  Every
  success is kept as (start, end, pod) for the timing checks of rolling
  updates.
- `Sessions`: long-lived TCP connections and UDP "sessions" (a connected
  socket each), served by one selector thread that sends a line on every
  session every `interval` seconds.  A session is broken when an exchange
  gets no answer within `deadline`, the connection fails, or another pod
  answers than the one that answered first.

Everything is bounded: workers stop on `stop()` or at their own deadline.
A Python client manages a few hundred new connections a second here, which
is what these suites need (bench/loadgen.c is the fast one).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from typing import Any

from tests.netlab import NsLike, _ns

FULL = os.environ.get("LBCTL_RELIABILITY", "") == "full"


def scaled(short: float, full: float) -> float:
    """A duration or count: `short` in `make test`, `full` under `make bench`
    (LBCTL_RELIABILITY=full)."""
    return full if FULL else short


@dataclasses.dataclass
class Failure:
    at: float  # time.monotonic()
    what: str


@dataclasses.dataclass
class Served:
    start: float
    end: float
    pod: str


class NewFlows:
    """New connections (TCP) or flows (UDP) to ip:port from `where`."""

    def __init__(
        self,
        where: NsLike,
        ip: str,
        port: int,
        proto: str = "tcp",
        workers: int = 2,
        rate: float = 100.0,
        rst_every: int = 4,
        timeout: float = 10.0,
        udp_tries: int = 3,
        limit_s: float = 600.0,
    ) -> None:
        self.ns = _ns(where)
        self.target = (ip, port)
        self.proto = proto
        self.rate = rate
        self.rst_every = rst_every
        self.timeout = timeout
        self.udp_tries = udp_tries
        self.limit_s = limit_s
        self.ok = 0
        self.retried = 0  # UDP flows that needed more than one try
        self.failures: list[Failure] = []
        self.served: list[Served] = []
        self.pods: Counter[str] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, args=(n, workers), daemon=True)
            for n in range(workers)
        ]

    def start(self) -> NewFlows:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> NewFlows:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout * (self.udp_tries + 1) + 5)
        assert not any(t.is_alive() for t in self._threads), "load workers did not stop"
        return self

    @property
    def attempts(self) -> int:
        return self.ok + len(self.failures)

    def _work(self, n: int, workers: int) -> None:
        gap = workers / self.rate if self.rate > 0 else 0.0
        deadline = time.monotonic() + self.limit_s
        count = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            began = time.monotonic()
            count += 1
            tag = f"w{n}-{count}"
            try:
                pod = self._tcp(tag, count) if self.proto == "tcp" else self._udp(tag)
            except OSError as exc:
                with self._lock:
                    self.failures.append(Failure(began, f"{self.proto} {tag}: {_why(exc)}"))
            else:
                with self._lock:
                    self.ok += 1
                    self.pods[pod] += 1
                    self.served.append(Served(began, time.monotonic(), pod))
            rest = gap - (time.monotonic() - began)
            if rest > 0:
                self._stop.wait(rest)

    def _tcp(self, tag: str, count: int) -> str:
        sock = self.ns.open_socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.target)
            sock.sendall(f"{tag}\n".encode())
            buf = b""
            while b"\n" not in buf:
                data = sock.recv(4096)
                if not data:
                    raise ConnectionResetError(errno.ECONNRESET, "closed before the reply")
                buf += data
            if self.rst_every and count % self.rst_every == 0:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return _pod(buf, tag)
        finally:
            sock.close()

    def _udp(self, tag: str) -> str:
        with self.ns.open_socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(self.timeout / self.udp_tries)
            for attempt in range(self.udp_tries):
                sock.sendto(tag.encode(), self.target)
                try:
                    while True:  # a late answer to an earlier try is as good
                        data, source = sock.recvfrom(4096)
                        if source == self.target:
                            break
                except TimeoutError:
                    continue
                if attempt:
                    with self._lock:
                        self.retried += 1
                return _pod(data, tag.split()[0])
            raise TimeoutError(errno.ETIMEDOUT, f"no answer to {self.udp_tries} tries")


def _pod(raw: bytes, tag: str) -> str:
    parts = raw.decode(errors="replace").split()
    if len(parts) < 3 or parts[2] != tag:
        raise ConnectionError(errno.EPROTO, f"unexpected reply {raw!r}")
    return parts[0]


def _why(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out ({exc.strerror or exc})"
    return exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)


@dataclasses.dataclass
class _Session:
    name: str
    sock: socket.socket
    udp: bool
    pod: str = ""
    sent: int = 0
    answered: int = 0
    lost: int = 0  # UDP datagrams that got no answer (the session goes on)
    waiting_since: float = 0.0  # the first line sent since the last answer, 0: none
    buf: bytes = b""
    broken: str = ""


class Sessions:
    """Long-lived TCP and UDP sessions, one line each every `interval` s."""

    def __init__(self, interval: float = 0.1, deadline: float = 5.0) -> None:
        self.interval = interval
        self.deadline = deadline
        self.sessions: list[_Session] = []
        self._sel = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._draining = threading.Event()  # no more lines sent
        self.may_leave: set[str] = set()  # pods removed from the Service: UDP moves on
        self.moves = 0  # UDP sessions that moved from a removed pod
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def open(self, where: NsLike, ip: str, port: int, tcp: int = 0, udp: int = 0) -> None:
        """`tcp` connections and `udp` sessions to ip:port from `where`."""
        ns = _ns(where)
        for i in range(tcp + udp):
            kind = socket.SOCK_STREAM if i < tcp else socket.SOCK_DGRAM
            sock = ns.open_socket(socket.AF_INET, kind)
            sock.settimeout(self.deadline)
            sock.connect((ip, port))
            sock.setblocking(False)
            name = f"{'tcp' if i < tcp else 'udp'}-{ip}:{port}-{len(self.sessions)}"
            s = _Session(name, sock, udp=i >= tcp)
            self.sessions.append(s)
            self._sel.register(sock, selectors.EVENT_READ, s)

    def start(self) -> Sessions:
        self._thread.start()
        return self

    def wait_answered(self, timeout: float = 30.0) -> None:
        """Until every session has been answered once (knows its pod)."""
        deadline = time.monotonic() + timeout
        while any(not s.pod for s in self.sessions):
            assert time.monotonic() < deadline, [s.name for s in self.sessions if not s.pod]
            time.sleep(0.05)

    def stop(self, rst_every: int = 3) -> None:
        """Stop sending, wait (up to the deadline) for the answers in flight,
        then close the sessions (TCP with FIN, every `rst_every`th with RST)."""
        self._draining.set()
        until = time.monotonic() + self.deadline
        while time.monotonic() < until and any(
            s.waiting_since and not s.broken and not s.udp for s in self.sessions
        ):
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(self.deadline + 5)
        assert not self._thread.is_alive(), "the session thread did not stop"
        for n, s in enumerate(self.sessions):
            if s.waiting_since and not s.broken and not s.udp:
                s.broken = "no answer to the last line before the end"
            if not s.udp and rst_every and n % rst_every == 0:
                s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if self._registered(s):
                self._sel.unregister(s.sock)
            s.sock.close()
        self._sel.close()

    def _registered(self, s: _Session) -> bool:
        try:
            self._sel.get_key(s.sock)
        except KeyError:
            return False
        return True

    @property
    def broken(self) -> list[str]:
        return [f"{s.name} ({s.pod}): {s.broken}" for s in self.sessions if s.broken]

    @property
    def exchanges(self) -> int:
        return sum(s.answered for s in self.sessions)

    @property
    def lost(self) -> int:
        return sum(s.lost for s in self.sessions)

    def _loop(self) -> None:
        next_send = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_send and not self._draining.is_set():
                next_send = now + self.interval
                for s in self.sessions:
                    self._send(s, now)
            wait = max(0.0, next_send - time.monotonic())
            for key, _ in self._sel.select(min(wait, self.interval)):
                self._receive(key.data, time.monotonic())

    def _send(self, s: _Session, now: float) -> None:
        if s.broken:
            return
        if s.waiting_since and now - s.waiting_since > self.deadline:
            s.broken = f"no answer for {now - s.waiting_since:.1f} s"
            return
        if s.waiting_since and not s.udp:
            return  # one line in flight per TCP session
        try:
            s.sock.send(f"{s.name} {s.sent}\n".encode())
        except OSError as exc:
            s.broken = f"send: {_why(exc)}"
            return
        s.sent += 1
        if not s.waiting_since:
            s.waiting_since = now

    def _receive(self, s: _Session, now: float) -> None:
        try:
            data = s.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            if not s.broken:
                s.broken = f"recv: {_why(exc)}"
            self._sel.unregister(s.sock)
            return
        if not data and not s.udp:
            s.broken = s.broken or "closed by the peer"
            self._sel.unregister(s.sock)
            return
        lines = [data] if s.udp else []
        if not s.udp:
            s.buf += data
            while b"\n" in s.buf:
                line, s.buf = s.buf.split(b"\n", 1)
                lines.append(line)
        for line in lines:
            pod = line.decode(errors="replace").split(" ", 1)[0]
            if not s.pod:
                s.pod = pod
            elif pod != s.pod:
                if s.udp and s.pod in self.may_leave:
                    # a UDP flow has no end: it moves on when its backend
                    # leaves the Service (kube-proxy flushes its conntrack)
                    self.moves += 1
                    s.pod = pod
                elif not s.broken:
                    s.broken = f"answered by {pod} instead of {s.pod}"
            s.answered += 1
            s.waiting_since = 0.0
        if s.udp:  # sent and never answered: lost, or one in flight
            s.lost = max(0, s.sent - s.answered - 1)


def report(capsys: Any, title: str, rows: list[tuple[str, object]]) -> None:
    """Print a suite's figures past pytest's capture (they belong in the
    output of `make test` too), and append them to $LBCTL_RELIABILITY_OUT."""
    width = max(len(k) for k, _ in rows)
    text = "\n".join([f"\n== {title}", *(f"  {k.ljust(width)}  {v}" for k, v in rows)]) + "\n"
    with capsys.disabled():
        print(text, end="", flush=True)
    out = os.environ.get("LBCTL_RELIABILITY_OUT")
    if out:
        with open(out, "a") as sink:
            sink.write(text)


class Flood:
    """New flows as fast as one thread can inject them: raw frames on
    `ifname` of `ns` (to `dst_mac`, the node's side), one per flow, from
    `sources` addresses and every source port in turn, to ip:port; UDP
    datagrams or TCP SYNs.  Nothing answers their replies: they are flows
    that only ever open, as in a flood."""

    def __init__(
        self,
        ns: Any,
        ifname: str,
        dst_mac: str,
        sources: list[str],
        ip: str,
        port: int,
        proto: str = "udp",
        flows: int = 20000,
    ) -> None:
        from tests import packets

        src_mac = _link_mac(ns, ifname)
        self.frames = []
        for n in range(flows):
            src, sport = sources[n % len(sources)], 1024 + (n // len(sources)) % 64000
            if proto == "udp":
                frame = packets.ipv4_udp(
                    src, ip, sport, port, b"flood", src_mac=src_mac, dst_mac=dst_mac
                )
            else:
                frame = packets.ipv4_tcp(
                    src, ip, sport, port, "S", seq=n, src_mac=src_mac, dst_mac=dst_mac
                )
            self.frames.append(frame)
        self.ns, self.ifname = ns, ifname
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> Flood:
        self._thread.start()
        return self

    def stop(self) -> Flood:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the flood did not stop"
        return self

    def _loop(self) -> None:
        with self.ns.open_socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
            sock.bind((self.ifname, 0))
            while not self._stop.is_set():
                for frame in self.frames:
                    try:
                        sock.send(frame)
                    except OSError:  # a full queue: go on
                        continue
                    self.sent += 1
                    if self.sent % 256 == 0 and self._stop.is_set():
                        return


def _link_mac(ns: Any, ifname: str) -> str:
    from tests.netlab import link_mac

    return link_mac(ns, ifname)
