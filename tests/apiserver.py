"""An in-process fake kube-apiserver for lbctl's tests.

No kube-apiserver (nor etcd) can be installed on this machine, so the tests use this
stand-in.  It speaks enough of the real list/watch wire protocol for the official
``kubernetes`` Python client to work against it unmodified:

* GET ``/api/v1/services``, ``/api/v1/namespaces/{ns}/services``,
  ``/apis/discovery.k8s.io/v1/endpointslices``, ``.../namespaces/{ns}/endpointslices``
  and ``/api/v1/nodes``; any other path is a 404 ``Status``, any other verb a 405.
* One global resourceVersion counter (like etcd) shared by every resource.
* LIST with ``limit``/``continue`` over a consistent snapshot (``remainingItemCount``
  on every page but the last; a token of a compacted snapshot gets 410 Expired),
  ``fieldSelector`` (``metadata.name``, ``metadata.namespace``) and equality-based
  ``labelSelector``.  As from kube-apiserver, the items of a LIST carry no ``kind``
  nor ``apiVersion`` (the list has them); watch events' objects do.
* Content types: every answer is ``application/json``, whatever the request's
  ``Accept`` asks (``application/json;as=Table;...`` or
  ``application/vnd.kubernetes.protobuf``): a client that needs a Table or
  protobuf gets JSON objects here, where kube-apiserver would convert.
* Server-set metadata: uid, creationTimestamp (both kept across updates, unless
  the writer gives them, as tests/k8s_payloads.py does), resourceVersion, and an
  EndpointSlice's ``generation`` (1 on create, one more on each update).  Other
  fields (``managedFields``, defaults like ``clusterIPs``) are stored as written:
  tests/k8s_payloads.py writes objects whole, as a real cluster holds them.
* WATCH (``watch=true``): chunked, one JSON event per line; history replay from a
  resourceVersion, synthetic ADDED events for ``resourceVersion`` unset or "0", an
  ``ERROR`` 410 event for a compacted resourceVersion, BOOKMARKs, ``timeoutSeconds``.
  BOOKMARKs come as kube-apiserver's watch cache (v1.24) sends them: only when the
  client asked (``allowWatchBookmarks=true``) and the watch has a ``timeoutSeconds``,
  one, ``bookmark_lead`` (2 s) before the server ends the watch; a watch without a
  timeout gets none.  ``bookmark_interval`` adds the periodic ones newer servers send
  (about every minute) for tests that want them.
* Fault injection: :meth:`FakeApiServer.fail_next`, :meth:`~FakeApiServer.cut_watches`,
  :meth:`~FakeApiServer.set_down`.

Simplifications: updates ignore ``metadata.resourceVersion`` (no conflicts), and a
selector filters watch events by the object's new state only (the real server turns a
MODIFIED object that leaves the selection into DELETED).  Objects are stored only as
pre-serialized JSON bytes, so a LIST just joins bytes.

Tests must keep all traffic inside network namespaces they create: pass a listening
socket made inside one (``Netns.open_socket``) and run the clients in a thread that
entered it.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import os
import socket
import struct
import sys
import threading
import time
import uuid
from bisect import bisect_right
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self
from urllib.parse import parse_qs, urlsplit

Obj = dict[str, Any]
Matcher = Callable[[str, str, dict[str, str]], bool]  # (namespace, name, labels)


@dataclass(frozen=True)
class Kind:
    resource: str
    kind: str
    api_version: str
    namespaced: bool

    @property
    def prefix(self) -> str:
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"


KINDS = {
    k.resource: k
    for k in (
        Kind("services", "Service", "v1", True),
        Kind("endpointslices", "EndpointSlice", "discovery.k8s.io/v1", True),
        Kind("nodes", "Node", "v1", False),
    )
}
_ALIASES = {a: k for k in KINDS.values() for a in (k.resource, k.resource[:-1], k.kind.lower())}
_REASONS = {
    400: "BadRequest",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "AlreadyExists",
    410: "Expired",
    500: "InternalError",
    503: "ServiceUnavailable",
}
_MAX_SNAPSHOTS = 64
_GENERATED = {"endpointslices"}  # kinds whose metadata.generation the server keeps
_CHUNK = 1 << 20


class Request(NamedTuple):
    method: str
    path: str
    query: dict[str, str]


class ApiError(Exception):
    """An API error; served as a ``Status`` object with HTTP status ``code``."""

    def __init__(self, code: int, message: str, reason: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message
        self.reason = reason or _REASONS.get(code) or HTTPStatus(code).phrase.replace(" ", "")

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


class _Entry(NamedTuple):
    raw: bytes
    uid: str
    created: str
    labels: dict[str, str]
    generation: int = 0


class _Event(NamedTuple):
    rv: int
    resource: str
    namespace: str
    name: str
    type: bytes
    raw: bytes
    labels: dict[str, str]


@dataclass(eq=False)
class _Watch:
    """One open watch: what it selects and how far into the history it has read."""

    sock: socket.socket
    kind: Kind
    namespace: str | None
    match: Matcher | None
    cursor: int  # absolute index of the next history event to look at
    cut: bool = False

    def wants(self, e: _Event) -> bool:
        return (
            e.resource == self.kind.resource
            and self.namespace in (None, e.namespace)
            and (self.match is None or self.match(e.namespace, e.name, e.labels))
        )


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _loads(raw: bytes) -> Obj:
    obj: Obj = json.loads(raw)
    return obj


def _event_line(type_: bytes, raw: bytes) -> bytes:
    return b'{"type":"' + type_ + b'","object":' + raw + b"}\n"


def _abort(sock: socket.socket) -> None:
    """Drop a connection abruptly (RST on close), waking any thread blocked on it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _selector(field_selector: str, label_selector: str) -> Matcher | None:
    terms: list[tuple[bool, str, str, str]] = []  # (is_field, key, op, value)
    for is_field, text in ((True, field_selector), (False, label_selector)):
        for term in filter(None, (t.strip() for t in text.split(","))):
            op = next((o for o in ("!=", "==", "=") if o in term), "")
            key, value = term.split(op, 1) if op else (term.lstrip("!"), "")
            op = "=" if op == "==" else op or ("!" if term.startswith("!") else "exists")
            fields = ("metadata.name", "metadata.namespace")
            bad_field = is_field and (key not in fields or not value)
            if "(" in term or " " in term or not key or bad_field:
                raise ApiError(400, f"unsupported selector term {term!r}")
            terms.append((is_field, key, op, value))
    if not terms:
        return None

    def match(namespace: str, name: str, labels: dict[str, str]) -> bool:
        for is_field, key, op, value in terms:
            if is_field:
                actual: str | None = name if key == "metadata.name" else namespace
            else:
                actual = labels.get(key)
            if op == "=":
                ok = actual == value
            elif op == "!=":
                ok = actual != value
            else:  # "exists" or "!" (does not exist)
                ok = (actual is None) == (op == "!")
            if not ok:
                return False
        return True

    return match


class _HTTPServer(ThreadingHTTPServer):
    def __init__(self, sock: socket.socket, api: FakeApiServer) -> None:
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()  # the unbound socket TCPServer made; serve the one given
        self.socket, self.api = sock, api
        self.threads: list[threading.Thread] = []  # only touched by the serving thread

    def process_request(self, request: Any, client_address: Any) -> None:
        """One daemon thread per connection, kept so that ``stop()`` can join it."""
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True
        )
        self.threads = [t for t in self.threads if t.is_alive()] + [thread]
        thread.start()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self.api.down or self.api.stopping:
            _abort(request)
            return False
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # clients going away is normal
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.api._track(self.connection, add=True)

    def finish(self) -> None:
        self.server.api._track(self.connection, add=False)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.api._serve(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


class FakeApiServer:
    """The fake API server; a context manager that starts and stops it.

    ``sock`` is an already-bound socket (made inside a test namespace); without it one
    is bound to ``host:port``.  ``bookmark_lead`` is how long before a watch's
    ``timeoutSeconds`` ends its one BOOKMARK comes; ``bookmark_interval``, when given,
    the period of further BOOKMARKs (None: none, as kube-apiserver v1.24).
    """

    def __init__(
        self,
        sock: socket.socket | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        bookmark_interval: float | None = None,
        bookmark_lead: float = 2.0,
    ) -> None:
        sock = sock or socket.create_server((host, port))
        try:
            sock.listen(128)
            self._httpd = _HTTPServer(sock, self)
        except BaseException:
            sock.close()
            raise
        self.host: str = sock.getsockname()[0]
        self.port: int = sock.getsockname()[1]
        self.bookmark_interval = bookmark_interval
        self.bookmark_lead = bookmark_lead
        self.bookmarks_sent = 0
        self.requests: list[Request] = []
        self.watches_started = 0
        self.down = False
        self.stopping = False
        self._cond = threading.Condition(threading.RLock())
        self._rv = 0
        self._store: dict[str, dict[tuple[str, str], _Entry]] = {r: {} for r in KINDS}
        self._history: list[_Event] = []
        self._base = 0  # absolute index of _history[0]
        self._compacted_rv = 0
        self._snapshots: dict[int, tuple[int, str, list[bytes]]] = {}
        self._snapshot_ids = itertools.count(1)
        self._batching = 0
        self._failures: list[int] = []
        self._conns: set[socket.socket] = set()
        self._watches: set[_Watch] = set()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{'127.0.0.1' if self.host == '0.0.0.0' else self.host}:{self.port}"

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            args=(0.05,),
            name=f"apiserver:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and join all threads. Idempotent."""
        with self._cond:
            if self.stopping:
                return
            self.stopping = True
            conns = list(self._conns)
            self._cond.notify_all()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        for conn in conns:
            _abort(conn)
        deadline = time.monotonic() + 5.0
        for thread in self._httpd.threads:
            thread.join(max(deadline - time.monotonic(), 0))
        self._httpd.server_close()
        if any(thread.is_alive() for thread in self._httpd.threads):
            raise RuntimeError("FakeApiServer: connection threads did not stop")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def write_kubeconfig(self, path: str | os.PathLike[str]) -> Path:
        """Write a kubeconfig (no auth) pointing at this server; returns its path."""
        text = (
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
            f"clusters:\n- name: fake\n  cluster:\n    server: {self.url}\n"
            "users:\n- name: fake\n  user: {}\n"
            "contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n"
        )
        Path(path).write_text(text)
        return Path(path)

    # ------------------------------------------------------------------ objects

    @property
    def resource_version(self) -> int:
        return self._rv

    def create(self, obj: Obj) -> Obj:
        return self._write(obj, "create")

    def update(self, obj: Obj) -> Obj:
        return self._write(obj, "update")

    def apply(self, obj: Obj) -> Obj:
        """Create or update ``obj``; returns the stored object."""
        return self._write(obj, "apply")

    def delete(self, kind_or_resource: str, namespace: str | None, name: str) -> Obj:
        """Delete an object; returns its last state with the deletion's resourceVersion."""
        kind = _kind(kind_or_resource)
        ns = (namespace or "default") if kind.namespaced else ""
        with self._cond:
            entry = self._store[kind.resource].pop((ns, name), None)
            if entry is None:
                raise ApiError(404, f'{kind.resource} "{name}" not found')
            self._rv += 1
            obj: Obj = json.loads(entry.raw)
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._record(b"DELETED", kind, ns, name, _dumps(obj), entry.labels)
        return obj

    def get(self, kind_or_resource: str, namespace: str | None, name: str) -> Obj | None:
        kind = _kind(kind_or_resource)
        ns = (namespace or "default") if kind.namespaced else ""
        with self._cond:
            entry = self._store[kind.resource].get((ns, name))
        return None if entry is None else _loads(entry.raw)

    def list_objects(self, kind_or_resource: str, namespace: str | None = None) -> list[Obj]:
        """All objects of a kind (in one namespace), sorted by namespace and name."""
        with self._cond:
            raws = self._select(_kind(kind_or_resource), namespace, None)
        return [_loads(raw) for raw in raws]

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Make many mutations under one lock; watchers wake once, at the end."""
        with self._cond:
            self._batching += 1
            try:
                yield
            finally:
                self._batching -= 1
                self._cond.notify_all()

    def compact(self) -> None:
        """Forget history up to now: older resourceVersions and continue tokens get 410."""
        with self._cond:
            self._compacted_rv = self._rv
            self._snapshots.clear()
            # open watches keep the events they have not read yet
            keep = min([w.cursor for w in self._watches], default=self._base + len(self._history))
            del self._history[: keep - self._base]
            self._base = keep

    def _write(self, obj: Obj, mode: str) -> Obj:
        kind = _kind(str(obj.get("kind", "")))
        meta = dict(obj.get("metadata") or {})
        name = meta.get("name")
        if not name:
            raise ValueError("metadata.name is required")
        ns = (meta.get("namespace") or "default") if kind.namespaced else ""
        with self._cond:
            old = self._store[kind.resource].get((ns, name))
            if old is not None and mode == "create":
                raise ApiError(409, f'{kind.resource} "{name}" already exists')
            if old is None and mode == "update":
                raise ApiError(404, f'{kind.resource} "{name}" not found')
            self._rv += 1
            if old is not None:
                meta.update(uid=old.uid, creationTimestamp=old.created)
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            meta["resourceVersion"] = str(self._rv)
            generation = 0
            if kind.resource in _GENERATED:
                generation = old.generation + 1 if old is not None else 1
                meta["generation"] = generation
            if kind.namespaced:
                meta["namespace"] = ns
            else:
                meta.pop("namespace", None)
            stored = {"apiVersion": kind.api_version, "kind": kind.kind, **obj, "metadata": meta}
            stored.update(apiVersion=kind.api_version, kind=kind.kind)
            labels = dict(meta.get("labels") or {})
            raw = _dumps(stored)
            entry = _Entry(raw, meta["uid"], meta["creationTimestamp"], labels, generation)
            self._store[kind.resource][(ns, name)] = entry
            self._record(b"MODIFIED" if old else b"ADDED", kind, ns, name, entry.raw, labels)
        return stored

    def _record(
        self, type_: bytes, kind: Kind, ns: str, name: str, raw: bytes, labels: dict[str, str]
    ) -> None:
        self._history.append(_Event(self._rv, kind.resource, ns, name, type_, raw, labels))
        if not self._batching:
            self._cond.notify_all()

    def _select(self, kind: Kind, ns: str | None, match: Matcher | None) -> list[bytes]:
        return [
            e.raw
            for (ens, name), e in sorted(self._store[kind.resource].items())
            if (ns is None or ens == ns) and (match is None or match(ens, name, e.labels))
        ]

    # ------------------------------------------------------------------ faults

    def fail_next(self, n: int = 1, code: int = 500) -> None:
        """Answer the next ``n`` requests with HTTP ``code`` and a ``Status`` body."""
        with self._cond:
            self._failures.extend([code] * n)

    def cut_watches(self) -> None:
        """Abruptly close every open watch connection (no terminating chunk)."""
        with self._cond:
            watches = list(self._watches)
            for watch in watches:
                watch.cut = True
            self._cond.notify_all()
        for watch in watches:
            _abort(watch.sock)

    def set_down(self, down: bool) -> None:
        """Outage: while down every connection is reset; mutations are still recorded."""
        with self._cond:
            self.down = down
            conns = list(self._conns) if down else []
            for watch in self._watches if down else ():
                watch.cut = True
            self._cond.notify_all()
        for conn in conns:
            _abort(conn)

    def open_watches(self, kind_or_resource: str | None = None) -> int:
        resource = _kind(kind_or_resource).resource if kind_or_resource else None
        with self._cond:
            return sum(1 for w in self._watches if resource in (None, w.kind.resource))

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` (re-checked on every watch or store change) holds."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(f"condition not met within {timeout}s")

    # ------------------------------------------------------------------ serving

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._cond:
            if not add:
                self._conns.discard(conn)
            elif self.stopping or self.down:
                _abort(conn)
            else:
                self._conns.add(conn)

    def _serve(self, h: _Handler) -> None:
        url = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        with self._cond:
            if self.down:  # a kept-alive connection that raced set_down()
                _abort(h.connection)
                h.close_connection = True
                return
            self.requests.append(Request(h.command, url.path, query))
            failure = self._failures.pop(0) if self._failures else None
        if h.command != "GET":
            h.rfile.read(int(h.headers.get("Content-Length") or 0))  # unread data -> RST
            h.close_connection = True
        try:
            if failure is not None:
                raise ApiError(failure, "injected failure")
            if h.command != "GET":
                raise ApiError(405, "the server does not allow this method on the resource")
            kind, ns = _route(url.path)
            match = _selector(query.get("fieldSelector", ""), query.get("labelSelector", ""))
            if query.get("watch", "").lower() in ("true", "1"):
                self._watch(h, kind, ns, match, query)
                return
            body = self._list(kind, ns, match, query)
        except ApiError as err:
            h.reply(err.code, _dumps(err.status()))
            return
        h.reply(200, body)

    def _list(self, kind: Kind, ns: str | None, match: Matcher | None, q: dict[str, str]) -> bytes:
        limit = _int(q.get("limit") or "0", "limit")
        token = q.get("continue")
        key = f"{kind.resource}/{ns}/{q.get('fieldSelector')}/{q.get('labelSelector')}"
        with self._cond:
            if token:
                snap_id, start = _decode_token(token)
                rv, snap_key, items = self._snapshots.get(snap_id) or (0, "", [])
                if snap_key != key:
                    raise ApiError(410, "the provided continue parameter is too old or invalid")
            else:
                snap_id, start, rv, items = 0, 0, self._rv, self._select(kind, ns, match)
            end = start + limit if limit > 0 else len(items)
            meta: Obj = {"resourceVersion": str(rv)}
            if end < len(items):
                if not token:
                    snap_id = next(self._snapshot_ids)
                    self._snapshots[snap_id] = (rv, key, items)
                    for old in list(self._snapshots)[:-_MAX_SNAPSHOTS]:
                        del self._snapshots[old]
                meta["continue"] = base64.urlsafe_b64encode(_dumps([snap_id, end])).decode()
                meta["remainingItemCount"] = len(items) - end
        head = b'{"kind":"%sList","apiVersion":"%s","metadata":%s,"items":['
        head %= (kind.kind.encode(), kind.api_version.encode(), _dumps(meta))
        # Stored objects start with their apiVersion and kind (see _write); a LIST's
        # items go without them, as kube-apiserver sends them.
        cut = len(
            b'{"apiVersion":"%s","kind":"%s",' % (kind.api_version.encode(), kind.kind.encode())
        )
        return head + b",".join(b"{" + raw[cut:] for raw in items[start:end]) + b"]}"

    def _watch(
        self, h: _Handler, kind: Kind, ns: str | None, match: Matcher | None, q: dict[str, str]
    ) -> None:
        since = q.get("resourceVersion", "")
        timeout = _int(q["timeoutSeconds"], "timeoutSeconds") if "timeoutSeconds" in q else None
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        bookmarks = q.get("allowWatchBookmarks", "").lower() in ("true", "1")
        initial: list[bytes] = []
        error = b""
        with self._cond:
            if since in ("", "0"):
                initial = self._select(kind, ns, match)
                cursor = self._base + len(self._history)
            else:
                rv = _int(since, "resourceVersion")
                if rv < self._compacted_rv:
                    msg = f"too old resource version: {rv} ({self._compacted_rv})"
                    error = _event_line(b"ERROR", _dumps(ApiError(410, msg).status()))
                cursor = self._base + bisect_right(self._history, rv, key=lambda e: e.rv)
            watch = _Watch(h.connection, kind, ns, match, cursor)
            if not error:
                self._watches.add(watch)
                self.watches_started += 1
                self._cond.notify_all()
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            if error:
                h.chunk(error)
            else:
                lines = [_event_line(b"ADDED", raw) for raw in initial]
                for i in range(0, len(lines), 1000):
                    h.chunk(b"".join(lines[i : i + 1000]))
                if not self._stream(h, watch, deadline, bookmarks):
                    _abort(h.connection)
                    h.close_connection = True
                    return
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            h.close_connection = True
        finally:
            with self._cond:
                self._watches.discard(watch)
                self._cond.notify_all()

    def _next_bookmark(self, now: float, deadline: float, bookmarks: bool) -> float:
        """When the next BOOKMARK is due: the one before the deadline, or a periodic one."""
        if not bookmarks:
            return math.inf
        periodic = math.inf if self.bookmark_interval is None else now + self.bookmark_interval
        before_end = deadline - self.bookmark_lead
        return min(periodic, before_end if before_end >= now else math.inf)

    def _stream(self, h: _Handler, watch: _Watch, deadline: float, bookmarks: bool) -> bool:
        """Send live events until the deadline (True) or until cut or stopped (False)."""
        next_bookmark = self._next_bookmark(time.monotonic(), deadline, bookmarks)
        while True:
            with self._cond:
                while True:
                    if watch.cut or self.stopping:
                        return False
                    now = time.monotonic()
                    pending = self._base + len(self._history) > watch.cursor
                    if pending or now >= min(deadline, next_bookmark):
                        break
                    wake = min(deadline, next_bookmark) - now
                    self._cond.wait(None if wake == math.inf else wake)
                events = self._history[watch.cursor - self._base :]
                watch.cursor += len(events)
                rv_now = self._rv
            data = b"".join(_event_line(e.type, e.raw) for e in events if watch.wants(e))
            if now >= next_bookmark:
                kind, meta = watch.kind, {"resourceVersion": str(rv_now)}
                bookmark = {"kind": kind.kind, "apiVersion": kind.api_version, "metadata": meta}
                data += _event_line(b"BOOKMARK", _dumps(bookmark))
                with self._cond:
                    self.bookmarks_sent += 1
                next_bookmark = self._next_bookmark(now, deadline, bookmarks)
                if next_bookmark <= now:  # the one before the deadline was just sent
                    next_bookmark = math.inf
            if data:
                h.chunk(data)
            if not events and now >= deadline:
                return True


def _kind(kind_or_resource: str) -> Kind:
    try:
        return _ALIASES[kind_or_resource.lower()]
    except KeyError:
        raise ValueError(f"unsupported kind or resource {kind_or_resource!r}") from None


def _route(path: str) -> tuple[Kind, str | None]:
    """``(kind, namespace or None)`` of a collection path, else a 404."""
    for kind in KINDS.values():
        if not path.startswith(kind.prefix + "/"):
            continue
        parts = path[len(kind.prefix) + 1 :].split("/")
        if parts == [kind.resource]:
            return kind, None
        namespaced = len(parts) == 3 and parts[::2] == ["namespaces", kind.resource]
        if kind.namespaced and namespaced and parts[1]:
            return kind, parts[1]
    raise ApiError(404, "the server could not find the requested resource")


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ApiError(400, f"invalid {what}: {text!r}") from None


def _decode_token(token: str) -> tuple[int, int]:
    try:
        snap_id, start = json.loads(base64.urlsafe_b64decode(token.encode()))
        return int(snap_id), int(start)
    except (ValueError, TypeError, binascii.Error):
        raise ApiError(410, "the provided continue parameter is invalid") from None
