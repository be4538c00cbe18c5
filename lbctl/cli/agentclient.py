"""Reading a running agent's JSON endpoints (/statusz, /tracez) over HTTP."""

from __future__ import annotations

import http.client
import json
from typing import Any


def get_json(address: str, host_port: tuple[str, int], path: str, timeout: float) -> Any:
    """GET `path` from the agent at `address`; OSError saying why not."""
    endpoint = path.split("?", 1)[0]
    conn = http.client.HTTPConnection(*host_port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as err:
        raise OSError(getattr(err, "strerror", None) or str(err) or type(err).__name__) from err
    finally:
        conn.close()
    if resp.status == 404:
        raise OSError(f"{address} answers but has no {endpoint} (an lbctl older than this one?)")
    if resp.status != 200:
        said = body.decode(errors="replace").strip()[:200]
        raise OSError(
            f"{address} answered {endpoint} with HTTP {resp.status}" + (f": {said}" if said else "")
        )
    try:
        return json.loads(body)
    except ValueError as err:
        raise OSError(f"{address} answered {endpoint} with something that is not JSON") from err
