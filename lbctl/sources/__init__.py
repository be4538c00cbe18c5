"""Sources of the model: Kubernetes objects parsed, watched (kube) or read from manifests.

`Source` is what the agent asks of one: start, wait until read once, and hand
over the changes to the ServiceTable as the Services they touched.
"""

from __future__ import annotations

from typing import Any, Protocol

from lbctl.model import ServiceRef, ServiceTable


class Source(Protocol):
    @property
    def complete(self) -> bool:
        """False while part of the source cannot be read (its content is unknown)."""
        ...

    @property
    def arrived(self) -> float | None:
        """When (time.monotonic) the oldest change the last poll applied reached lbctl."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the whole source has been read once; False on timeout."""
        ...

    def wait(self, timeout: float) -> None:
        """Return when there may be changes to poll, at the latest after `timeout`."""
        ...

    def poll(self, table: ServiceTable) -> set[ServiceRef]: ...

    def describe(self) -> dict[str, Any]:
        """What /statusz says of the source: its kind, its location, whether it is complete."""
        ...

    def rejected(self) -> list[dict[str, str]]:
        """What the source refused (objects, files), each with where and the reason."""
        ...
