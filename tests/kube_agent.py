"""An in-process Agent following a real-protocol API server (tests/apiserver.py)
in a test namespace: the Service `web` (10.96.0.10:80) with one endpoint."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from lbctl.agent.loop import Agent, AgentOptions
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.sources.informer import Backoff
from lbctl.sources.kube import KubeSource
from tests import k8s_yaml
from tests.apiserver import FakeApiServer
from tests.netlab import Netns


@contextlib.contextmanager
def kube_agent(ns: Netns, datapath: BpfDatapath) -> Iterator[tuple[Agent, FakeApiServer]]:
    from kubernetes import client

    sock = ns.open_socket()
    sock.bind(("127.0.0.1", 0))
    server = FakeApiServer(sock).start()
    ns.on_delete(server.stop)
    server.create(k8s_yaml.service("web", "10.96.0.10", [("http", "TCP", 80)]))
    server.create(k8s_yaml.endpoint_slice("web", ["10.9.0.1"], [("http", "TCP", 8080)]))
    conf = client.Configuration()
    conf.host = server.url
    conf.retries = False
    with ns.entered():  # the reflector threads inherit the namespace
        source = KubeSource(client.ApiClient(conf), "node-a", backoff=lambda: Backoff(0.05, 0.3))
        source.start()
    try:
        yield Agent(source, datapath, AgentOptions(interfaces=[])), server
    finally:
        source.stop()
