"""Socket-level balancing for the node's own processes (bpf/lbctl_sock.c, cgroup.py).

The socket programs are attached only to cgroups this module creates, fresh,
under the cgroup2 mount (`lbctl-test-<pid>-<n>`), never to the root or to any
other; every cgroup and link is removed at the end, also after a failure.
Clients are subprocesses: one in the cgroup writes "0" to its cgroup.procs
before it runs, then `nsenter --net=` puts it in a lab namespace.  All
traffic stays inside the namespaces tests/netlab.py builds.

The node namespace holds the service address itself (on lo) with servers of
its own, "node-local": a call the hooks leave alone lands there, so every
"not translated" below is a positive answer, not a timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lbctl.datapath.ebpf import cgroup, layout, libbpf
from lbctl.datapath.ebpf.compiler import Compilation, Loaded
from lbctl.datapath.ebpf.frontends import FrontendWriter
from lbctl.datapath.ebpf.maps import Maps
from lbctl.datapath.ebpf.settings import BpfSettings
from lbctl.model import Protocol, ServiceRef
from lbctl.plan.planner import Backend, Frontend, FrontendKey
from tests.netlab import (
    POD_CIDR_GATEWAY,
    Cluster,
    Lab,
    Netns,
    Pod,
    TcpServer,
    UdpServer,
    build_cluster,
)

pytestmark = pytest.mark.netns

IP = ipaddress.ip_address
VIP = "10.96.0.10"  # a ClusterIP with two backends (TCP 80, UDP 53)
NODE_IP = "172.31.77.1"  # an address of the node namespace: NodePorts answer on it
EMPTY_VIP = "10.96.0.99"  # a ClusterIP without endpoints: rejected
DRAINED_VIP = "10.96.0.98"  # backends only elsewhere (drop_empty): dropped
TCP_PORT, UDP_PORT = 80, 53
NODE_TCP_PORT, NODE_UDP_PORT = 30080, 30053
POD_TCP_PORT, POD_UDP_PORT = 8080, 5353

CGROUP_PREFIX = f"lbctl-test-{os.getpid()}-"
_cgroups = itertools.count()

# The client: one operation `count` times, each on a fresh socket, as JSON.
#   tcp            connect, getpeername, one line out, one line back
#   udp            sendto, recvfrom (unconnected)
#   udp-connected  connect, getpeername, send, recvfrom
CLIENT = r"""
import errno, json, os, socket, sys, time

mode, ip, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])


def name(addr):
    return "%s:%d" % addr


def once():
    kind = socket.SOCK_STREAM if mode == "tcp" else socket.SOCK_DGRAM
    out = {}
    start = time.monotonic()
    with socket.socket(socket.AF_INET, kind) as s:
        s.settimeout(3)
        try:
            if mode == "udp":
                s.sendto(b"hi", (ip, port))
            else:
                s.connect((ip, port))
                out["peer"] = name(s.getpeername())
            if mode == "tcp":
                s.sendall(b"hi\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                out["reply"], out["source"] = data.decode().strip(), out["peer"]
            else:
                if mode == "udp-connected":
                    s.send(b"hi")
                data, src = s.recvfrom(4096)
                out["reply"], out["source"] = data.decode(), name(src)
        except OSError as err:
            out["error"] = errno.errorcode.get(err.errno or 0, "timeout")
    out["seconds"] = time.monotonic() - start
    return out


print(json.dumps({
    "cgroup": open("/proc/self/cgroup").read(),
    "netns": os.stat("/proc/self/ns/net").st_ino,
    "results": [once() for _ in range(count)],
}))
"""


@dataclasses.dataclass
class Result:
    """One client operation: who answered and what the client saw, or the error."""

    error: str = ""
    pod: str = ""  # the server that answered
    seen_from: str = ""  # the client's address as that server saw it
    source: str = ""  # where the reply came from, as the client saw it
    peer: str = ""  # getpeername() (connected sockets)
    seconds: float = 0.0

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Result:
        if "error" in raw:
            return cls(error=raw["error"], seconds=raw["seconds"])
        pod, seen_from, _ = (raw["reply"] + " ").split(" ", 2)
        return cls(
            pod=pod,
            seen_from=seen_from,
            source=raw["source"],
            peer=raw.get("peer", ""),
            seconds=raw["seconds"],
        )


# -- cgroups: only ever ones made here ---------------------------------------------


class CgroupMaker:
    """Makes fresh cgroups under the cgroup2 mount and removes them all."""

    def __init__(self) -> None:
        self.mount = cgroup.cgroup2_mount()
        self.made: list[Path] = []

    def new(self) -> Path:
        path = self.mount / f"{CGROUP_PREFIX}{next(_cgroups)}"
        path.mkdir()  # never adopt an existing one
        self.made.append(path)
        return path

    def check_ours(self, path: Path) -> None:
        """The guard before every attach: a cgroup this test made, not the root."""
        assert path in self.made and path.parent == self.mount and path != self.mount

    def remove(self) -> None:
        """Remove every cgroup made (each tried, even when one fails)."""
        with contextlib.ExitStack() as stack:
            for path in self.made:
                stack.callback(self._rmdir, path)

    @staticmethod
    def _rmdir(path: Path) -> None:
        deadline = time.monotonic() + 5
        while path.exists():
            try:
                path.rmdir()  # links still on it are released with it
            except OSError as err:
                # EBUSY: an exiting client may not have left it yet
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.fixture
def cgroups() -> Iterator[CgroupMaker]:
    made = CgroupMaker()
    try:
        yield made
    finally:
        made.remove()


# -- the environment -------------------------------------------------------------


def ref(name: str) -> ServiceRef:
    return ServiceRef("default", name)


def frontend(
    address: str, port: int, proto: Protocol, kind: str, pods: list[Pod], target: int, **kw: Any
) -> Frontend:
    return Frontend(
        key=FrontendKey(IP(address), port, proto),
        service=ref(kind.lower()),
        port_name=proto.name.lower(),
        kind=kind,
        backends=tuple(Backend(IP(p.ip), target, proto) for p in pods),
        **kw,
    )


def frontends(pods: list[Pod]) -> list[Frontend]:
    tcp, udp = Protocol.TCP, Protocol.UDP
    return [
        frontend(VIP, TCP_PORT, tcp, "ClusterIP", pods, POD_TCP_PORT),
        frontend(VIP, UDP_PORT, udp, "ClusterIP", pods, POD_UDP_PORT),
        frontend(NODE_IP, NODE_TCP_PORT, tcp, "NodePort", pods, POD_TCP_PORT),
        frontend(NODE_IP, NODE_UDP_PORT, udp, "NodePort", pods, POD_UDP_PORT),
        frontend(EMPTY_VIP, TCP_PORT, tcp, "ClusterIP", [], POD_TCP_PORT),
        frontend(EMPTY_VIP, UDP_PORT, udp, "ClusterIP", [], POD_UDP_PORT),
        frontend(DRAINED_VIP, TCP_PORT, tcp, "ClusterIP", [], POD_TCP_PORT, drop_empty=True),
    ]


def local_servers(ns: Netns, name: str) -> None:
    """Servers on the service address inside `ns` itself, for untranslated calls."""
    ns.ip("addr", "add", f"{VIP}/32", "dev", "lo")
    local = Pod(ns=ns, name=name, ip=VIP, host_if="lo")
    TcpServer(local, TCP_PORT, bind=VIP)
    UdpServer(local, UDP_PORT, bind=VIP)


def compile_into(pin_dir: Path) -> Loaded:
    loaded = Compilation(BpfSettings(pin_dir=pin_dir)).result()
    try:
        hooks = {hook.program for hook in cgroup.SOCK_HOOKS}
        assert hooks <= set(loaded.prog_fds), f"socket programs did not load: {loaded.failed}"
    except BaseException:
        loaded.close()
        raise
    return loaded


def write_cookie(maps: Maps, cookie: int) -> None:
    maps.lb4_config.update(
        maps.lb4_config.new_key(), maps.lb4_config.new_value(netns_cookie=cookie)
    )


def stat(maps: Maps, name: str) -> int:
    per_cpu = maps.lb_stats.lookup(layout.ffi.new("__u32 *", layout.const(name)))
    return sum(per_cpu) if per_cpu is not None else 0


@dataclasses.dataclass
class Env:
    cluster: Cluster
    cgroups: CgroupMaker
    cgroup: Path  # where the hooks are attached
    pin_dir: Path
    loaded: Loaded
    maps: Maps
    cookie: int  # of the node namespace
    attachments: list[cgroup.Attachment]

    @property
    def node(self) -> Netns:
        return self.cluster.node

    @property
    def pod_names(self) -> set[str]:
        return {pod.name for pod in self.cluster.pods}

    def attach(self, where: Path, loaded: Loaded | None = None) -> list[cgroup.Attachment]:
        self.cgroups.check_ours(where)
        return cgroup.attach(where, (loaded or self.loaded).prog_fds, self.pin_dir)

    def run(
        self,
        mode: str,
        ip: str,
        port: int,
        count: int = 1,
        where: Netns | None = None,
        in_cgroup: bool = True,
    ) -> list[Result]:
        """Run the client in `where` (the node by default), in the test cgroup or not."""
        ns = where or self.node
        procs = self.cgroup / "cgroup.procs"

        def enter_cgroup() -> None:  # in the child, before exec: only it moves
            with open(procs, "w") as f:
                f.write("0")

        preexec: Callable[[], None] | None = enter_cgroup if in_cgroup else None
        cmd = ["nsenter", f"--net={ns.path}", sys.executable, "-c", CLIENT]
        proc = subprocess.run(
            [*cmd, mode, ip, str(port), str(count)],
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=preexec,  # writes one file, nothing else
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        # The client ran where it was meant to: the test proves nothing otherwise.
        assert (f"0::/{self.cgroup.name}\n" in out["cgroup"]) == in_cgroup, out["cgroup"]
        assert out["netns"] == os.stat(ns.path).st_ino
        return [Result.parse(r) for r in out["results"]]

    def one(self, mode: str, ip: str, port: int, **kw: Any) -> Result:
        (result,) = self.run(mode, ip, port, **kw)
        return result


@pytest.fixture
def env(pin_dir: Path, cgroups: CgroupMaker) -> Iterator[Env]:
    with Lab() as lab:
        cluster = build_cluster(lab, pods=2, invalid_drop_rule=False)
        cluster.node.ip("addr", "add", f"{NODE_IP}/32", "dev", "lo")
        for pod in cluster.pods:
            TcpServer(pod, POD_TCP_PORT)
            UdpServer(pod, POD_UDP_PORT)
        local_servers(cluster.node, "node-local")
        local_servers(cluster.client.ns, "client-local")

        pin_dir.mkdir(parents=True)
        loaded = compile_into(pin_dir)
        maps = Maps.from_fds(loaded.map_fds.__getitem__, owns_fds=True)
        try:
            with cluster.node.entered():
                cookie = cgroup.netns_cookie()
            write_cookie(maps, cookie)
            assert FrontendWriter(maps).apply(frontends(cluster.pods), []) == []
            where = cgroups.new()
            cgroups.check_ours(where)
            attachments = cgroup.attach(where, loaded.prog_fds, pin_dir)
            yield Env(cluster, cgroups, where, pin_dir, loaded, maps, cookie, attachments)
        finally:
            with contextlib.suppress(cgroup.CgroupError):
                cgroup.detach(pin_dir)
            maps.close()
            for fd in loaded.prog_fds.values():
                os.close(fd)


# -- translated: the node's own processes --------------------------------------------


def test_the_hooks_are_pinned_links_on_the_test_cgroup(env: Env) -> None:
    names = {hook.name for hook in cgroup.SOCK_HOOKS}
    assert names == {"connect4", "sendmsg4", "recvmsg4", "getpeername4"}
    assert {a.hook for a in env.attachments} == names
    listed = cgroup.attached(env.pin_dir)
    assert {a.hook for a in listed} == names
    ids = {libbpf.prog_info(fd).id: name for name, fd in env.loaded.prog_fds.items()}
    for a in listed:
        assert a.cgroup_id == cgroup.cgroup_id(env.cgroup)
        assert ids[a.prog_id] == f"lbctl_sock_{a.hook}"
        assert a.pin == env.pin_dir / f"link_sock_{a.hook}" and a.pin.exists()
        assert not a.replaced
    assert cgroup.cgroup_programs(env.cgroup) == {a.hook: [a.prog_id] for a in listed}
    # Nothing is attached anywhere else, the cgroup2 root included.
    root = cgroup.cgroup_programs(env.cgroups.mount)
    assert not any(set(progs) & set(ids) for progs in root.values())


def test_a_node_process_reaches_a_cluster_ip_over_tcp(env: Env) -> None:
    before = stat(env.maps, "LB_STAT_SOCK_TRANSLATE")
    results = env.run("tcp", VIP, TCP_PORT, count=16)
    assert all(not r.error for r in results), results
    assert {r.pod for r in results} == env.pod_names  # both backends, none local
    for r in results:
        assert r.peer == f"{VIP}:{TCP_PORT}"  # getpeername shows the service
        assert r.seen_from.split(":")[0] == POD_CIDR_GATEWAY  # the node's own address
    assert stat(env.maps, "LB_STAT_SOCK_TRANSLATE") - before == 16


def test_a_node_process_reaches_a_cluster_ip_over_udp(env: Env) -> None:
    results = env.run("udp", VIP, UDP_PORT, count=16)
    assert all(not r.error for r in results), results
    assert {r.pod for r in results} == env.pod_names
    assert {r.source for r in results} == {f"{VIP}:{UDP_PORT}"}  # recvfrom: the service

    connected = env.run("udp-connected", VIP, UDP_PORT, count=8)
    assert all(not r.error for r in connected), connected
    assert {r.pod for r in connected} <= env.pod_names
    for r in connected:
        assert r.peer == r.source == f"{VIP}:{UDP_PORT}"


def test_a_node_port_on_the_nodes_own_address(env: Env) -> None:
    tcp = env.run("tcp", NODE_IP, NODE_TCP_PORT, count=8)
    udp = env.run("udp", NODE_IP, NODE_UDP_PORT, count=8)
    for r in tcp + udp:
        assert not r.error and r.pod in env.pod_names, r
    assert {r.peer for r in tcp} == {f"{NODE_IP}:{NODE_TCP_PORT}"}
    assert {r.source for r in udp} == {f"{NODE_IP}:{NODE_UDP_PORT}"}
    # Without the hooks nothing listens there.
    assert env.one("tcp", NODE_IP, NODE_TCP_PORT, in_cgroup=False).error == "ECONNREFUSED"


def test_a_service_without_endpoints_is_refused_at_once(env: Env) -> None:
    """bpf_set_retval(-ECONNREFUSED) works from connect4 and sendmsg4 on this kernel."""
    before = stat(env.maps, "LB_STAT_SOCK_REJECT")
    tcp = env.one("tcp", EMPTY_VIP, TCP_PORT)
    assert tcp.error == "ECONNREFUSED" and tcp.seconds < 0.5, tcp
    udp = env.one("udp", EMPTY_VIP, UDP_PORT)
    assert udp.error == "ECONNREFUSED" and udp.seconds < 0.5, udp
    connected = env.one("udp-connected", EMPTY_VIP, UDP_PORT)
    assert connected.error == "ECONNREFUSED", connected
    # Backends on other nodes only: kube-proxy's DROP, which a local caller sees as EPERM.
    drained = env.one("tcp", DRAINED_VIP, TCP_PORT)
    assert drained.error == "EPERM" and drained.seconds < 0.5, drained
    assert stat(env.maps, "LB_STAT_SOCK_REJECT") - before == 4


# -- not translated ------------------------------------------------------------------


def test_a_process_of_the_cgroup_in_another_namespace_is_left_alone(env: Env) -> None:
    client = env.cluster.client.ns
    tcp = env.one("tcp", VIP, TCP_PORT, where=client)
    assert tcp.pod == "client-local" and tcp.peer == f"{VIP}:{TCP_PORT}", tcp
    udp = env.one("udp", VIP, UDP_PORT, where=client)
    assert udp.pod == "client-local" and udp.source == f"{VIP}:{UDP_PORT}", udp
    # Refusals too are the node's alone: from the pod the empty service is not refused
    # by a hook (the packet leaves, and nothing routes it on).
    assert env.one("tcp", EMPTY_VIP, TCP_PORT, where=client).error != "ECONNREFUSED"


def test_a_node_process_outside_the_cgroup_is_left_alone(env: Env) -> None:
    tcp = env.one("tcp", VIP, TCP_PORT, in_cgroup=False)
    assert tcp.pod == "node-local", tcp
    udp = env.one("udp", VIP, UDP_PORT, in_cgroup=False)
    assert udp.pod == "node-local", udp


def test_without_the_node_namespace_cookie_nothing_is_translated(env: Env) -> None:
    write_cookie(env.maps, 0)
    assert env.one("tcp", VIP, TCP_PORT).pod == "node-local"
    write_cookie(env.maps, env.cookie + 1)  # some other namespace's
    assert env.one("udp", VIP, UDP_PORT).pod == "node-local"
    write_cookie(env.maps, env.cookie)
    assert env.one("tcp", VIP, TCP_PORT).pod in env.pod_names


# -- lifecycle: restart, move, detach --------------------------------------------


def test_a_restart_swaps_the_programs_into_the_same_links(env: Env) -> None:
    before = {a.hook: a for a in env.attachments}
    again = compile_into(env.pin_dir)  # adopts the pinned maps, as a restarted agent does
    try:
        swapped = env.attach(env.cgroup, again)
        new_ids = {libbpf.prog_info(fd).id for fd in again.prog_fds.values()}
    finally:
        again.close()  # the links keep the new programs
    assert {a.hook for a in swapped} == set(before)
    for a in swapped:
        assert a.replaced and a.link_id == before[a.hook].link_id
        assert a.prog_id != before[a.hook].prog_id and a.prog_id in new_ids
    assert cgroup.cgroup_programs(env.cgroup) == {a.hook: [a.prog_id] for a in swapped}
    tcp = env.one("tcp", VIP, TCP_PORT)
    udp = env.one("udp", VIP, UDP_PORT)
    assert tcp.pod in env.pod_names and tcp.peer == f"{VIP}:{TCP_PORT}", tcp
    assert udp.pod in env.pod_names and udp.source == f"{VIP}:{UDP_PORT}", udp


def test_hooks_pinned_on_another_cgroup_move(env: Env) -> None:
    old_cgroup = env.cgroup
    env.cgroup = env.cgroups.new()
    moved = env.attach(env.cgroup)
    assert all(not a.replaced and a.cgroup_id == cgroup.cgroup_id(env.cgroup) for a in moved)
    assert all(not progs for progs in cgroup.cgroup_programs(old_cgroup).values())
    assert env.one("tcp", VIP, TCP_PORT).pod in env.pod_names


def test_a_build_without_a_hook_detaches_its_old_link(env: Env) -> None:
    fds = {n: fd for n, fd in env.loaded.prog_fds.items() if n != "lbctl_sock_sendmsg4"}
    env.cgroups.check_ours(env.cgroup)
    left = cgroup.attach(env.cgroup, fds, env.pin_dir)
    assert {a.hook for a in left} == {"connect4", "recvmsg4", "getpeername4"}
    assert cgroup.cgroup_programs(env.cgroup)["sendmsg4"] == []
    assert not (env.pin_dir / "link_sock_sendmsg4").exists()


def test_detach_removes_every_hook(env: Env) -> None:
    assert cgroup.detach(env.pin_dir) == ["connect4", "getpeername4", "recvmsg4", "sendmsg4"]
    assert not list(env.pin_dir.glob("link_sock_*"))
    assert cgroup.attached(env.pin_dir) == []
    assert all(not progs for progs in cgroup.cgroup_programs(env.cgroup).values())
    assert env.one("tcp", VIP, TCP_PORT).pod == "node-local"
    assert cgroup.detach(env.pin_dir) == []


# -- errors ----------------------------------------------------------------------


def test_a_directory_that_is_not_a_cgroup2_one_is_refused(tmp_path: Path, pin_dir: Path) -> None:
    with pytest.raises(cgroup.CgroupError) as err:
        cgroup.attach(tmp_path, {}, pin_dir)
    text = str(err.value)
    assert str(tmp_path) in text and "not a cgroup2 directory" in text
    assert str(cgroup.cgroup2_mount()) in text  # where to look instead
    with pytest.raises(cgroup.CgroupError, match="does not exist"):
        cgroup.attach(tmp_path / "missing", {}, pin_dir)


def test_the_cgroup2_mount_is_found_in_the_mount_table(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /run/my\\040cgroups cgroup2 rw 0 0\n"
    )
    assert cgroup.cgroup2_mount(mounts) == Path("/run/my cgroups")
    mounts.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n")
    with pytest.raises(cgroup.CgroupError, match="no cgroup2 file system is mounted"):
        cgroup.cgroup2_mount(mounts)


def test_the_netns_cookie_is_per_namespace(env: Env) -> None:
    here = cgroup.netns_cookie()
    with env.cluster.client.ns.entered():
        client = cgroup.netns_cookie()
    with env.node.entered():
        assert cgroup.netns_cookie() == env.cookie
    assert len({here, client, env.cookie}) == 3
