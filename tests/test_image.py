"""The image, built by `make image`'s script and run the way the DaemonSet runs it.

One build (cached layers: only what changed is rebuilt) and one container
per module.  The container gets what the DaemonSet gives it, read from
deploy/: its command and arguments, the ConfigMap's config file and the
environment it names, its capabilities, and a stand-in of the test's own for
each of its volumes: a directory below /sys/fs/bpf for the host's bpffs, a
tmpfs holding a cgroup of the test's at `unified` for the host's
/sys/fs/cgroup (the hybrid layout of this host), the host's /lib/modules and
/usr/src, a service account token for a TLS test API server.  It runs in
the node namespace of a test cluster (never the host's); the test then
sends real connections from a pod to a ClusterIP and checks the probes,
`lbctl status` inside the container, and that the image and the manifests
agree (command, user, ports, paths, what is installed and what is not).

CAP_SYS_RESOURCE, which the DaemonSet adds for kernels before 5.11, is left
out only where this VM cannot grant it (tests/container.py says why).
Everything is removed at the end, also on failure: container, its cgroups,
namespaces, pins, the test's cgroup.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import lbctl
from lbctl.datapath.ebpf import cgroup
from tests import k8s_yaml
from tests.agent_proc import LBCTL
from tests.apiserver import FakeApiServer
from tests.conftest import BPFFS, PIN_PREFIX, remove_pins
from tests.container import CAP_SYS_RESOURCE, Container, build, can_grant, inspect
from tests.netlab import Lab, Netns, TcpServer, build_cluster, tcp_request
from tests.test_deploy import (
    agent_container,
    capabilities,
    cleanup_container,
    container_port,
    find,
    pod_spec,
    remove_cgroup,
)

pytestmark = pytest.mark.netns

NODE_NAME = "node-a"
VIP, PORT, TARGET = "10.96.0.10", 80, 8080
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # where kubelet mounts the token


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build(tmp_path_factory.mktemp("image") / "iid")


def tls_files(where: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, as the API server's serving one."""
    cert, key = where / "apiserver.crt", where / "apiserver.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=lbctl-test-apiserver",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    return cert, key


@dataclasses.dataclass
class Node:
    """The running container and what a test asks of it."""

    container: Container
    lab: Lab
    node: Netns
    client: Netns
    pin_root: Path  # the host's bpffs stand-in; the agent pins below it
    cgroup: Path  # the test cgroup, at unified below the container's /run/lbctl/cgroup
    config: dict[str, Any]  # the ConfigMap's config file, as run

    def get(self, path: str, port: int) -> tuple[int, dict[str, Any]]:
        with self.node.entered():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                return resp.status, json.loads(resp.read())
            finally:
                conn.close()


def volume_sources(tmp: Path, pin_root: Path, cg: Path, config_dir: Path) -> dict[str, list[str]]:
    """podman options standing in for each of the DaemonSet's volumes, by volume name."""
    spec = pod_spec(find("DaemonSet", "lbctl"))
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "lbctl-config"
    lock = tmp / "xtables.lock"
    lock.touch()
    host = {  # hostPath -> the test's stand-in
        "/sys/fs/bpf": ["-v", f"{pin_root}:{{path}}"],
        "/sys/fs/cgroup": [
            "--mount", "type=tmpfs,destination={path}",
            "-v", f"{cg}:{{path}}/{cgroup.UNIFIED}:ro",
        ],
        "/lib/modules": ["-v", "/lib/modules:{path}:ro"],
        "/usr/src": ["-v", "/usr/src:{path}:ro"],
        "/run/xtables.lock": ["-v", f"{lock}:{{path}}"],
    }  # fmt: skip
    out = {}
    for mount in agent_container()["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            options = ["-v", f"{config_dir}:{{path}}:ro"]
        else:
            path = volume["hostPath"]["path"]
            assert path in host, f"volume {mount['name']}: no test stand-in for host {path}"
            options = host[path]
        out[mount["name"]] = [o.format(path=mount["mountPath"]) for o in options]
    return out


@pytest.fixture(scope="module")
def node(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("node")
    pin_root = BPFFS / f"{PIN_PREFIX}image"
    cg = cgroup.cgroup2_mount() / f"lbctl-test-{os.getpid()}-image"
    container = Container(image)
    lab = Lab()
    try:
        cluster = build_cluster(lab, pods=2)
        for pod in cluster.pods:
            TcpServer(pod, TARGET)  # stopped when the lab deletes its namespace
        cert, key = tls_files(tmp)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        raw = cluster.node.open_socket()
        raw.bind(("127.0.0.1", 0))
        sock = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        server = FakeApiServer(sock, bookmark_interval=0.5).start()
        cluster.node.on_delete(server.stop)
        server.apply(k8s_yaml.service("web", VIP, [("http", "TCP", PORT)]))
        slice_ = k8s_yaml.endpoint_slice(
            "web",
            [pod.ip for pod in cluster.pods],
            [("http", "TCP", TARGET)],
            nodes={pod.ip: NODE_NAME for pod in cluster.pods},
        )
        server.apply(slice_)
        server.apply(k8s_yaml.node(NODE_NAME))

        # the ConfigMap as the runbook has it edited: the API server's address, the pods' CIDR
        data = dict(find("ConfigMap", "lbctl-config")["data"])
        data |= {"apiServerHost": "127.0.0.1", "apiServerPort": str(server.port)}
        config = yaml.safe_load(data["config.yaml"])
        config["clusterCIDR"] = "10.244.0.0/16"
        config_dir, sa = tmp / "config", tmp / "serviceaccount"
        config_dir.mkdir()
        sa.mkdir()
        (config_dir / "config.yaml").write_text(yaml.safe_dump(config))
        (sa / "token").write_text("lbctl-test-token")
        (sa / "ca.crt").write_bytes(cert.read_bytes())
        (sa / "namespace").write_text("kube-system")

        spec = agent_container()
        env = ["-e", f"NODE_NAME={NODE_NAME}"]  # the downward API's spec.nodeName
        for var in spec["env"]:
            ref = var.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                env += ["-e", f"{var['name']}={data[ref['key']]}"]
        caps = capabilities(spec)
        if not can_grant(CAP_SYS_RESOURCE):
            caps -= {"SYS_RESOURCE"}
        mounts = volume_sources(tmp, pin_root, cg, config_dir)
        pin_root.mkdir()
        cg.mkdir()
        container.start(
            "--network", f"ns:{cluster.node.path}",
            "--cap-drop", "ALL", *(f"--cap-add={c}" for c in sorted(caps)),
            *env, *(o for options in mounts.values() for o in options),
            "-v", f"{sa}:{SA_DIR}:ro",
            entrypoint=spec["command"],
            image_args=spec["args"],
        )  # fmt: skip
        yield Node(container, lab, cluster.node, cluster.client.ns, pin_root, cg, config)
    finally:
        container.remove()
        nodes = [ns for ns in lab.namespaces if ns.name.endswith("-node")]
        for ns in nodes:  # the programs, the socket hooks, the pins
            subprocess.run(
                ["nsenter", f"--net={ns.path}", LBCTL, "cleanup", "--bpffs", f"{pin_root}/lbctl"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        lab.close()
        remove_pins(pin_root / "lbctl")
        remove_pins(pin_root)
        if cg.exists():
            remove_cgroup(cg)


def probe(node: Node, kind: str) -> tuple[int, dict[str, Any]]:
    spec = agent_container()
    get = spec[kind]["httpGet"]
    return node.get(get["path"], container_port(spec, get["port"]))


def ready(node: Node) -> dict[str, Any]:
    """Poll the DaemonSet's readiness probe as kubelet does, until it passes."""
    deadline = time.monotonic() + 180
    while True:
        assert node.container.running(), f"the container stopped:\n{node.container.logs()}"
        try:
            status, body = probe(node, "readinessProbe")
        except OSError:
            status, body = 0, {}
        if status == 200:
            return body
        assert time.monotonic() < deadline, f"never ready: {body}\n{node.container.logs()}"
        time.sleep(0.5)


def test_the_image_runs_the_daemonsets_agent_and_balances_a_clusterip(node: Node) -> None:
    body = ready(node)
    # the ConfigMap's mode auto picks the eBPF datapath, with the DaemonSet's capabilities
    assert body["mode"] == "ebpf" and body["synced"] is True and body["notReady"] == [], body
    for kind in ("startupProbe", "livenessProbe"):
        status, health = probe(node, kind)
        assert status == 200 and health["problems"] == [], (kind, health)
    logs = node.container.logs()
    assert "datapath ebpf, chosen by mode in /etc/lbctl/config.yaml" in logs, logs
    # found below the host's /sys/fs/cgroup stand-in: the hybrid layout's cgroup2
    assert "socket hooks on cgroup /run/lbctl/cgroup/unified: " in logs, logs
    assert (node.pin_root / "lbctl" / "lb4_services").exists()  # on the host's bpffs

    # real connections from a pod to the ClusterIP, balanced over both backend pods
    answered = [tcp_request(node.client, VIP, PORT).pod for _ in range(40)]
    assert set(answered) == {"pod0", "pod1"}, answered

    # `kubectl exec ... lbctl status`: in the container, in the node's namespace
    out = node.container.exec("lbctl", "status", "--bpffs", str(node.config["bpffs"]))
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    assert "STATUS  healthy (exit 0)" in out.stdout, out.stdout
    version = node.container.exec("lbctl", "--version")
    assert version.stdout.strip() == f"lbctl {lbctl.__version__}", version


def test_stopping_the_pod_leaves_the_datapath_serving(node: Node) -> None:
    ready(node)
    code = node.container.stop()
    assert code == 0, node.container.logs()
    assert "stopping; the datapath stays in place" in node.container.logs()
    answered = {tcp_request(node.client, VIP, PORT).pod for _ in range(20)}
    assert answered == {"pod0", "pod1"}, answered


def test_the_entrypoint_answers_version_alone(image: str) -> None:
    out = Container(image)
    try:
        run = out.once(entrypoint=inspect(image)["Config"]["Entrypoint"], image_args=["--version"])
    finally:
        out.remove()
    assert run.returncode == 0 and run.stdout.strip() == f"lbctl {lbctl.__version__}", run


FILES = r"""
for tool in lbctl ip tc iptables iptables-legacy nft bpftool sleep; do
  printf 'tool %s %s\n' "$tool" "$(command -v "$tool" || echo missing)"
done
for tool in gcc cc cpp clang make pip pip3 apt-file; do
  command -v "$tool" >/dev/null && echo "unwanted $tool"
done
for dir in /usr/src /lib/modules /etc/lbctl /run/lbctl /var/lib/apt/lists /usr/share/man; do
  [ -e "$dir" ] && [ -n "$(ls -A "$dir")" ] && echo "holds $dir"
done
ls /var/cache/apt/archives/*.deb /opt/lbctl/bin/pip* 2>/dev/null | sed 's/^/unwanted /'
find /usr/share/doc -type f ! -name copyright | head -n 3 | sed 's/^/doc /'
ls /opt/lbctl/share/lbctl/bpf | sed 's/^/bpf /'
"""


def test_the_image_and_the_manifests_agree(image: str) -> None:
    config = inspect(image)["Config"]
    agent, cleanup = agent_container(), cleanup_container()
    # the command the manifests run is the image's entrypoint, on its PATH
    assert agent["command"] == cleanup["command"] == config["Entrypoint"] == ["lbctl"]
    assert any(e.startswith("PATH=/opt/lbctl/bin:") for e in config["Env"]), config["Env"]
    # root: the manifests ask for no other user, the agent needs root's access to bpffs
    assert config.get("User", "") in ("", "0", "root"), config.get("User")
    for spec in (
        pod_spec(find("DaemonSet", "lbctl")),
        pod_spec(find("DaemonSet", "lbctl-cleanup")),
    ):
        contexts = [spec.get("securityContext", {})]
        contexts += [
            c["securityContext"] for c in spec["containers"] + spec.get("initContainers", [])
        ]
        for context in contexts:
            assert not {"runAsUser", "runAsNonRoot", "runAsGroup"} & set(context), context
    # the ports the config opens are the image's and the DaemonSet's
    ports = {f"{p['containerPort']}/{p['protocol'].lower()}" for p in agent["ports"]}
    assert set(config["ExposedPorts"]) == ports == {"10249/tcp", "10256/tcp"}

    box = Container(image)
    try:
        out = box.once(entrypoint=["sh", "-c"], image_args=[FILES])
    finally:
        box.remove()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    tools = dict(line.split()[1:] for line in lines if line.startswith("tool "))
    assert "missing" not in tools.values(), tools  # what the manifests and runbook call
    assert tools["lbctl"] == "/opt/lbctl/bin/lbctl"
    (done,) = pod_spec(find("DaemonSet", "lbctl-cleanup"))["containers"]
    assert done["command"][0] in tools  # the rollback's idle container: sleep
    # the mounts hide nothing of the image, and the headers come from the node
    assert not [line for line in lines if line.startswith("holds ")], lines
    # no build tools, no documentation, no caches
    assert not [line for line in lines if line.startswith(("unwanted ", "doc "))], lines
    sources = {line.split()[1] for line in lines if line.startswith("bpf ")}
    assert {p.name for p in (Path(__file__).parents[1] / "bpf").glob("*.[ch]")} == sources


def test_the_image_stays_small(image: str) -> None:
    """What is left is what runs (docs/deploy.md, "The image"); a guard on growth."""
    size = int(inspect(image)["Size"])
    assert size < 500_000_000, f"the image grew to {size / 1e6:.0f} MB"
