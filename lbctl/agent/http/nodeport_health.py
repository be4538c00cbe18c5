"""healthCheckNodePort servers: one HTTP server per LoadBalancer Service with
externalTrafficPolicy Local, as kube-proxy serves them.

A cloud load balancer probes every node on the Service's
spec.healthCheckNodePort and sends traffic only to nodes that answer 200.
Any path answers; the JSON body names the Service and counts its ready
endpoints on this node:

    {"service": {"namespace": "ns", "name": "web"}, "localEndpoints": 2,
     "serviceProxyHealthy": true}

200 when that count is above 0 and the agent is healthy, else 503 (a node
whose local endpoints are only terminating fails, so the balancer drains
it).  Headers: Content-Type application/json, X-Content-Type-Options nosniff.

The servers follow the model: after each poll the agent hands over the
Services it touched, and their servers are opened, moved or closed.  They
listen on every address, or on the NodePort addresses when
nodePortAddresses is set.  A port that cannot be bound (another process
holds it) is logged, counted in the metrics and retried after each later
poll; it never stops the agent.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

from lbctl.model import Service, ServiceRef, ServiceTable

log = logging.getLogger(__name__)


def wanted(svc: Service | None) -> int | None:
    """The health check port a Service needs from this node, or None."""
    if svc is None or svc.type != "LoadBalancer" or svc.external_traffic_policy != "Local":
        return None
    return svc.health_check_node_port


def local_endpoints(table: ServiceTable, ref: ServiceRef, node_name: str | None) -> int:
    """Ready endpoints of the Service on this node, each address counted once."""
    if node_name is None:
        return 0
    here = {
        ep.addresses[0]
        for eps in table.slices_of(ref)
        for ep in eps.endpoints
        if ep.ready and ep.node_name == node_name and ep.addresses
    }
    return len(here)


class _Handler(BaseHTTPRequestHandler):
    checks: ClassVar[HealthChecks]
    ref: ClassVar[ServiceRef]
    timeout = 10

    def do_GET(self) -> None:
        count = self.checks.counts.get(self.ref, 0)
        healthy = self.checks.healthy()
        body = {
            "service": {"namespace": self.ref.namespace, "name": self.ref.name},
            "localEndpoints": count,
            "serviceProxyHealthy": healthy,
        }
        raw = json.dumps(body, indent=1).encode() + b"\n"
        self.send_response(200 if count and healthy else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a load balancer's open probe never holds a close


class _Instance:
    """The servers of one Service's port, one per listening address."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.servers: list[tuple[_Server, threading.Thread]] = []

    def close(self) -> None:
        for server, thread in self.servers:
            server.shutdown()
            server.server_close()
            thread.join()
        self.servers = []


class HealthChecks:
    """Opens and closes the health check servers as Services come and go."""

    def __init__(
        self,
        healthy: Callable[[], bool],
        node_name: str | None,
        addresses: Callable[[], Iterable[str]] = lambda: ("0.0.0.0",),
    ) -> None:
        self.healthy = healthy
        self.node_name = node_name
        self.addresses = addresses  # where to listen, asked at each open
        self.counts: dict[ServiceRef, int] = {}  # local ready endpoints, read by the servers
        self.ports: dict[ServiceRef, int] = {}  # the port each Service wants
        self.errors: dict[ServiceRef, str] = {}  # why a wanted port is not served
        self._open: dict[ServiceRef, _Instance] = {}
        self._lock = threading.Lock()

    def update(self, table: ServiceTable, refs: Iterable[ServiceRef]) -> None:
        """Follow the touched Services; retry the ports that failed before."""
        with self._lock:
            for ref in set(refs) | set(self.errors):
                port = wanted(table.services.get(ref))
                if port is None:
                    self.ports.pop(ref, None)
                    self.counts.pop(ref, None)
                    self.errors.pop(ref, None)
                    self._close(ref)
                    continue
                self.ports[ref] = port
                self.counts[ref] = local_endpoints(table, ref, self.node_name)
                have = self._open.get(ref)
                if have is not None and have.port != port:
                    self._close(ref)
                    have = None
                if have is None:
                    self._start(ref, port)

    @property
    def serving(self) -> dict[ServiceRef, int]:
        """Services whose server is up, and its port."""
        return {ref: inst.port for ref, inst in list(self._open.items())}

    def close(self) -> None:
        with self._lock:
            for ref in list(self._open):
                self._close(ref)

    def _start(self, ref: ServiceRef, port: int) -> None:
        handler = type("Handler", (_Handler,), {"checks": self, "ref": ref})
        inst = _Instance(port)
        try:
            for host in self.addresses():
                server = _Server((host, port), handler)
                thread = threading.Thread(
                    target=server.serve_forever, args=(0.1,), name=f"lbctl-hc-{port}"
                )
                thread.start()
                inst.servers.append((server, thread))
        except OSError as err:
            inst.close()  # what opened, so a later retry starts clean
            why = "in use" if err.errno == errno.EADDRINUSE else err.strerror or str(err)
            message = (
                f"Service {ref}: healthCheckNodePort {port} cannot be served: {why}; "
                "free the port on this node (or let the API server allocate another)"
            )
            if self.errors.get(ref) != message:
                log.error("%s", message)
            self.errors[ref] = message
            return
        self.errors.pop(ref, None)
        self._open[ref] = inst
        log.info("Service %s: serving its health check on port %d", ref, port)

    def _close(self, ref: ServiceRef) -> None:
        inst = self._open.pop(ref, None)
        if inst is not None:
            inst.close()
            log.info("Service %s: health check on port %d closed", ref, inst.port)
