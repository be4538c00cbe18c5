"""Reliability: API faults while Services and EndpointSlices keep changing.

One real agent (`lbctl run --kubeconfig`) in a node namespace follows the test
API server (tests/apiserver.py, the stand-in for kube-apiserver) through every
fault of this module in turn, while a writer thread (tests/churn.py) adds,
changes, removes and re-creates Services and EndpointSlices:

- watches cut mid-stream, again and again;
- 410 Gone: the history is compacted while the watches are away, so they must
  LIST again;
- the server down (30 s in the full form, a few in the short one);
- relists that drop and re-add objects: Services and slices deleted and made
  again under the same name (a new uid, sometimes invalid) while the watches
  are away.

After each fault, once the changes stop, the agent's real pinned BPF maps must
equal those of a second agent synced once from the API's final state (the
cilium#48050 case: stale backends after API blips): the same frontends with the
same backends in the same states, and the same number of entries in every map
of Services (a leaked backend, slot or table entry counts).  Both are read
through lbctl's own map readers (lbctl/datapath/ebpf/inspect.py, what `lbctl maps dump` prints).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbctl.agent.loop import Agent, AgentOptions
from lbctl.datapath.ebpf import inspect as dump
from lbctl.datapath.ebpf.datapath import BpfDatapath
from lbctl.sources.informer import Backoff
from lbctl.sources.kube import KubeSource
from tests import k8s_yaml
from tests.agent_proc import AgentProcess, lbctl
from tests.apiserver import FakeApiServer
from tests.churn import NODE, Churn
from tests.conftest import BPFFS, PIN_PREFIX, remove_pins, reset_datapath
from tests.netlab import Netns
from tests.reliability import http_get, report, scaled

pytestmark = [pytest.mark.reliability, pytest.mark.netns]

SERVICES = scaled(24, 60)
CHURN_S = scaled(5.0, 40.0)  # seconds of changes around each fault
OUTAGE_S = scaled(3.0, 30.0)
CONVERGE_S = 120.0  # the agent backs off up to 30 s between retries
# Maps that only the control plane writes: their entry counts must match too.
CONTROL_MAPS = (
    "lb4_services",
    "lb_slots",
    "lb_members",
    "lb4_backends",
    "lb_frontend_meta",
    "lb4_source_ranges",
    "lb_tables",
    "lb_rr",
    "lb_conns",
    "lb_conns_expired",
    "lb_fe_stats",
)
# -- the agent that lives through it all ------------------------------------------------


@dataclasses.dataclass
class World:
    ns: Netns
    server: FakeApiServer
    agent: AgentProcess
    pin_dir: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("relapi")
    ns = Netns.create("relapi")
    pin_dir = BPFFS / f"{PIN_PREFIX}relapi"
    agent: AgentProcess | None = None
    try:
        sock = ns.open_socket()
        sock.bind(("127.0.0.1", 0))
        server = FakeApiServer(sock, bookmark_interval=0.5).start()
        ns.on_delete(server.stop)
        server.create(k8s_yaml.node(NODE, zone="zone-a", addresses=["10.0.0.1"]))
        Churn(server, seed=0, services=SERVICES).seed()
        kubeconfig = server.write_kubeconfig(tmp / "kubeconfig")
        args = ("--kubeconfig", str(kubeconfig), "--hostname-override", NODE)
        agent = AgentProcess(ns, None, pin_dir, tmp / "agent.log", *args).start()
        agent.wait_for_log("synced:", timeout=180)
        yield World(ns, server, agent, pin_dir)
        assert agent.proc is not None and agent.proc.poll() is None, "the agent exited"
    finally:
        if agent is not None:
            agent.stop()
        ns.delete()
        remove_pins(pin_dir)


def canonical(pin_dir: Path) -> dict[str, Any]:
    """What the maps under pin_dir hold, without the ids a history picks: every
    frontend with its backends, and each control-plane map's number of entries."""
    data = dump.read(pin_dir, sections=("services", "maps"))
    frontends = {}
    for fe in data["frontends"]:
        key = f"{fe['address']}:{fe['port']}/{fe['protocol']} {fe['scope']}".rstrip()
        frontends[key] = {
            "service": fe["service"],
            "port": fe["port_name"],
            "kind": fe["kind"],
            "flags": fe["flags"],
            "source_ranges": sorted(fe["source_ranges"]),
            "scheduler": fe["scheduler"],
            "affinity_s": fe["affinity_timeout_s"],
            "table": (fe["table"] or {}).get("entries"),
            "backends": sorted(
                f"{b['address']}:{b['port']} {b['state']}" if not b.get("missing") else "MISSING"
                for b in fe["backends"]
            ),
        }
    fill = {name: data["maps"][name]["entries"] for name in CONTROL_MAPS}
    return {"frontends": frontends, "fill": fill}


def fresh_sync(world: World, dp: BpfDatapath) -> dict[str, Any]:
    """A second agent, synced once from the API's state now, into empty maps."""
    from kubernetes import client

    reset_datapath(dp)
    conf = client.Configuration()
    conf.host = world.server.url
    conf.retries = False
    with world.ns.entered():  # its threads, and its view of the node's addresses
        source = KubeSource(client.ApiClient(conf), NODE, backoff=lambda: Backoff(0.05, 0.3))
        source.start()
        try:
            agent = Agent(source, dp, AgentOptions(interfaces=[], node_name=NODE))
            agent.sync()
            node = source.reflectors["Node"]
            deadline = time.monotonic() + 10
            while not node.lists and time.monotonic() < deadline:
                time.sleep(0.05)
            agent.step(node_scan=True)  # the Node (its zone) may come after the first sync
        finally:
            source.stop()
    return canonical(dp.settings.pin_dir)


def differences(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(got["frontends"]) | set(want["frontends"])):
        g, w = got["frontends"].get(key), want["frontends"].get(key)
        if g is None:
            out.append(f"missing frontend {key} ({w['service']})")
        elif w is None:
            out.append(f"stale frontend {key} ({g['service']}: {g['backends']})")
        elif g != w:
            fields = {f: (g[f], w[f]) for f in g if g[f] != w[f]}
            out.append(f"frontend {key} differs (agent, fresh): {fields}")
    for name in CONTROL_MAPS:
        if got["fill"][name] != want["fill"][name]:
            out.append(
                f"{name}: {got['fill'][name]} entries, a fresh sync has {want['fill'][name]}"
            )
    return out


def metrics(world: World) -> dict[str, float]:
    """The agent's source counters (re-LISTs, watch restarts by reason)."""
    code, body = http_get(world.ns, ("127.0.0.1", 10249), "/metrics")
    assert code == 200
    out: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == "lbctl_source_lists_total":
                out["lists"] += s.value
            elif s.name == "lbctl_source_watch_restarts_total":
                out[f"restarts {s.labels['reason']}"] += s.value
    return out


def converged(world: World, dp: BpfDatapath) -> tuple[dict[str, Any], float]:
    """Once the writer stopped: the agent's maps equal a fresh sync (within the bound)."""
    stopped = time.monotonic()
    want = fresh_sync(world, dp)
    deadline = stopped + CONVERGE_S
    while True:
        got = canonical(world.pin_dir)
        diff = differences(got, want)
        if not diff:
            break
        if time.monotonic() > deadline:
            code, body = http_get(world.ns, ("127.0.0.1", 10256), "/statusz")
            doc = json.loads(body) if code == 200 else {}
            said = [f"agent status {code}: counts {doc.get('counts')}"]
            said += [f"agent error: {e}" for e in (doc.get("errors") or {}).get("current", [])[:5]]
            raise AssertionError(
                "the agent's maps never equalled a fresh sync:\n" + "\n".join(diff[:30] + said)
            )
        time.sleep(0.2)
    seconds = time.monotonic() - stopped
    # the same through `lbctl maps dump -o json`, the CLI's reading of the pins
    shown = lbctl("maps", "dump", "-o", "json", "services", "--bpffs", str(world.pin_dir))
    cli = json.loads(shown.stdout)
    assert len(cli["frontends"]) == len(want["frontends"])
    return want, seconds


def figures(
    capsys: pytest.CaptureFixture[str],
    title: str,
    churn: Churn,
    faults: str,
    before: dict[str, float],
    world: World,
    want: dict[str, Any],
    seconds: float,
) -> None:
    after = metrics(world)
    moved = {
        k: int(after[k] - before.get(k, 0)) for k in sorted(after) if after[k] != before.get(k, 0)
    }
    backends = sum(len(fe["backends"]) for fe in want["frontends"].values())
    report(
        capsys,
        "api",
        title,
        [
            f"changes written: {sum(churn.ops.values())} ("
            + ", ".join(f"{n} {op}" for op, n in churn.ops.most_common())
            + ")",
            f"faults: {faults}",
            f"agent: {', '.join(f'{v} {k}' for k, v in moved.items()) or 'no re-LIST, no restart'}",
            f"maps equal a fresh sync {seconds:.1f} s after the changes stopped: "
            f"{len(want['frontends'])} frontends, {backends} backend slots; "
            "stale 0, missing 0, leaked map entries 0",
        ],
    )


# -- the faults, in turn ----------------------------------------------------------------


def test_watches_cut_while_changes_flow(
    world: World, clean_datapath: BpfDatapath, capsys: pytest.CaptureFixture[str]
) -> None:
    before = metrics(world)
    churn = Churn(world.server, seed=1, services=SERVICES).start()
    rng, cuts = random.Random(1), 0
    deadline = time.monotonic() + CHURN_S
    try:
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.1, 0.6))
            world.server.cut_watches()
            cuts += 1
    finally:
        churn.stop()
    want, seconds = converged(world, clean_datapath)
    figures(capsys, "API faults: watches cut", churn, f"{cuts} cuts of every watch",
            before, world, want, seconds)  # fmt: skip


def test_410_gone_makes_the_agent_list_again(
    world: World, clean_datapath: BpfDatapath, capsys: pytest.CaptureFixture[str]
) -> None:
    before = metrics(world)
    churn = Churn(world.server, seed=2, services=SERVICES).start()
    rng, gone = random.Random(2), 0
    deadline = time.monotonic() + CHURN_S
    try:
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.3, 1.0))
            world.server.set_down(True)  # the watches break; the writer writes on
            time.sleep(0.2)
            world.server.compact()  # ...so the versions they would resume from are gone
            world.server.set_down(False)
            gone += 1
    finally:
        churn.stop()
    want, seconds = converged(world, clean_datapath)
    after = metrics(world)
    assert after["restarts expired"] > before.get("restarts expired", 0), "no 410 seen"
    assert after["lists"] > before["lists"], "a 410 must be answered with a new LIST"
    faults = f"{gone} compactions while the watches were away"
    figures(capsys, "API faults: 410 Gone", churn, faults, before, world, want, seconds)


def test_the_server_down_then_back(
    world: World, clean_datapath: BpfDatapath, capsys: pytest.CaptureFixture[str]
) -> None:
    before = metrics(world)
    churn = Churn(world.server, seed=3, services=SERVICES).start()
    try:
        time.sleep(CHURN_S / 2)
        world.server.set_down(True)
        went_down = time.monotonic()
        held, lag = settled(world), time.monotonic() - went_down
        time.sleep(OUTAGE_S)
        during = canonical(world.pin_dir)
        outage = time.monotonic() - went_down
        world.server.set_down(False)
        time.sleep(CHURN_S / 2)
    finally:
        world.server.set_down(False)
        churn.stop()
    changed = differences(during, held)
    assert not changed, "the maps changed while the API was down:\n" + "\n".join(changed[:20])
    want, seconds = converged(world, clean_datapath)
    faults = (
        f"one outage of {outage:.0f} s (every connection reset, the writer writing on); the "
        f"agent applied what had come before it within {lag:.1f} s, then held the maps "
        f"unchanged for {OUTAGE_S:.0f} s"
    )
    figures(capsys, f"API faults: server down {outage:.0f} s", churn, faults, before, world, want,
            seconds)  # fmt: skip


def settled(world: World, quiet: float = 1.0, timeout: float = 60.0) -> dict[str, Any]:
    """The agent's maps once they stop changing for `quiet` seconds: it applies
    what it received before a fault in batches, and under load that takes time."""
    deadline = time.monotonic() + timeout
    last, since = canonical(world.pin_dir), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the agent's maps never stopped changing"
        time.sleep(0.2)
        now = canonical(world.pin_dir)
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_relists_that_drop_and_readd_objects(
    world: World, clean_datapath: BpfDatapath, capsys: pytest.CaptureFixture[str]
) -> None:
    """Objects deleted and made again under their names (new uids, a quarter of them
    invalid) while the watches are away: only the next LIST shows them."""
    before = metrics(world)
    server = world.server
    churn = Churn(server, seed=4, services=SERVICES).start()
    # makes the new objects; its own writer never runs
    remade = Churn(server, seed=40, services=SERVICES)
    rng = random.Random(4)
    counts: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + CHURN_S

    def away(count: int) -> None:
        server.set_down(True)
        with server.batch():
            for i in rng.sample(range(1, SERVICES + 1), count):
                _remake(server, remade, rng, i, counts)
        server.compact()
        server.set_down(False)

    try:
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.3, 1.0))
            away(4)
    finally:
        server.set_down(False)
        churn.stop()
    # the last round after the writer: what it re-made stays so, invalid ones included
    settled(world)
    away(SERVICES // 2)
    want, seconds = converged(world, clean_datapath)
    faults = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
    figures(capsys, "API faults: relists that drop and re-add objects", churn,
            f"while away: {faults}", before, world, want, seconds)  # fmt: skip


def _remake(
    server: FakeApiServer,
    remade: Churn,
    rng: random.Random,
    i: int,
    counts: collections.Counter[str],
) -> None:
    """Delete c<i> or one of its slices and make it again (a new uid)."""
    invalid = rng.random() < 0.25
    if rng.random() < 0.5:
        if server.get("services", "test", f"c{i}") is not None:
            server.delete("services", "test", f"c{i}")
        obj = remade.service(i)
        if invalid:
            obj["spec"]["ports"][0]["port"] = 70000
        server.create(obj)
        counts["Services re-made" + (" invalid" if invalid else "")] += 1
    else:
        suffix = rng.choice("ab")
        if server.get("endpointslices", "test", f"c{i}-{suffix}") is not None:
            server.delete("endpointslices", "test", f"c{i}-{suffix}")
        obj = remade.slice(i, suffix)
        if invalid:
            obj["endpoints"] = [{"addresses": ["10.1.0.300"]}]
        server.create(obj)
        counts["slices re-made" + (" invalid" if invalid else "")] += 1
