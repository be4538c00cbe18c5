"""Shared parts of the API-fault, malformed-object and packet-fuzzing suites
(tests/test_reliability_{api,input,packets}.py).

Each suite runs in two sizes: the short one in `make test` and the full one in
`make bench-reliability`, which sets LBCTL_RELIABILITY=full.  Each prints its
figures (what was tried, how much, what was lost) on the terminal, and appends
them to $LBCTL_RELIABILITY_OUT when set (bench/results/reliability.txt, as the
load suites' tests/loadgen.py does).
"""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.netlab import Netns

FULL = os.environ.get("LBCTL_RELIABILITY", "short") == "full"
T = TypeVar("T")


def scaled(short: T, full: T) -> T:
    """The short form's figure, or the full form's under LBCTL_RELIABILITY=full."""
    return full if FULL else short


def report(capsys: pytest.CaptureFixture[str], suite: str, title: str, rows: Iterable[str]) -> None:
    """Print a suite's figures past pytest's capture, and append them to
    $LBCTL_RELIABILITY_OUT (`make bench-reliability` sets it)."""
    text = f"\n== reliability ({suite}): {title} ({'full' if FULL else 'short'} form)\n"
    text += "".join(f"   {row}\n" for row in rows)
    with capsys.disabled():
        print(text, end="", flush=True)
    out = os.environ.get("LBCTL_RELIABILITY_OUT")
    if out:
        with Path(out).open("a") as sink:
            sink.write(text)


def http_get(
    ns: Netns, address: tuple[str, int], path: str, timeout: float = 10
) -> tuple[int, bytes]:
    """GET from inside a namespace (the agent's health and status servers listen there)."""
    with ns.entered():
        conn = http.client.HTTPConnection(*address, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


def healthz(node: Netns) -> int:
    """The agent's /healthz status code (its default address, 0.0.0.0:10256)."""
    return http_get(node, ("127.0.0.1", 10256), "/healthz")[0]


def statusz(node: Netns) -> dict[str, Any]:
    """The agent's status document, as `lbctl status` reads it."""
    code, body = http_get(node, ("127.0.0.1", 10256), "/statusz")
    assert code == 200, f"/statusz answered {code}: {body[:200]!r}"
    doc: dict[str, Any] = json.loads(body)
    return doc


def wait_for(what: str, check: Callable[[], T | None], timeout: float) -> T:
    """Poll `check` until it returns something (not None/False); fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)
