"""Network-namespace lab for end-to-end tests.

Everything built here lives in network namespaces named ``lbt...`` that are wired
only to each other with veth pairs; nothing is ever attached to the host namespace.

Entering a namespace (``Netns.entered()``) switches only the calling thread, so
servers and clients can create their sockets inside a pod namespace while the rest
of the test process stays where it is.  A socket keeps its namespace for life.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import itertools
import json
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
NAME_PREFIX = "lbt"
IFNAMSIZ = 16  # including the trailing NUL, so names are at most 15 characters

POD_CIDR_GATEWAY = "10.244.0.1"
CLIENT_IP = "10.244.0.10"
FIRST_POD_HOST = 20  # pods get 10.244.0.20, .21, ...

# Python 3.11 has no socket.IP_PKTINFO; the Linux value is 8.
_IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)
_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst, addr

_POLL = 0.1  # how often blocking server loops look at their stop flag
_STOP_JOIN_TIMEOUT = 2.0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int

_counter = itertools.count(1)
_created: set[str] = set()  # namespace names created by this process
_created_lock = threading.Lock()


class NetlabError(RuntimeError):
    """A lab operation (command, namespace switch, setup step) failed."""


class RequestError(NetlabError):
    """A client request got no (valid) reply: refused, unreachable or timed out."""


# --------------------------------------------------------------------------- namespaces


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def current_netns_inode() -> int:
    """Inode number of the calling thread's network namespace."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def ns_exists(name: str) -> bool:
    """True if a named network namespace ``name`` exists (``ip netns`` view)."""
    return os.path.exists(os.path.join(NETNS_RUN_DIR, name))


def alive_namespaces() -> list[str]:
    """Namespaces created by this process that still exist (for leak checks)."""
    with _created_lock:
        names = sorted(_created)
    return [name for name in names if ns_exists(name)]


def _run(args: list[str], check: bool, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise NetlabError(
            f"command failed (rc={proc.returncode}): {' '.join(args)}\n{proc.stderr.strip()}"
        )
    return proc


def _check_ifname(ifname: str) -> None:
    if not ifname or len(ifname) >= IFNAMSIZ:
        raise ValueError(f"interface name {ifname!r} must be 1..{IFNAMSIZ - 1} characters")


class Netns:
    """A named network namespace created by this process (``ip netns add``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._on_delete: list[Callable[[], None]] = []
        self._deleted = False

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    @property
    def path(self) -> str:
        """Bind-mount path of the namespace, usable with setns(2)."""
        return os.path.join(NETNS_RUN_DIR, self.name)

    @classmethod
    def create(cls, prefix: str = "") -> Netns:
        """Create a fresh namespace named ``lbt<pid>-<n>-<prefix>`` with ``lo`` up."""
        pid = os.getpid() % 100000
        suffix = f"-{prefix}" if prefix else ""
        name = f"{NAME_PREFIX}{pid}-{next(_counter)}{suffix}"
        while ns_exists(name):  # another process with a colliding pid % 100000
            name = f"{NAME_PREFIX}{pid}-{next(_counter)}{suffix}"
        _run(["ip", "netns", "add", name], check=True)
        with _created_lock:
            _created.add(name)
        ns = cls(name)
        try:
            ns.ip("link", "set", "lo", "up")
        except BaseException:
            ns.delete()
            raise
        return ns

    def run(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (``ip netns exec``); text output captured."""
        return _run(["ip", "netns", "exec", self.name, *args], check=check, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ip -n NAME ARGS...`` (cheaper than ``run("ip", ...)``)."""
        return _run(["ip", "-n", self.name, *args], check=check)

    def sysctl(self, key: str, value: str | int) -> None:
        """Set a sysctl inside the namespace, e.g. ``sysctl("net.ipv4.ip_forward", 1)``."""
        self.run("sysctl", "-qw", f"{key}={value}")

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Switch only the calling thread into this namespace for the ``with`` body."""
        origin = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                # If this fails the thread is stranded in the wrong namespace: say so loudly.
                try:
                    _setns(origin)
                except OSError as exc:
                    raise NetlabError(f"could not leave namespace {self.name}: {exc}") from exc
        finally:
            os.close(origin)

    def open_socket(
        self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """Create a socket that lives in this namespace (and stays there)."""
        with self.entered():
            return socket.socket(family, kind)

    def on_delete(self, callback: Callable[[], None]) -> None:
        """Register a callback (e.g. stopping a server) to run before the namespace goes."""
        self._on_delete.append(callback)

    def delete(self) -> None:
        """Stop attached resources and remove the namespace. Safe to call repeatedly."""
        if self._deleted:
            return
        self._deleted = True
        callbacks, self._on_delete = self._on_delete, []
        # ExitStack runs every callback even if some raise (LIFO), then re-raises.
        with ExitStack() as stack:
            stack.callback(self._remove)  # registered first, so it runs last
            for callback in callbacks:
                stack.callback(callback)

    def _remove(self) -> None:
        if ns_exists(self.name):
            _run(["ip", "netns", "delete", self.name], check=True)
        with _created_lock:
            _created.discard(self.name)


@atexit.register
def _delete_leftovers() -> None:
    """Last-resort cleanup for namespaces a crashed test did not remove."""
    for name in alive_namespaces():
        _run(["ip", "netns", "delete", name], check=False)


def veth(a: Netns, a_if: str, b: Netns, b_if: str) -> None:
    """Create a veth pair ``a_if`` (in ``a``) <-> ``b_if`` (in ``b``); both ends up.

    The pair is created from inside ``a``, so no end ever appears in the host namespace.
    """
    _check_ifname(a_if)
    _check_ifname(b_if)
    a.ip("link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
    a.ip("link", "set", a_if, "up")
    b.ip("link", "set", b_if, "up")


def tx_checksum_offload(ns: Netns, ifname: str, on: bool) -> None:
    """Turn tx checksum offload of ``ifname`` in ``ns`` on or off (``ethtool -K tx``)."""
    ns.run("ethtool", "-K", ifname, "tx", "on" if on else "off")


def tx_checksum_offload_enabled(ns: Netns, ifname: str) -> bool:
    """Report whether tx checksum offload is currently on for ``ifname`` in ``ns``."""
    out = ns.run("ethtool", "-k", ifname).stdout
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "tx-checksumming":
            return value.split()[0] == "on"
    raise NetlabError(f"ethtool -k {ifname} in {ns.name} shows no tx-checksumming line")


def link_mac(ns: Netns, ifname: str) -> str:
    """MAC address of ``ifname`` in ``ns`` ("aa:bb:...")."""
    links = json.loads(ns.ip("-j", "link", "show", "dev", ifname).stdout)
    return str(links[0]["address"])


def inject_frame(ns: Netns, ifname: str, frame: bytes) -> None:
    """Transmit one raw Ethernet ``frame`` on ``ifname`` in ``ns`` (AF_PACKET).

    On a veth the frame arrives at the peer exactly as given, with no checksum help
    (the stack will verify its checksums on local delivery).
    """
    _check_ifname(ifname)
    with ns.open_socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((ifname, 0))
        sent = sock.send(frame)
    if sent != len(frame):
        raise NetlabError(f"short write on {ns.name}/{ifname}: {sent} of {len(frame)} bytes")


def snmp_counters(ns: Netns) -> dict[str, int]:
    """The namespace's /proc/net/snmp counters as ``{"Udp.InCsumErrors": 0, ...}``."""
    counters: dict[str, int] = {}
    lines = ns.run("cat", "/proc/net/snmp").stdout.splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        proto, _, keys = names.partition(":")
        for key, value in zip(keys.split(), values.partition(":")[2].split(), strict=True):
            counters[f"{proto}.{key}"] = int(value)
    return counters


# ------------------------------------------------------------------------------ topology


@dataclass
class Pod:
    """An endpoint namespace joined to the node: ``eth0`` inside, ``host_if`` on the node."""

    ns: Netns
    name: str
    ip: str
    host_if: str


@dataclass
class Cluster:
    """The single-node topology built by :func:`build_cluster`."""

    node: Netns
    client: Pod
    pods: list[Pod] = field(default_factory=list)


class Lab:
    """Owns every namespace (and, through them, every server) created for a test.

    Use as a context manager or call :meth:`close`; cleanup runs even after errors.
    """

    def __init__(self) -> None:
        self._namespaces: list[Netns] = []
        self._closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def namespaces(self) -> list[Netns]:
        """Namespaces created by this lab, in creation order."""
        return list(self._namespaces)

    def netns(self, role: str) -> Netns:
        """Create a namespace for ``role`` (used in its name) owned by this lab."""
        if self._closed:
            raise NetlabError("lab is closed")
        ns = Netns.create(role)
        self._namespaces.append(ns)
        return ns

    def close(self) -> None:
        """Stop all servers and delete all namespaces, newest first. Idempotent."""
        self._closed = True
        namespaces, self._namespaces = self._namespaces, []
        # ExitStack runs every delete even if some raise (LIFO), then re-raises.
        with ExitStack() as stack:
            for ns in namespaces:
                stack.callback(ns.delete)


def _attach_pod(node: Netns, ns: Netns, role: str, ip: str) -> Pod:
    host_if = f"lxc{role}"
    veth(node, host_if, ns, "eth0")
    ns.ip("addr", "add", f"{ip}/32", "dev", "eth0")
    ns.ip("route", "add", POD_CIDR_GATEWAY, "dev", "eth0", "scope", "link")
    ns.ip("route", "add", "default", "via", POD_CIDR_GATEWAY, "dev", "eth0")
    node.ip("addr", "add", f"{POD_CIDR_GATEWAY}/32", "dev", host_if)
    node.ip("route", "add", f"{ip}/32", "dev", host_if)
    return Pod(ns=ns, name=role, ip=ip, host_if=host_if)


def build_cluster(
    lab: Lab, pods: int = 3, offload: bool = False, invalid_drop_rule: bool = True
) -> Cluster:
    """Build the single-node topology: a routing ``node``, a ``client`` and N backend pods.

    Calico-style addressing: every pod has a /32 on ``eth0`` and a default route via
    10.244.0.1, which every node-side veth (``lxc<role>``) carries; the node has a /32
    route per pod.  ``offload=False`` disables tx checksum offload on the senders' eth0
    so that checksum bugs are not masked by veth.  ``invalid_drop_rule`` adds the usual
    ``FORWARD -m conntrack --ctstate INVALID -j DROP`` rule on the node.
    """
    if not 0 <= pods <= 200:
        raise ValueError("pods must be between 0 and 200")
    node = lab.netns("node")
    node.sysctl("net.ipv4.ip_forward", 1)
    if invalid_drop_rule:
        node.run(
            "iptables", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"
        )

    client = _attach_pod(node, lab.netns("client"), "client", CLIENT_IP)
    backends = [
        _attach_pod(node, lab.netns(f"pod{i}"), f"pod{i}", f"10.244.0.{FIRST_POD_HOST + i}")
        for i in range(pods)
    ]
    if not offload:
        for pod in [client, *backends]:
            tx_checksum_offload(pod.ns, "eth0", on=False)
    return Cluster(node=node, client=client, pods=backends)


# ------------------------------------------------------------------------------- servers


class _Server:
    """Common lifecycle of the thread-based servers: start at construction, stop once."""

    def __init__(self, pod: Pod, sock: socket.socket) -> None:
        self.pod = pod
        self._sock = sock
        self._stop = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self.port: int = sock.getsockname()[1]
        pod.ns.on_delete(self.stop)

    def _spawn(self, target: Callable[..., None], *args: object, name: str) -> None:
        thread = threading.Thread(
            target=self._tracked, args=(target, *args), name=name, daemon=True
        )
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _tracked(self, target: Callable[..., None], *args: object) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    @property
    def running(self) -> bool:
        """True until :meth:`stop` was called."""
        return not self._stop.is_set()

    def stop(self) -> None:
        """Stop serving and wait (bounded) for the server threads. Idempotent."""
        self._stop.set()
        deadline = time.monotonic() + _STOP_JOIN_TIMEOUT
        while True:
            with self._lock:
                threads = list(self._threads)
            remaining = deadline - time.monotonic()
            if not threads or remaining <= 0:
                break
            threads[0].join(remaining)
        self._sock.close()
        if threads:
            raise NetlabError(f"{type(self).__name__} in {self.pod.name}: threads did not stop")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class TcpServer(_Server):
    """Line echo server: replies ``"<pod> <peer_ip>:<peer_port> <line>\\n"`` per line.

    Every connection is served by its own daemon thread until the client closes.
    Stopped by :meth:`stop`, or when its pod namespace is deleted (``Lab.close``).
    """

    BACKLOG = 512

    def __init__(self, pod: Pod, port: int, bind: str = "0.0.0.0") -> None:
        sock = pod.ns.open_socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((bind, port))
            sock.listen(self.BACKLOG)
            sock.settimeout(_POLL)
        except BaseException:
            sock.close()
            raise
        super().__init__(pod, sock)
        self.accepted = 0
        self._spawn(self._accept_loop, name=f"tcp-accept-{pod.name}:{port}")

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, (peer_ip, peer_port) = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            self.accepted += 1
            self._spawn(self._serve, conn, f"{peer_ip}:{peer_port}", name=f"tcp-conn-{peer_ip}")

    def _serve(self, conn: socket.socket, peer: str) -> None:
        with conn:
            conn.settimeout(_POLL)
            buf = b""
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:  # reset by peer (clients close with RST)
                    return
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode(errors="replace")
                    try:
                        conn.sendall(f"{self.pod.name} {peer} {text}\n".encode())
                    except OSError:
                        return


class UdpServer(_Server):
    """Datagram echo server: replies ``"<pod> <peer_ip>:<peer_port> <payload>"``.

    Replies are sent from the address each datagram was sent to (IP_PKTINFO), so a
    server bound to 0.0.0.0 also answers correctly for extra local addresses.
    """

    def __init__(self, pod: Pod, port: int, bind: str = "0.0.0.0") -> None:
        sock = pod.ns.open_socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
            sock.bind((bind, port))
            sock.settimeout(_POLL)
        except BaseException:
            sock.close()
            raise
        super().__init__(pod, sock)
        self.received = 0
        self._spawn(self._loop, name=f"udp-{pod.name}:{port}")

    def _loop(self) -> None:
        cmsg_space = socket.CMSG_SPACE(_IN_PKTINFO.size)
        while not self._stop.is_set():
            try:
                data, ancdata, _flags, (peer_ip, peer_port) = self._sock.recvmsg(65535, cmsg_space)
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue  # e.g. ECONNREFUSED from an ICMP error of an earlier reply
            self.received += 1
            reply = f"{self.pod.name} {peer_ip}:{peer_port} {data.decode(errors='replace')}"
            anc: list[tuple[int, int, bytes]] = []
            for level, kind, value in ancdata:
                if level == socket.IPPROTO_IP and kind == _IP_PKTINFO:
                    _ifindex, _spec_dst, local = _IN_PKTINFO.unpack(value[: _IN_PKTINFO.size])
                    anc = [(socket.IPPROTO_IP, _IP_PKTINFO, _IN_PKTINFO.pack(0, local, bytes(4)))]
            try:
                self._sock.sendmsg([reply.encode()], anc, 0, (peer_ip, peer_port))
            except OSError:
                continue


# ------------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class Reply:
    """A server reply: which pod answered, the source address it saw, and the echo."""

    pod: str
    peer: str  # "ip:port" as seen by the server
    text: str
    source: str = ""  # "ip:port" the reply came from, as seen by the client

    @property
    def peer_ip(self) -> str:
        """IP part of :attr:`peer`."""
        return self.peer.rsplit(":", 1)[0]

    @property
    def peer_port(self) -> int:
        """Port part of :attr:`peer`."""
        return int(self.peer.rsplit(":", 1)[1])

    @classmethod
    def parse(cls, raw: str, source: str = "") -> Reply:
        """Parse ``"<pod> <ip:port> <text>"`` as sent by the lab servers."""
        parts = raw.rstrip("\n").split(" ", 2)
        if len(parts) < 2 or ":" not in parts[1]:
            raise RequestError(f"malformed reply {raw!r}")
        return cls(
            pod=parts[0], peer=parts[1], text=parts[2] if len(parts) > 2 else "", source=source
        )


NsLike = Netns | Pod


def _ns(where: NsLike) -> Netns:
    return where.ns if isinstance(where, Pod) else where


def _describe(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)


class TcpSession:
    """A long-lived TCP connection from a namespace; ``ask()`` one line at a time."""

    def __init__(
        self, where: NsLike, ip: str, port: int, timeout: float = 2.0, rst_close: bool = True
    ) -> None:
        self._ns = _ns(where)
        self._target = f"{ip}:{port}"
        self._timeout = timeout
        self._rst_close = rst_close
        self._buf = b""
        self._sock = self._ns.open_socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect((ip, port))
        except OSError as exc:
            self._sock.close()
            raise RequestError(
                f"TCP connect {self._target} from {self._ns.name}: {_describe(exc)}"
            ) from exc
        self.local: str = "{}:{}".format(*self._sock.getsockname())

    def ask(self, line: str = "hi") -> Reply:
        """Send one line and return the parsed reply line (within the session timeout)."""
        if "\n" in line:
            raise ValueError("line must not contain a newline")
        deadline = time.monotonic() + self._timeout
        try:
            self._sock.settimeout(self._timeout)
            self._sock.sendall(line.encode() + b"\n")
            while b"\n" not in self._buf:
                self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = self._sock.recv(65536)
                if not data:
                    raise RequestError(f"TCP {self._target}: connection closed by peer")
                self._buf += data
        except OSError as exc:
            raise RequestError(
                f"TCP {self._target} from {self._ns.name} ({self.local}): {_describe(exc)}"
            ) from exc
        raw, self._buf = self._buf.split(b"\n", 1)
        return Reply.parse(raw.decode(errors="replace"), source=self._target)

    def close(self) -> None:
        """Close the connection (with RST if ``rst_close``, so no TIME_WAIT is left)."""
        if self._sock.fileno() < 0:
            return
        if self._rst_close:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def tcp_request(
    where: NsLike,
    ip: str,
    port: int,
    line: str = "hi",
    timeout: float = 2.0,
    rst_close: bool = True,
) -> Reply:
    """Connect from ``where``, send one line, read one reply line, close.

    Raises :class:`RequestError` on refusal, unreachability or timeout.  By default the
    socket is closed with RST (SO_LINGER 0) so hundreds of calls leave no TIME_WAIT.
    """
    with TcpSession(where, ip, port, timeout=timeout, rst_close=rst_close) as session:
        return session.ask(line)


def udp_request(
    where: NsLike,
    ip: str,
    port: int,
    payload: str = "hi",
    timeout: float = 2.0,
    check_source: bool = True,
    source_port: int = 0,
) -> Reply:
    """Send one datagram from a fresh socket in ``where`` and wait for one reply.

    A fresh socket may get the ephemeral port of an earlier one, and so join
    that one's flow: tests that count flows give each its own ``source_port``.
    With ``check_source`` a reply from any address other than ``ip:port`` (e.g. a
    backend's own address because reverse NAT is missing) raises :class:`RequestError`;
    otherwise it is returned with :attr:`Reply.source` telling where it came from.
    """
    ns = _ns(where)
    target = f"{ip}:{port}"
    with ns.open_socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            if source_port:
                sock.bind(("0.0.0.0", source_port))
            sock.sendto(payload.encode(), (ip, port))
            data, (src_ip, src_port) = sock.recvfrom(65535)
        except OSError as exc:
            raise RequestError(f"UDP {target} from {ns.name}: {_describe(exc)}") from exc
    source = f"{src_ip}:{src_port}"
    if check_source and source != target:
        raise RequestError(f"UDP {target} from {ns.name}: reply came from {source}")
    return Reply.parse(data.decode(errors="replace"), source=source)
