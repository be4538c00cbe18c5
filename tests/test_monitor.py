"""`lbctl monitor` against the real agent, with real packets from outside the node.

The world of tests/extlab.py (tests/test_external.py's start and publish), with
two NAT ports per backend so that exhaustion takes a few datagrams.  One agent
serves every case: a source-range drop, a reject, new flows with their NAT
ports, NAT exhaustion, and an ICMP error from a backend translated back to the
client; each must show in what `lbctl monitor` prints, named by its Service.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from lbctl.datapath.ebpf import layout
from lbctl.datapath.ebpf.libbpf import BpfMap
from tests import k8s_yaml
from tests.agent_proc import LBCTL, lbctl
from tests.extlab import CLIENT_IP, LB_IP, NODE_IP, OTHER_CLIENT_IP
from tests.netlab import Lab, RequestError, tcp_request, udp_request
from tests.test_external import bound_tcp, start

pytestmark = pytest.mark.netns

EMPTY_PORT = 30090  # NodePort of a Service without endpoints: rejected
DEAF_PORT = 30095  # NodePort of a UDP Service whose pods do not listen: ICMP errors


def monitor(pin_dir: Path, *args: str) -> subprocess.Popen[str]:
    """`lbctl monitor`, returned once the stream is on (it says so on stderr)."""
    proc = subprocess.Popen(
        [LBCTL, "monitor", "--bpffs", str(pin_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()
    assert first.startswith("lbctl monitor: watching"), first + proc.stderr.read()
    return proc


def finish(proc: subprocess.Popen[str], sig: int | None = signal.SIGINT) -> tuple[str, str]:
    if sig is not None:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return out, err


def extra_services(manifests: Path, pod_ip: str) -> None:
    empty = k8s_yaml.service("empty", "10.96.0.60", [("http", "TCP", 80)], type="NodePort")
    empty["spec"]["ports"][0]["nodePort"] = EMPTY_PORT
    deaf = k8s_yaml.service("deaf", "10.96.0.61", [("dns", "UDP", 53)], type="NodePort")
    deaf["spec"]["ports"][0]["nodePort"] = DEAF_PORT
    k8s_yaml.write(manifests / "empty.yaml", empty)
    k8s_yaml.write(
        manifests / "deaf.yaml",
        deaf,
        k8s_yaml.endpoint_slice("deaf", [pod_ip], [("dns", "UDP", 9999)], nodes={pod_ip: "node-a"}),
    )


def stream_off(pin_dir: Path) -> bool:
    m = BpfMap.open_pinned(str(pin_dir / "lb_monitor"), "__u32", "struct lb_monitor")
    try:
        return int(m.lookup(layout.ffi.new("__u32 *", 0)).mask) == 0
    finally:
        m.close()


def test_monitor_shows_each_event_of_real_packets(tmp_path: Path, pin_dir: Path) -> None:
    with Lab() as lab:
        env = start(tmp_path, pin_dir, lab, pods_a=1, pods_b=1)
        env.agent.extra = (*env.agent.extra, "--nat-port-range", "61000-61001")
        try:
            env.publish(loadBalancerSourceRanges=[f"{CLIENT_IP}/32"])
            extra_services(env.manifests, env.world.pods_a[0].ip)
            env.agent.start()
            env.agent.wait_for_log("synced:")
            check_events(env.world, pin_dir)
        finally:
            env.agent.stop()


def check_events(w: Any, pin_dir: Path) -> None:
    assert stream_off(pin_dir)
    proc = monitor(pin_dir, "-o", "json")
    # outside the LoadBalancer's source ranges: dropped
    with pytest.raises(TimeoutError):
        bound_tcp(w.client, OTHER_CLIENT_IP, LB_IP, 80, timeout=0.5)
    # no endpoints: refused at once
    with pytest.raises(RequestError, match="refused"):
        tcp_request(w.client, NODE_IP, EMPTY_PORT, timeout=3.0)
    # the pod answers port unreachable; it reaches the client translated
    with w.client.open_socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(2.0)
        udp.connect((NODE_IP, DEAF_PORT))
        udp.send(b"anyone?")
        with pytest.raises(ConnectionRefusedError):
            udp.recv(100)
    # masqueraded UDP flows: two NAT ports per backend, two backends
    answered = 0
    for i in range(8):  # each its own flow (a fresh socket may reuse a port)
        try:
            udp_request(w.client, NODE_IP, 30081, timeout=0.5, source_port=42000 + i)
            answered += 1
        except RequestError:
            pass
    assert 2 <= answered <= 4
    out, err = finish(proc)
    events = [json.loads(line) for line in out.splitlines()]
    by_type: dict[str, list[dict[str, Any]]] = {}
    for ev in events:
        by_type.setdefault(ev["type"], []).append(ev)
    assert set(by_type) == {"drop", "reject", "new-flow", "nat", "nat-exhausted", "icmp"}, out

    drop = by_type["drop"][0]
    assert (drop["reason"], drop["service"]) == ("drop_source_range", "test/web:80/tcp")
    assert drop["client"].startswith(f"{OTHER_CLIENT_IP}:") and drop["destination"] == f"{LB_IP}:80"
    reject = by_type["reject"][0]
    assert (reject["reason"], reject["service"]) == (
        "rejected_no_backend",
        f"test/empty:{EMPTY_PORT}/tcp",
    )
    [icmp] = by_type["icmp"]
    assert icmp["service"] == f"test/deaf:{DEAF_PORT}/udp" and icmp["nat"] == CLIENT_IP
    assert icmp["backend"] == f"{w.pods_a[0].ip}:9999" and icmp["client"] == w.pods_a[0].ip
    web_udp = [e for e in by_type["nat"] if e["service"] == "test/web:30081/udp"]
    assert len(web_udp) == answered
    assert {e["nat"] for e in web_udp} <= {f"{NODE_IP}:61000", f"{NODE_IP}:61001"}
    exhausted = by_type["nat-exhausted"]
    assert len(exhausted) >= 8 - answered
    assert {e["reason"] for e in exhausted} == {"nat_exhausted"}
    assert all(e["client"].startswith(f"{CLIENT_IP}:") for e in exhausted)
    # the summary counts what was printed
    summary = err.strip().splitlines()[-1]
    assert f"{len(events)} events" in summary and f"nat-exhausted {len(exhausted)}" in summary
    assert stream_off(pin_dir), "the monitor must switch the stream off when it ends"

    # filters and the table: one line per event, ending after --count
    proc = monitor(pin_dir, "--type", "drop", "--client", OTHER_CLIENT_IP, "--count", "1")
    with pytest.raises(RequestError, match="refused"):  # a reject: not asked for
        tcp_request(w.client, NODE_IP, EMPTY_PORT, timeout=3.0)
    with pytest.raises(TimeoutError):
        bound_tcp(w.client, OTHER_CLIENT_IP, LB_IP, 80, timeout=0.5)
    out, err = finish(proc, None)
    [line] = out.splitlines()
    fields = line.split()
    assert fields[1:4] == ["drop", "drop_source_range", "tcp"]
    assert f"-> {LB_IP}:80 service=test/web:80/tcp backend=- hook=" in line
    assert "1 events (drop 1)" in err
    assert stream_off(pin_dir)

    # mistakes: named, with the fix, exit code 1
    bad = lbctl("monitor", "--bpffs", str(pin_dir), "--reason", "nope", check=False)
    assert bad.returncode == 1 and "--reason nope: no such reason" in bad.stderr
    bad = lbctl("monitor", "--bpffs", str(pin_dir), "--type", "drops", check=False)
    assert bad.returncode == 1 and "choose among drop, reject" in bad.stderr
    # --duration ends it too, quiet or not
    started = time.monotonic()
    out, err = finish(monitor(pin_dir, "--duration", "0.5"), None)
    assert time.monotonic() - started < 10 and "lbctl monitor: 0 events (none)" in err
