"""Reliability: malformed and hostile objects never take the agent down.

Three levels:

1. The parsers, property-based (hypothesis): any JSON value at any field of a
   valid Service, EndpointSlice or Node is either used or refused with a
   reason that names a field; nothing else escapes, nothing takes long.
2. The real agent (`lbctl run --manifests DIR`) in a node namespace, fed
   thousands of generated bad objects (tests/hostile.py) in batches of files,
3. and the real agent following the test API server (tests/apiserver.py), fed
   the same kinds of objects through the API.

After each batch: the agent is up and /healthz answers 200; every bad object
is reported in `lbctl status` (/statusz) and in the log with its name and a
reason naming the field; the odd-but-valid ones are served (an address with
leading zeros is read as decimal, as Kubernetes reads it); and the good
Service `web` in the same directory or API answers real TCP and UDP from the
client pod.  Then the batch is removed and its reports must go with it.
"""

from __future__ import annotations

import collections
import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbctl.sources.manifests import ObjectId
from lbctl.sources.parse import (
    Ignored,
    InvalidObject,
    meta_ref,
    parse_checked,
    parse_endpoint_slice,
    parse_node,
    parse_service,
)
from tests import hostile, k8s_yaml
from tests.agent_proc import AgentProcess, lbctl
from tests.apiserver import FakeApiServer
from tests.netlab import (
    Cluster,
    Lab,
    Netns,
    TcpServer,
    UdpServer,
    build_cluster,
    tcp_request,
    udp_request,
)
from tests.reliability import healthz, report, scaled, statusz, wait_for

pytestmark = [pytest.mark.reliability, pytest.mark.netns]

PARSERS: dict[str, Any] = {
    "Service": parse_service,
    "EndpointSlice": parse_endpoint_slice,
    "Node": parse_node,
}
NODE = "node-a"
VIP = "10.96.0.10"
WEB_PORTS = [("http", "TCP", 80), ("dns", "UDP", 53)]
WEB_TARGETS = [("http", "TCP", 8080), ("dns", "UDP", 5353)]
CASES = scaled(1_000, 5_000)  # objects through each of the two sources
BATCH = scaled(250, 500)


# -- 1. the parsers, property-based ---------------------------------------------------

TEMPLATES: dict[str, dict[str, Any]] = {
    "Service": hostile.service("web", "10.96.0.10", type="LoadBalancer")
    | {"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}]}}},
    "EndpointSlice": hostile.endpoint_slice("web-a", "web", ["10.244.0.20", "10.244.0.21"]),
    "Node": hostile.node(NODE),
}
TEMPLATES["Service"]["spec"].update(
    externalIPs=["192.0.2.1"],
    sessionAffinity="ClientIP",
    sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
    loadBalancerSourceRanges=["203.0.113.0/24"],
    externalTrafficPolicy="Local",
)
TEMPLATES["EndpointSlice"]["endpoints"][0].update(
    nodeName=NODE, zone="zone-a", hints={"forZones": [{"name": "zone-a"}]}
)


def _paths(value: Any, prefix: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """Every field of a template, as the keys (and list indexes) that lead to it."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        path = (*prefix, key)
        yield path
        if isinstance(item, dict | list) and item:
            yield from _paths(item, path)


FIELDS = [(kind, path) for kind, obj in TEMPLATES.items() for path in _paths(obj)]
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from([*hostile.BAD_IPS, "10.0.0.1", "010.0.0.1", "TCP", "None"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def test_any_value_in_any_field_is_used_or_refused_naming_a_field(
    capsys: pytest.CaptureFixture[str],
) -> None:
    outcomes: collections.Counter[str] = collections.Counter()
    slowest = 0.0

    @settings(
        max_examples=scaled(1_000, 20_000),
        deadline=None,
        derandomize=True,  # the same examples every run: a failure reproduces
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(st.sampled_from(FIELDS), JSON)
    def check(field: tuple[str, tuple[str | int, ...]], value: Any) -> None:
        nonlocal slowest
        kind, path = field
        obj = hostile.with_value(TEMPLATES[kind], path, value)
        started = time.monotonic()
        try:
            parse_checked(PARSERS[kind], obj)
            outcomes["used"] += 1
        except Ignored:
            outcomes["ignored"] += 1
        except InvalidObject as err:
            outcomes["refused"] += 1
            message = str(err)
            assert not message.startswith("malformed object"), (kind, path, value, message)
            assert len(message) < 600, message
            top = message.split(":")[0].split(".")[0].split("[")[0]
            assert top == path[0] or message.startswith("metadata.name"), (kind, path, message)
        slowest = max(slowest, time.monotonic() - started)

    check()  # a parse that never ends (the alias bomb did) hangs here: no timing is asserted
    report(
        capsys,
        "input",
        "parsers, any JSON value at any field (hypothesis)",
        [
            f"{sum(outcomes.values())} objects over {len(FIELDS)} fields: "
            f"{outcomes['refused']} refused naming the field, {outcomes['used']} used, "
            f"{outcomes['ignored']} ignored; 0 escaped; slowest parse {slowest * 1000:.1f} ms",
        ],
    )


# -- the node, its pods and the good Service ------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Lab() as lab:
        world = build_cluster(lab, pods=2)
        for pod in world.pods:
            TcpServer(pod, 8080)
            UdpServer(pod, 5353)
        yield world


def web(cluster: Cluster) -> list[dict[str, Any]]:
    svc = k8s_yaml.service("web", VIP, WEB_PORTS, type="NodePort")
    svc["spec"]["ports"][0]["nodePort"] = hostile.CLASH_NODE_PORT
    return [svc, k8s_yaml.endpoint_slice("web", [p.ip for p in cluster.pods], WEB_TARGETS)]


def serving(cluster: Cluster) -> int:
    """The good Service answers TCP and UDP from the client pod; returns the requests made."""
    pods = {p.name for p in cluster.pods}
    for _ in range(3):
        assert tcp_request(cluster.client, VIP, 80, timeout=5).pod in pods
        assert udp_request(cluster.client, VIP, 53, timeout=5).pod in pods
    return 6


class Tally:
    """What one source was fed, and what came of it, for the figures."""

    def __init__(self) -> None:
        self.by_what: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.requests = 0
        self.health_checks = 0
        self.batches = 0

    def rows(self, source: str, seconds: float) -> list[str]:
        total = sum(self.outcomes.values())
        kinds = [f"{n} {what}" for what, n in sorted(self.by_what.items(), key=lambda i: -i[1])]
        lines = [", ".join(kinds[i : i + 4]) for i in range(0, len(kinds), 4)]
        return [
            f"{total} objects through {source} in {self.batches} batches, {seconds:.0f} s",
            f"refused and reported with object and reason: {self.outcomes['bad']}; served: "
            f"{self.outcomes['served']}; left alone: {self.outcomes['ignored']}",
            f"agent crashes 0; /healthz 200 at all {self.health_checks} checks; good Service "
            f"answered all {self.requests} TCP and UDP requests between batches",
            "kinds:",
            *(f"  {line}" for line in lines),
        ]


def expected_reason(case: hostile.Case, obj: dict[str, Any]) -> str:
    """What the parser says of the object (the agent must report exactly it)."""
    try:
        parse_checked(PARSERS[case.kind], obj)
    except InvalidObject as err:
        return str(err)
    raise AssertionError(f"{case.what}: the parser accepted {obj!r:.300}")


def served_frontends(agent: AgentProcess) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for fe in agent.dump()["frontends"]:
        out[fe["service"]].append(fe)
    return out


def check_served(agent: AgentProcess, batch: list[hostile.Case]) -> None:
    """Odd-but-valid Services are programmed; left-alone ones are not."""
    want = {
        f"test/{c.companions[0]['metadata']['name'] if c.companions else c.name}": c
        for c in batch
        if (c.kind == "Service" and "already served" not in c.hint) or c.companions
    }

    deadline = time.monotonic() + 60
    while True:
        have = served_frontends(agent)
        wrong = [
            f"{name} ({c.what})"
            for name, c in want.items()
            if (name in have) != (c.outcome == "served")
        ]
        if not wrong:
            break
        assert time.monotonic() < deadline, f"programmed or not, wrongly: {wrong}"
        time.sleep(0.2)
    for fe in agent.dump()["frontends"]:  # what hostile Services claimed stays web's
        if fe["port"] == hostile.CLASH_NODE_PORT or (fe["address"], fe["port"]) == (VIP, 80):
            assert fe["service"] == "test/web", fe
    for name, case in want.items():
        if "leading zeros" in case.what:
            [fe] = have[name]
            assert not fe["address"].startswith("0"), fe  # 010.97.0.3 is 10.97.0.3
        if case.companions:
            assert len(have[name][0]["backends"]) == len(case.obj["endpoints"])  # type: ignore[index]


# -- 2. through the manifests directory ---------------------------------------------


def write_case(directory: Path, index: int, case: hostile.Case) -> Path:
    if case.raw is not None:
        path = directory / f"case-{index:05d}.yaml"
        path.write_bytes(case.raw)
    elif case.companions:  # big: JSON reads 30 times faster than YAML
        path = directory / f"case-{index:05d}.json"
        items = [case.obj, *case.companions]
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    else:
        path = directory / f"case-{index:05d}.yaml"
        path.write_text(yaml.safe_dump(case.obj, allow_unicode=True))
    return path


def test_malformed_manifests_never_stop_the_agent(
    cluster: Cluster, tmp_path: Path, pin_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    k8s_yaml.write(manifests / "web.yaml", *web(cluster))
    tally = Tally()
    started = time.monotonic()
    agent = AgentProcess(
        cluster.node, manifests, pin_dir, tmp_path / "agent.log", "--hostname-override", NODE
    )
    with agent:
        agent.wait_for_log("synced:")
        tally.requests += serving(cluster)
        cases = list(hostile.cases(seed=20_25, count=CASES))
        for first in range(0, len(cases), BATCH):
            batch = cases[first : first + BATCH]
            paths = [write_case(manifests, first + i, c) for i, c in enumerate(batch)]
            expect = {}
            for path, case in zip(paths, batch, strict=True):
                tally.by_what[case.what] += 1
                tally.outcomes[case.outcome] += 1
                if case.outcome == "bad" and "already served" in case.hint:
                    expect[f"Service test/{case.name}"] = case.hint
                elif case.outcome == "bad" and case.obj is not None:
                    oid = _object_id(case.obj)
                    expect[str(path)] = f"{oid}: {expected_reason(case, case.obj)}"
                elif case.outcome == "bad":
                    expect[str(path)] = case.hint

            found = wait_reported(cluster.node, expect)
            for where, reason in expect.items():
                assert reason in found[where], (where, found[where])
            stray = set(found) - set(expect)
            assert not stray, f"reports of objects that are not bad: {stray}"
            status = lbctl("status", "-o", "json", node=cluster.node, check=False)
            doc = json.loads(status.stdout)["agent"]["status"]
            assert {r["where"] for r in doc["errors"]["rejected"]} == set(expect)
            log = agent.log_text()
            for path in paths:
                if str(path) in expect:
                    assert f"{path}: {expect[str(path)]}" in log or (
                        f"{path}: " in log and expect[str(path)] in log
                    ), f"never logged: {path}: {expect[str(path)]}"
            check_served(agent, batch)
            assert healthz(cluster.node) == 200
            tally.health_checks += 1
            tally.requests += serving(cluster)
            for path in paths:
                path.unlink()
            wait_for("the batch's reports gone with its files", _no_reports(cluster), 60)
            tally.batches += 1
        assert agent.proc is not None and agent.proc.poll() is None, "the agent exited"
        report(capsys, "input", "malformed objects, manifests", tally.rows(
            "the manifests directory", time.monotonic() - started))  # fmt: skip


def reports(node: Netns) -> dict[str, str]:
    """The agent's rejected objects: where (a file, a Service, or for the API the
    object named in the reason) -> reason."""
    found = {}
    for r in statusz(node)["errors"]["rejected"]:
        where = r["where"] if r["where"] != "API server" else r["reason"].split(":")[0]
        found[where] = r["reason"]
    return found


def wait_reported(node: Netns, expect: dict[str, str]) -> dict[str, str]:
    """Wait until every object of `expect` is reported; return the reports."""
    deadline = time.monotonic() + 120
    while True:
        found = reports(node)
        if set(expect) <= set(found):
            return found
        missing = sorted(set(expect) - set(found))
        assert time.monotonic() < deadline, f"never reported: {missing[:5]} ({len(missing)})"
        time.sleep(0.2)


def _object_id(obj: dict[str, Any]) -> ObjectId:
    kind = obj["kind"]
    namespace, name = meta_ref(obj)
    return ObjectId(kind, "" if kind == "Node" else namespace, name)


def _no_reports(cluster: Cluster) -> Any:
    return lambda: not statusz(cluster.node)["errors"]["rejected"]


# -- 3. through the API -----------------------------------------------------------------


def test_malformed_api_objects_never_stop_the_agent(
    cluster: Cluster, tmp_path: Path, pin_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = cluster.node
    sock = node.open_socket()
    sock.bind(("127.0.0.1", 0))
    server = FakeApiServer(sock, bookmark_interval=0.5).start()
    try:
        for obj in web(cluster):
            server.create(obj)
        server.create(hostile.node(NODE))
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        args = ("--kubeconfig", str(kubeconfig), "--hostname-override", NODE)
        tally = Tally()
        started = time.monotonic()
        with AgentProcess(node, None, pin_dir, tmp_path / "agent.log", *args) as agent:
            agent.wait_for_log("synced:")
            tally.requests += serving(cluster)
            _feed_the_api(server, cluster, agent, tally)
            assert agent.proc is not None and agent.proc.poll() is None, "the agent exited"
        report(capsys, "input", "malformed objects, API", tally.rows(
            "the API", time.monotonic() - started))  # fmt: skip
    finally:
        server.stop()


def _feed_the_api(
    server: FakeApiServer, cluster: Cluster, agent: AgentProcess, tally: Tally
) -> None:
    cases, names = [], set()
    for case in hostile.cases(seed=20_26, count=CASES * 2, node_name=NODE):
        key = (case.kind, *meta_ref(case.obj or {}))
        if case.api and (key not in names or case.kind == "Node") and len(cases) < CASES:
            cases.append(case)  # a bad name drawn twice is left out: one object per name
            names.add(key)
    for first in range(0, len(cases), BATCH):
        batch, expect, made, nodes = [], {}, [], []
        for case in cases[first : first + BATCH]:
            assert case.obj is not None
            key = (case.kind, *meta_ref(case.obj))
            tally.by_what[case.what] += 1
            tally.outcomes[case.outcome] += 1
            batch.append(case)
            if case.kind == "Node":  # the agent sees its own Node only: one at a time
                stored = server.apply(copy.deepcopy(case.obj))
                nodes.append(f"Node {NODE}: {expected_reason(case, stored)}")
                continue
            for companion in case.companions:
                made.append((("Service", *meta_ref(companion)), server.create(companion)))
            stored = server.create(copy.deepcopy(case.obj))
            made.append((key, stored))  # deleted by its real name: meta_ref escapes some
            if case.outcome == "bad" and "already served" in case.hint:
                expect[f"Service test/{case.name}"] = case.hint
            elif case.outcome == "bad":
                name = "{} {}/{}".format(case.kind, *meta_ref(stored))
                expect[name] = f"{name}: {expected_reason(case, stored)}"

        found = wait_reported(cluster.node, expect)
        for where, reason in expect.items():
            assert reason in found[where], (where, found[where])
        stray = set(found) - set(expect) - {f"Node {NODE}"}
        assert not stray, f"reports of objects that are not bad: {stray}"
        log = agent.log_text()
        for line in nodes:
            assert line in log, f"never logged: {line}"
        check_served(agent, batch)
        assert healthz(cluster.node) == 200
        tally.health_checks += 1
        tally.requests += serving(cluster)
        for (kind, _, _), stored in made:
            server.delete(kind, stored["metadata"]["namespace"], stored["metadata"]["name"])
        server.apply(hostile.node(NODE))
        wait_for("the batch's reports gone with its objects", _no_reports(cluster), 60)
        tally.batches += 1
