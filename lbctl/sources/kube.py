"""KubeSource: Services, EndpointSlices and this node from the Kubernetes API.

Three reflectors (lbctl/sources/informer.py) follow the API; each hands over LISTs
and watch events from its own thread.  They are parsed there into the model
and queued, one pending change per object (a later event for the same object
replaces an earlier one), and the agent's `poll` applies the queue to its
ServiceTable.  A re-LIST (after a 410, or an outage) is diffed by
resourceVersion against what was handed over before: unchanged objects are
not touched, vanished ones are removed, and one deleted and made again under
the same name (a new uid) is a new object.

Bad objects never stop the others: an invalid one is reported and its last
valid version kept (unless it is a new object of the old one's name); Services another proxy owns
(service.kubernetes.io/service-proxy-name), headless and ExternalName ones
are left alone, as kube-proxy does.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lbctl.model import EndpointSlice, Node, Service, ServiceRef, ServiceTable
from lbctl.sources.informer import Backoff, Reflector
from lbctl.sources.parse import (
    Ignored,
    InvalidObject,
    meta_ref,
    parse_checked,
    parse_endpoint_slice,
    parse_node,
    parse_service,
)

log = logging.getLogger(__name__)

SERVICE, SLICE, NODE = "Service", "EndpointSlice", "Node"
# Set by the EndpointSlice controller: when the Pod or Service change that led
# to this version of the slice happened (RFC 3339).
TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"
Key = tuple[str, str]
Parsed = Service | EndpointSlice | Node | None  # None: the object is gone (or ignored)

_PARSERS: dict[str, Callable[[Mapping[str, Any]], Parsed]] = {
    SERVICE: parse_service,
    SLICE: parse_endpoint_slice,
    NODE: parse_node,
}


def api_client(kubeconfig: Path | None, in_cluster: bool) -> Any:
    """A kubernetes ApiClient from a kubeconfig file or the pod's service account."""
    from kubernetes import client
    from kubernetes import config as kube_config

    conf = client.Configuration()
    load_incluster: Any = kube_config.load_incluster_config  # the client has no type hints
    load_kubeconfig: Any = kube_config.load_kube_config
    try:
        if in_cluster:
            load_incluster(client_configuration=conf)
        else:
            load_kubeconfig(config_file=str(kubeconfig), client_configuration=conf)
    except (kube_config.ConfigException, OSError, ValueError) as err:
        where = "in-cluster configuration" if in_cluster else f"kubeconfig {kubeconfig}"
        fix = (
            "run lbctl in a pod with a service account, or use --kubeconfig; "
            "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must name an API server "
            "address that works without a Service proxy (deploy/configmap.yaml's "
            "apiServerHost and apiServerPort set them)"
            if in_cluster
            else "check the file, its current context and the files it names"
        )
        raise RuntimeError(f"{where}: {' '.join(str(err).split())}; {fix}") from err
    conf.retries = False  # the reflectors retry, with backoff, and say why
    return client.ApiClient(conf)


@dataclasses.dataclass
class _Change:
    kind: str
    key: Key
    obj: Parsed
    arrived: float
    triggered: float | None = None  # an EndpointSlice's trigger time (time.time)


class KubeSource:
    def __init__(
        self,
        api_client: Any,
        node_name: str,
        *,
        page_size: int = 1000,
        watch_timeout_s: int = 300,
        hang_margin_s: float = 30.0,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        from kubernetes import client  # imported late: manifest mode does not need it

        core = client.CoreV1Api(api_client)
        discovery = client.DiscoveryV1Api(api_client)
        self.node_name = node_name
        self.server = str(getattr(api_client.configuration, "host", ""))  # for `lbctl status`
        lists: dict[str, tuple[Any, dict[str, str]]] = {
            SERVICE: (core.list_service_for_all_namespaces, {}),
            SLICE: (discovery.list_endpoint_slice_for_all_namespaces, {}),
            NODE: (core.list_node, {"field_selector": f"metadata.name={node_name}"}),
        }
        self.reflectors = {
            kind: Reflector(
                kind,
                list_func,
                self,
                page_size=page_size,
                watch_timeout_s=watch_timeout_s,
                hang_margin_s=hang_margin_s,
                backoff=backoff(),
                **selectors,
            )
            for kind, (list_func, selectors) in lists.items()
        }
        self.arrived: float | None = None  # when the oldest change of the last poll came
        # The trigger times (time.time) of the EndpointSlice changes the last poll
        # applied, for the network programming latency.  Changes made before the
        # agent started are left out: a first LIST would report their age.
        self.triggers: list[float] = []
        self.started_at = time.time()
        self.changes_total = {SERVICE: 0, SLICE: 0, NODE: 0}  # changes applied, by kind
        self.problems: dict[tuple[str, Key], str] = {}  # invalid objects, by kind and name
        self.trouble_by_kind: dict[str, str] = {}  # resources that cannot be followed now
        # (uid, resourceVersion) of each object handed over, by kind
        self._versions: dict[str, dict[Key, tuple[str, str]]] = {kind: {} for kind in _PARSERS}
        self._pending: dict[tuple[str, Key], _Change] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._listed: set[str] = set()
        self._ready = threading.Event()
        self._started = False

    # -- the Source interface (agent side) ------------------------------------------

    def start(self) -> None:
        if not self._started:
            self._started = True
            for reflector in self.reflectors.values():
                reflector.start()

    def stop(self) -> None:
        for reflector in self.reflectors.values():
            reflector.stop()
        for reflector in self.reflectors.values():
            reflector.join()

    @property
    def complete(self) -> bool:
        """True once Services and EndpointSlices have each been listed whole."""
        return self._ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def wait(self, timeout: float) -> None:
        """Return when changes are queued, or after `timeout` seconds."""
        self._wake.wait(timeout)

    def describe(self) -> dict[str, Any]:
        return {"kind": "kubernetes", "location": self.server, "complete": self.complete}

    def rejected(self) -> list[dict[str, str]]:
        problems = dict(self.problems)
        return [{"where": "API server", "reason": problems[k]} for k in sorted(problems)]

    def poll(self, table: ServiceTable) -> set[ServiceRef]:
        """Apply the queued changes to the table; return the services touched."""
        with self._lock:
            self._wake.clear()
            if self._ready.is_set():
                changes, self._pending = self._pending, {}
            else:
                # Services without their EndpointSlices would look endpoint-less and
                # empty adopted frontends: hold both until each has been listed once.
                changes = {k: c for k, c in self._pending.items() if c.kind == NODE}
                for k in changes:
                    del self._pending[k]
        touched: set[ServiceRef] = set()
        self.arrived = min((c.arrived for c in changes.values()), default=None)
        self.triggers = [
            c.triggered
            for c in changes.values()
            if c.triggered is not None and c.triggered >= self.started_at
        ]
        for change in changes.values():
            self.changes_total[change.kind] += 1
            obj = change.obj
            if change.kind == SERVICE:
                if isinstance(obj, Service):
                    touched.add(table.set_service(obj))
                else:
                    touched.add(table.remove_service(ServiceRef(*change.key)))
            elif change.kind == SLICE:
                if isinstance(obj, EndpointSlice):
                    touched |= table.set_slice(obj)
                else:
                    touched |= table.remove_slice(change.key)
            else:
                table.node = obj if isinstance(obj, Node) else None
        return touched

    # -- the Sink interface (reflector side, one thread per kind) -----------------

    def replace(self, kind: str, items: list[Mapping[str, Any]], arrived: float) -> None:
        old = self._versions[kind]
        new: dict[Key, tuple[str, str]] = {}
        changes = []
        for obj in items:
            key = meta_ref(obj)
            new[key] = _identity(obj)
            if old.get(key) != new[key] or not new[key][1]:
                changes.append(self._parse(kind, key, obj, arrived, old.get(key)))
        gone = [_Change(kind, key, None, arrived) for key in old if key not in new]
        for change in gone:
            self.problems.pop((kind, change.key), None)
        self._versions[kind] = new
        if kind == NODE and all(name != self.node_name for _, name in new):
            log.warning("Node %s is not in the API; running without its zone", self.node_name)
        self._queue([c for c in changes if c is not None] + gone)
        self._listed.add(kind)
        if {SERVICE, SLICE} <= self._listed:
            self._ready.set()

    def event(self, kind: str, type_: str, obj: Mapping[str, Any], arrived: float) -> None:
        key = meta_ref(obj)
        versions = self._versions[kind]
        if type_ == "DELETED":
            versions.pop(key, None)
            self.problems.pop((kind, key), None)
            self._queue([_Change(kind, key, None, arrived)])
            return
        known = versions.get(key)
        versions[key] = _identity(obj)
        change = self._parse(kind, key, obj, arrived, known)
        if change is not None:
            self._queue([change])

    def trouble(self, kind: str, message: str | None) -> None:
        if message is None:
            self.trouble_by_kind.pop(kind, None)
        else:
            self.trouble_by_kind[kind] = message

    # -- helpers --------------------------------------------------------------------

    def _parse(
        self,
        kind: str,
        key: Key,
        obj: Mapping[str, Any],
        arrived: float,
        known: tuple[str, str] | None,
    ) -> _Change | None:
        """The change an object makes; None when it is invalid and its last valid
        version stays.  `known` is the (uid, resourceVersion) handed over before:
        a new uid is a new object of the same name (the old one was deleted and
        this one made while the watch was away), and an invalid new object
        removes the old one, as its DELETED event would have."""
        name = f"{kind} {key[0]}/{key[1]}" if kind != NODE else f"Node {key[1]}"
        replaced = known is not None and known[0] != _identity(obj)[0]
        try:
            parsed = parse_checked(_PARSERS[kind], obj)
        except Ignored as why:
            log.debug("%s: ignored: %s", name, why)
            parsed = None
        except InvalidObject as err:
            kept = (
                "removing the object of this name it replaced (another uid)"
                if replaced
                else "keeping its previous version, if any"
            )
            message = f"{name}: {err}; {kept}"
            if self.problems.get((kind, key)) != message:
                log.error("%s", message)
            self.problems[(kind, key)] = message
            return _Change(kind, key, None, arrived) if replaced else None
        self.problems.pop((kind, key), None)
        triggered = _trigger_time(obj) if kind == SLICE and parsed is not None else None
        return _Change(kind, key, parsed, arrived, triggered)

    def pending(self) -> dict[str, int]:
        """Changes queued and not yet applied, by kind."""
        with self._lock:
            kinds = [kind for kind, _ in self._pending]
        return {kind: kinds.count(kind) for kind in (SERVICE, SLICE, NODE)}

    def _queue(self, changes: list[_Change]) -> None:
        if not changes:
            return
        with self._lock:
            for change in changes:
                slot = (change.kind, change.key)
                earlier = self._pending.get(slot)
                if earlier is not None:  # coalesce, keeping when the first one came
                    change.arrived = min(change.arrived, earlier.arrived)
                    if change.triggered is None or (
                        earlier.triggered is not None and earlier.triggered < change.triggered
                    ):
                        change.triggered = earlier.triggered
                self._pending[slot] = change
        self._wake.set()


def _identity(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(uid, resourceVersion): a deleted and re-made object has a new uid."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return ("", "")
    return (str(meta.get("uid") or ""), str(meta.get("resourceVersion") or ""))


def _trigger_time(obj: Mapping[str, Any]) -> float | None:
    """The EndpointSlice's last-change-trigger-time annotation, or None."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    text = annotations.get(TRIGGER_TIME) if isinstance(annotations, Mapping) else None
    if not isinstance(text, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()
