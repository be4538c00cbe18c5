"""deploy/ applies on every Kubernetes release it supports: 1.24 to the newest.

Each manifest, and what `kubectl kustomize deploy/` renders (what `kubectl
apply -k deploy/` sends), passes each release's API schema strictly: an
unknown field fails, as the API server's schema makes `kubectl apply` refuse
it (a v1.24 server refused `appArmorProfile`, a field of 1.30).  The check
itself is shown to catch that field on the releases before 1.30.

No AppArmor setting is needed on any release: the runtime's default profile
denies writes under /sys (but /sys/fs/cgroup), and nothing the agent or the
rollback's `lbctl cleanup` writes is there in the container: the host's bpffs
is mounted at /run/lbctl/bpffs.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import k8s_schemas
from tests.test_deploy import (
    DEPLOY,
    MANIFESTS,
    agent_container,
    cleanup_container,
    configmap_config,
    documents,
    find,
    merged_config,
    mount_of,
    parse_command,
    pod_spec,
)

VERSIONS = k8s_schemas.supported()


def problems(docs: list[dict[str, Any]], version: str) -> list[str]:
    found = []
    for doc in docs:
        try:
            k8s_schemas.validate(doc, version)
        except k8s_schemas.SchemaProblem as err:
            found.append(str(err))
    return found


def test_the_supported_releases_run_from_1_24_to_a_current_one() -> None:
    assert VERSIONS[0] == "1.24"
    assert k8s_schemas._minor(VERSIONS[-1]) >= (1, 33), VERSIONS[-1]
    # the oldest comes from the older wheel, the rest from kubernetes-validate itself
    assert "1.24" not in k8s_schemas.bundled() and k8s_schemas.OLD_WHEEL.exists()


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_passes_each_releases_schema(version: str) -> None:
    found = [p for path in MANIFESTS for p in problems(documents(path), version)]
    assert not found, f"against Kubernetes {version}:\n" + "\n".join(found)


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing (make deps installs Debian's kubernetes-client)"
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc is not None]


def test_what_kubectl_apply_k_sends_passes_every_releases_schema() -> None:
    rendered = kustomize(DEPLOY)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in rendered)
    assert kinds == [
        ("ClusterRole", "lbctl"),
        ("ClusterRoleBinding", "lbctl"),
        ("ConfigMap", "lbctl-config"),
        ("DaemonSet", "lbctl"),
        ("ServiceAccount", "lbctl"),
    ]
    (daemonset,) = (d for d in rendered if d["kind"] == "DaemonSet")
    (container,) = pod_spec(daemonset)["containers"]
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    assert container["image"] == f"{image['newName']}:{image['newTag']}"
    for version in VERSIONS:
        found = problems(rendered, version)
        assert not found, f"kubectl apply -k deploy/ against Kubernetes {version}:\n" + "\n".join(
            found
        )


def test_the_check_refuses_what_a_release_does_not_know() -> None:
    """What the v1.24 API server refused: `appArmorProfile`, a field since 1.30."""
    daemonset = copy.deepcopy(find("DaemonSet", "lbctl"))
    pod_spec(daemonset)["containers"][0]["securityContext"]["appArmorProfile"] = {
        "type": "Unconfined"
    }
    for version in VERSIONS:
        found = problems([daemonset], version)
        if k8s_schemas._minor(version) < (1, 30):
            assert len(found) == 1 and "'appArmorProfile' was unexpected" in found[0], found
        else:
            assert found == [], (version, found)


def test_no_apparmor_setting_is_needed(tmp_path: Path) -> None:
    """Nothing written under /sys in the containers, so the default profile does."""
    for name in ("lbctl", "lbctl-cleanup"):
        daemonset = find("DaemonSet", name)
        text = yaml.safe_dump(daemonset)
        assert "apparmor" not in text.lower(), f"DaemonSet {name} sets AppArmor"
    args = parse_command(agent_container())
    agent = merged_config(args, configmap_config(tmp_path))
    cleanup = parse_command(cleanup_container())
    for where, container, bpffs in (
        ("lbctl", agent_container(), agent.bpffs),
        ("lbctl-cleanup", cleanup_container(), cleanup.bpffs),
    ):
        assert not str(bpffs).startswith("/sys/"), f"{where} writes pins at {bpffs}"
        spec = pod_spec(find("DaemonSet", where))
        mount, volume = mount_of(spec, container, str(bpffs))
        assert mount["mountPath"] == "/run/lbctl/bpffs", mount
        assert volume["hostPath"]["path"] == "/sys/fs/bpf", volume
        for m in container["volumeMounts"]:
            if m["mountPath"].startswith("/sys/"):
                assert m.get("readOnly") is True, f"{where} may write at {m['mountPath']}"
