"""Readiness tells the truth, liveness stays about the agent (real HTTP, real agent).

`/readyz` answers 503 while a part the operator asked for is off or a Service
is left unprogrammed, and says why; `/livez` and `/healthz` stay 200 all the
while, so the DaemonSet's liveness probe never restarts a working datapath.
When the cause goes, `/readyz` turns 200 by itself.  Also: the cgroup the
socket hooks attach to is found from the path given, the cgroup2 directory
itself or the `unified` cgroup2 mount below a hybrid host's /sys/fs/cgroup,
and anything else is refused with a reason (in a private mount namespace,
with a tmpfs and a bind mount of a test cgroup, so the host's mounts stay).
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lbctl.datapath.ebpf import cgroup
from tests import k8s_yaml
from tests.agent_proc import AgentProcess
from tests.netlab import Netns
from tests.test_deploy import new_cgroup, remove_cgroup

HEALTHZ_PORT = 10256  # the agent's default --healthz-bind-address port, in the test's namespace


def get(node: Netns, path: str) -> tuple[int, dict[str, Any]]:
    with node.entered():
        conn = http.client.HTTPConnection("127.0.0.1", HEALTHZ_PORT, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()


def wait_status(node: Netns, path: str, status: int, timeout: float = 40.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got, body = get(node, path)
        except OSError:  # not listening yet
            got, body = 0, {}
        if got == status:
            return body
        assert time.monotonic() < deadline, f"{path} never answered {status}: {got} {body}"
        time.sleep(0.2)


@pytest.fixture
def node() -> Iterator[Netns]:
    ns = Netns.create("rdy")
    try:
        yield ns
    finally:
        ns.delete()


def web(name: str, vip: str) -> list[dict[str, Any]]:
    return [
        k8s_yaml.service(name, vip, [("http", "TCP", 80)]),
        k8s_yaml.endpoint_slice(name, ["10.244.0.20"], [("http", "TCP", 8080)]),
    ]


@pytest.mark.netns
def test_a_service_left_unprogrammed_makes_the_agent_unready_not_dead(
    tmp_path: Path, pin_dir: Path, node: Netns
) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    k8s_yaml.write(manifests / "a.yaml", *web("a", "10.96.0.10"))
    k8s_yaml.write(manifests / "b.yaml", *web("b", "10.96.0.11"))
    # room for one frontend: the second Service cannot be programmed
    agent = AgentProcess(node, manifests, pin_dir, tmp_path / "log", "--max-services", "1")
    with agent:
        agent.wait_for_log("synced:")
        body = wait_status(node, "/readyz", 503)
        assert body["ready"] is False and body["synced"] is True, body
        (why,) = body["notReady"]
        assert "a Service left unprogrammed" in why and "is full" in why, why
        assert "test/b" in why or "test/a" in why, why
        # the agent itself is fine: liveness and kube-proxy's healthz say so
        for path in ("/livez", "/healthz"):
            status, health = get(node, path)
            assert status == 200 and health["frontendErrors"] >= 1, (path, health)
        # the operator makes room: ready again at the next retry, without a restart
        (manifests / "b.yaml").unlink()
        body = wait_status(node, "/readyz", 200)
        assert body["ready"] is True and body["notReady"] == [], body
        assert agent.proc is not None and agent.proc.poll() is None


@pytest.mark.netns
def test_socket_hooks_asked_for_but_not_attached_make_the_agent_unready(
    tmp_path: Path, pin_dir: Path, node: Netns
) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    k8s_yaml.write(manifests / "a.yaml", *web("a", "10.96.0.10"))
    not_a_cgroup = tmp_path / "not-a-cgroup"
    not_a_cgroup.mkdir()
    agent = AgentProcess(node, manifests, pin_dir, tmp_path / "log", "--cgroup", str(not_a_cgroup))
    with agent:
        agent.wait_for_log("synced:")
        body = wait_status(node, "/readyz", 503)
        (why,) = body["notReady"]
        assert why.startswith("socket hooks asked for but off:"), why
        assert f"{not_a_cgroup} is not a cgroup2 directory" in why, why
        # still off after the retries that clear other errors: it is a state, not an event
        time.sleep(6)
        status, body = get(node, "/readyz")
        assert status == 503 and body["notReady"] == [why], body
        assert get(node, "/livez")[0] == 200
        assert agent.dump()["frontends"], "the Services are programmed all the same"


@pytest.mark.netns
def test_socket_hooks_on_a_cgroup_of_our_own_leave_the_agent_ready(
    tmp_path: Path, pin_dir: Path, node: Netns
) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    k8s_yaml.write(manifests / "a.yaml", *web("a", "10.96.0.10"))
    cg = new_cgroup("ready")
    try:
        agent = AgentProcess(node, manifests, pin_dir, tmp_path / "log", "--cgroup", str(cg))
        with agent:
            agent.wait_for_log("synced:")
            body = wait_status(node, "/readyz", 200)
            assert body["notReady"] == [] and body["mode"] == "ebpf", body
            assert f"socket hooks on cgroup {cg}:" in agent.log_text()
    finally:
        remove_cgroup(cg)


# -- finding the cgroup2 directory ----------------------------------------------------

FIND = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from lbctl.datapath.ebpf import cgroup
    try:
        print("found", cgroup.find_cgroup2(Path(sys.argv[1])))
    except cgroup.CgroupError as err:
        print("error", err)
    """
)


def in_private_mounts(script: str) -> list[str]:
    """Run a shell script in a mount namespace of its own; its output lines."""
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-euc", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.netns
def test_the_cgroup2_directory_is_found_below_a_hybrid_hosts_cgroup_root(tmp_path: Path) -> None:
    cg = new_cgroup("find")
    root, py = tmp_path / "cgroup", f"{sys.executable} -c '{FIND}'"
    root.mkdir()
    try:
        lines = in_private_mounts(
            f"""
            {py} {cg}
            mount -t tmpfs lbctl-test {root}
            {py} {root}
            mkdir {root}/unified
            {py} {root}
            mount --bind {cg} {root}/unified
            {py} {root}
            {py} {tmp_path}
            """
        )
    finally:
        remove_cgroup(cg)
    assert lines[0] == f"found {cg}", lines  # a cgroup2 directory: itself
    # a tmpfs without cgroup2 at its unified: what is there, and what to give instead
    for line in lines[1:3]:
        assert line.startswith(f"error {root} is not a cgroup2 directory (a tmpfs with no "), line
        assert f"cgroup2 mounted at {root}/unified" in line and 'cgroupPath: ""' in line, line
    assert lines[3] == f"found {root}/unified", lines  # the hybrid layout
    assert lines[4].startswith(f"error {tmp_path} is not a cgroup2 directory (not a cgroup"), lines
    missing = tmp_path / "missing"
    with pytest.raises(cgroup.CgroupError, match="does not exist"):
        cgroup.find_cgroup2(missing)
