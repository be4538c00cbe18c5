"""List-and-watch of one Kubernetes resource, as client-go's reflector does it.

A `Reflector` LISTs the resource (in pages), hands the whole state to its
sink, then WATCHes from the list's resourceVersion with bookmarks on, handing
each event over as it arrives.  When the watch ends it resumes from the last
resourceVersion it saw; when the server says that version is gone (410) it
LISTs again and the sink diffs the new state against the old.  Errors back
off exponentially with jitter; while the API cannot be reached nothing is
handed over, so the datapath keeps what it has.

A watch may be silent for all of its `timeoutSeconds`: the API promises no
BOOKMARK at any interval (kube-apiserver's watch cache sends one about 2 s
before the watch's timeout; newer ones also about every minute; a watch
served from etcd, none), and a quiet resource has no events.  So the read
timeout is the watch's `timeoutSeconds` plus a margin: a healthy watch ends
by the server closing it, which is no error, and only a watch silent past
its own timeout (a peer gone without a reset) is a failure.

The official `kubernetes` client makes the calls (configuration, auth, TLS),
with `_preload_content=False`: lbctl reads the JSON itself, because building
the client's model objects for 10,000 Services would take seconds.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

log = logging.getLogger(__name__)

ListFunc = Callable[..., Any]  # a kubernetes client list_* method


class Sink(Protocol):
    def replace(self, kind: str, items: list[Mapping[str, Any]], arrived: float) -> None:
        """The resource's complete state, from a LIST."""

    def event(self, kind: str, type_: str, obj: Mapping[str, Any], arrived: float) -> None:
        """One ADDED, MODIFIED or DELETED event from a WATCH."""

    def trouble(self, kind: str, message: str | None) -> None:
        """The resource cannot be followed (message), or can again (None)."""


class Gone(Exception):
    """The resourceVersion asked for is too old (HTTP 410): LIST again."""


class WatchError(Exception):
    """The server sent an ERROR event other than 410."""


class WatchHung(Exception):
    """The watch stayed silent past the timeout the server was asked to close it at."""


class Backoff:
    """Exponential delays with full jitter, reset after a success."""

    def __init__(self, initial_s: float = 0.8, maximum_s: float = 30.0) -> None:
        self.initial_s = initial_s
        self.maximum_s = maximum_s
        self.failures = 0

    def next(self) -> float:
        ceiling = min(self.maximum_s, self.initial_s * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.failures = 0


class Reflector:
    def __init__(
        self,
        kind: str,
        list_func: ListFunc,
        sink: Sink,
        *,
        page_size: int = 1000,
        watch_timeout_s: int = 300,
        hang_margin_s: float = 30.0,
        backoff: Backoff | None = None,
        **selectors: str,
    ) -> None:
        self.kind = kind
        self.list_func = list_func
        self.sink = sink
        self.page_size = page_size
        self.watch_timeout_s = watch_timeout_s  # the server closes the watch after it
        # A watch silent for longer than the server's own timeout plus this margin
        # is dead (a peer gone without a reset); a shorter silence is a quiet one.
        self.hang_margin_s = hang_margin_s
        self.read_timeout_s = watch_timeout_s + hang_margin_s
        self.backoff = backoff or Backoff()
        self.selectors = selectors  # e.g. field_selector="metadata.name=node-a"
        self.resource_version: str | None = None
        self.lists = 0  # how many complete LISTs, for tests and logs
        self.api_errors = 0  # failed LIST/WATCH requests and watch ERROR events, for metrics
        # Watches that ended and were started again, by why: "closed" (the server
        # ended it, e.g. its timeout), "expired" (410: LIST again), "error".
        self.watch_restarts = {"closed": 0, "expired": 0, "error": 0}
        self._watching = False
        self._failing = False
        self._gone_in_a_row = 0
        self._response: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reflector-{kind}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end and break its read of an open watch."""
        self._stop.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()  # the blocked read returns at once
            except Exception as err:  # already closed, or an older urllib3
                log.debug("%s: closing the watch: %s", self.kind, err)

    def join(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the loop -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                began = time.monotonic()
                self._watch()
                if not self._stop.is_set():
                    self.watch_restarts["closed"] += 1
                    log.debug(
                        "%s: the server ended the watch after %.1f s; watching again from "
                        "resourceVersion %s",
                        self.kind,
                        time.monotonic() - began,
                        self.resource_version,
                    )
            except Gone as why:
                log.info("%s: %s; listing again", self.kind, why)
                if self._watching:
                    self.watch_restarts["expired"] += 1
                self.resource_version = None
                self._gone_in_a_row += 1
                if self._gone_in_a_row > 1:  # lists that go stale at once: slow down
                    self._stop.wait(self.backoff.next())
            except Exception as err:  # anything the API or the network throws
                if self._stop.is_set():  # stop() broke the read: no failure of the API
                    log.debug("%s: stopped (%s)", self.kind, _short(err))
                    break
                self.api_errors += 1
                if self._watching:
                    self.watch_restarts["error"] += 1
                delay = self.backoff.next()
                message = f"{self.kind}: {_describe(err)}; retrying in {delay:.1f} s"
                log.warning("%s", message)
                self.sink.trouble(self.kind, message)
                self._failing = True
                self._stop.wait(delay)

    def _connected(self) -> None:
        """The API answered with data: errors are over."""
        self.backoff.reset()
        if self._failing:
            log.info("%s: following the API again", self.kind)
            self.sink.trouble(self.kind, None)
            self._failing = False

    def _list(self) -> None:
        self._watching = False
        items: list[Mapping[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": self.page_size, **self.selectors}
            if token:
                kwargs["_continue"] = token
            try:
                page = self._call(kwargs, timeout=60)
            except Exception as err:
                if _status(err) == 410:  # the continue token expired: start over
                    raise Gone("the list's continue token expired") from err
                raise
            body = json.loads(page.data)
            items.extend(body.get("items") or ())
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                break
        self.sink.replace(self.kind, items, time.monotonic())
        self.resource_version = str(meta.get("resourceVersion") or "")
        self._connected()
        self.lists += 1
        log.info(
            "%s: listed %d at resourceVersion %s", self.kind, len(items), self.resource_version
        )

    def _watch(self) -> None:
        self._watching = False
        kwargs: dict[str, Any] = {
            "watch": True,
            "resource_version": self.resource_version,
            "allow_watch_bookmarks": True,
            "timeout_seconds": self.watch_timeout_s,
            **self.selectors,
        }
        try:
            resp = self._call(kwargs, timeout=self.read_timeout_s)
        except Exception as err:
            if _status(err) == 410:
                raise Gone(f"resourceVersion {self.resource_version} is too old") from err
            raise
        self._response = resp
        self._watching = True  # from here on, an end is a watch restart
        # The server took the watch: the API is reachable again, even if this
        # resource stays quiet (no event, no bookmark) for the whole watch.
        self._connected()
        try:
            if self._stop.is_set():  # stop() came before the response was known
                return
            try:
                for line in _lines(resp):
                    if self._stop.is_set():
                        return
                    self._handle(json.loads(line), time.monotonic())
                    self._gone_in_a_row = 0
                    if self._failing or self.backoff.failures:
                        self._connected()
            except Exception as err:
                if self._stop.is_set() or not _timed_out(err):
                    raise
                raise WatchHung(
                    f"the watch sent nothing for {self.read_timeout_s:.0f} s, "
                    f"{self.hang_margin_s:.0f} s past the timeoutSeconds={self.watch_timeout_s} "
                    "the server should have closed it at: the connection is dead"
                ) from err
        finally:
            self._response = None
            resp.release_conn()

    def _handle(self, event: Mapping[str, Any], arrived: float) -> None:
        type_ = event.get("type")
        obj = event.get("object") or {}
        if type_ == "ERROR":
            if obj.get("code") == 410:
                raise Gone(obj.get("message") or "resourceVersion too old")
            raise WatchError(f"watch error {obj.get('code')}: {obj.get('message')}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if type_ in ("ADDED", "MODIFIED", "DELETED"):
            self.sink.event(self.kind, type_, obj, arrived)
        elif type_ != "BOOKMARK":
            log.warning("%s: unknown watch event type %r ignored", self.kind, type_)
            return
        if version:
            self.resource_version = str(version)

    def _call(self, kwargs: dict[str, Any], timeout: float) -> Any:
        return self.list_func(**kwargs, _preload_content=False, _request_timeout=(10, timeout))


def _lines(resp: Any) -> Iterator[str]:
    """The newline-separated events of a chunked watch response, as they come."""
    from kubernetes.watch import watch  # the client's own splitter, as its Watch uses

    split: Any = watch.iter_resp_lines  # the client has no type hints
    for line in split(resp):
        if line.strip():
            yield line


def _timed_out(err: BaseException) -> bool:
    """Is this a read timeout, however urllib3 wrapped it?"""
    import urllib3

    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, urllib3.exceptions.ReadTimeoutError | TimeoutError):
            return True
        if "timed out" in str(cause):
            return True
        nested = [a for a in getattr(cause, "args", ()) if isinstance(a, BaseException)]
        cause = cause.__cause__ or cause.__context__ or (nested[0] if nested else None)
    return False


def _status(err: Exception) -> int | None:
    status = getattr(err, "status", None)
    return status if isinstance(status, int) else None


def _describe(err: Exception) -> str:
    status = _status(err)
    if status is not None:
        reason = getattr(err, "reason", "") or ""
        return f"the API answered {status} {reason}".rstrip()
    if isinstance(err, WatchHung):
        return str(err)
    import urllib3

    if isinstance(err, urllib3.exceptions.HTTPError | OSError):
        reason = getattr(err, "reason", None)  # urllib3 wraps the cause
        cause = reason if isinstance(reason, Exception) else err
        return f"cannot reach the API server ({type(cause).__name__}: {_short(cause)})"
    return f"{type(err).__name__}: {_short(err)}"


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:200]
