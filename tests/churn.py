"""A writer that keeps Services and EndpointSlices changing in the test API server,
for tests/test_reliability_api.py: adds, changes, removes and re-creates valid
objects (c<i>, each with its own addresses and NodePorts: no clashes), seeded,
from a thread of its own until stopped."""

from __future__ import annotations

import collections
import random
import threading
from typing import Any

from tests import k8s_yaml
from tests.apiserver import ApiError, FakeApiServer

NODE = "node-a"  # the agent's node; endpoints are on it or on node-b

CONDITIONS = [k8s_yaml.READY, k8s_yaml.READY, k8s_yaml.TERMINATING, k8s_yaml.GONE, {"ready": False}]


class Churn:
    """Adds, changes, removes and re-creates valid Services and EndpointSlices
    (c<i>, each with its own addresses and NodePorts: no clashes), seeded."""

    def __init__(self, server: FakeApiServer, seed: int, services: int) -> None:
        self.server = server
        self.rng = random.Random(seed)
        self.services = services
        self.ops: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    # -- objects ----------------------------------------------------------------------

    def service(self, i: int) -> dict[str, Any]:
        rng = self.rng
        # wrr, maglev and sh take a row of lb_tables per frontend, 64 rows in all:
        # every fourth Service may use them, with at most 4 frontends (2 ports,
        # ClusterIP and a NodePort), so that even the full form's 60 stay within
        # (running out is another suite's subject: which frontends get a row
        # would then depend on the order of events, and a fresh sync differ)
        tables = i % 4 == 0
        ports = [("http", "TCP", 80)] + ([("dns", "UDP", 53)] if rng.random() < 0.5 else [])
        kind = rng.choice(["ClusterIP", "NodePort"] if tables else
                          ["ClusterIP", "ClusterIP", "NodePort", "LoadBalancer"])  # fmt: skip
        obj = k8s_yaml.service(f"c{i}", f"10.96.1.{i}", ports, type=kind)
        spec = obj["spec"]
        if kind != "ClusterIP":
            for j, port in enumerate(spec["ports"]):
                port["nodePort"] = 30000 + 2 * i + j
            if rng.random() < 0.4:
                spec["externalTrafficPolicy"] = "Local"
        if kind == "LoadBalancer":
            obj["status"] = {"loadBalancer": {"ingress": [{"ip": f"203.0.113.{i}"}]}}
            if rng.random() < 0.5:
                spec["loadBalancerSourceRanges"] = [f"198.18.{i}.0/24"]
        if rng.random() < 0.2 and not tables:
            spec["externalIPs"] = [f"198.51.100.{i}"]
        if rng.random() < 0.2:
            spec["internalTrafficPolicy"] = "Local"
        if rng.random() < 0.2:
            spec["sessionAffinity"] = "ClientIP"
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": rng.randint(1, 600)}}
        scheduler = rng.choice([None, None, "rr", "lc", *(["wrr", "maglev", "sh"] * tables)])
        if scheduler:
            obj["metadata"]["annotations"] = {"lbctl.io/scheduler": scheduler}
        return obj

    def slice(self, i: int, suffix: str) -> dict[str, Any]:
        rng = self.rng
        pool = [f"10.1.{i}.{n}" for n in range(1, 13)]
        addresses = rng.sample(pool, rng.randint(0, 5))
        obj = k8s_yaml.endpoint_slice(
            f"c{i}",
            addresses,
            [("http", "TCP", 8080), ("dns", "UDP", 5353)],
            suffix=suffix,
            nodes={a: rng.choice([NODE, "node-b"]) for a in addresses},
            conditions={a: rng.choice(CONDITIONS) for a in addresses},
            hints={a: [rng.choice(["zone-a", "zone-b"])] for a in addresses}
            if rng.random() < 0.3
            else None,
        )
        if rng.random() < 0.2:
            weights = ",".join(f"{a}={rng.randint(1, 5)}" for a in addresses)
            obj["metadata"]["annotations"] = {"lbctl.io/weights": weights}
        return obj

    # -- changes ----------------------------------------------------------------------

    def seed(self) -> None:
        for i in range(1, self.services + 1):
            self.server.apply(self.service(i))
            self.server.apply(self.slice(i, "a"))

    def step(self) -> None:
        rng, server = self.rng, self.server
        i = rng.randint(1, self.services)
        suffix = rng.choice("ab")
        has_service = server.get("services", "test", f"c{i}") is not None
        has_slice = server.get("endpointslices", "test", f"c{i}-{suffix}") is not None
        op = rng.choices(
            ["endpoints", "service", "delete service", "delete slice", "recreate service",
             "recreate slice", "move slice"],
            weights=[40, 15, 8, 8, 8, 6, 5],
        )[0]  # fmt: skip
        if op == "endpoints" or (op == "delete slice" and not has_slice):
            op = "endpoints"
            server.apply(self.slice(i, suffix))
        elif op == "service" or not has_service:
            op = "service" if has_service else "create service"
            server.apply(self.service(i))
        elif op == "delete service":
            server.delete("services", "test", f"c{i}")
            for s in "ab":  # the garbage collector's part, most of the time
                if rng.random() < 0.8 and server.get("endpointslices", "test", f"c{i}-{s}"):
                    server.delete("endpointslices", "test", f"c{i}-{s}")
        elif op == "delete slice":
            server.delete("endpointslices", "test", f"c{i}-{suffix}")
        elif op == "recreate service":
            server.delete("services", "test", f"c{i}")
            server.create(self.service(i))
        elif op == "recreate slice":
            if has_slice:
                server.delete("endpointslices", "test", f"c{i}-{suffix}")
            server.create(self.slice(i, suffix))
        else:  # the slice now belongs to another Service
            obj = self.slice(rng.randint(1, self.services), suffix)
            obj["metadata"]["name"] = f"c{i}-{suffix}"
            server.apply(obj)
        self.ops[op] += 1

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.rng.uniform(0.002, 0.02)):
                try:
                    self.step()
                except ApiError as err:
                    if err.code not in (404, 409):
                        raise
                    self.ops["raced with the fault injector"] += 1  # it re-made that object
        except BaseException as err:  # reported by stop()
            self.failure = err

    def start(self) -> Churn:
        self._thread = threading.Thread(target=self._run, name="churn", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        assert self.failure is None, f"the writer failed: {self.failure!r}"
