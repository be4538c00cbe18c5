"""The README's install and uninstall runbook holds true against deploy/.

No API server can run here, so every command of the runbook (the sh blocks
of README's "Deploying lbctl" section) is checked for what can be checked
without one: what it applies renders with `kubectl kustomize` and passes
every supported release's schema; the DaemonSets, labels and containers it
names are deploy/'s; its patches are valid JSON and undo each other; its
`lbctl` commands parse with lbctl's parser and name the agent's bpffs.  A
command the test does not know fails it, so the runbook cannot drift
unchecked.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbctl.cli.main import _parser
from tests.test_deploy import DEPLOY, MANIFESTS, configmap_config, documents, pod_spec
from tests.test_deploy_versions import VERSIONS, kustomize, problems

pytestmark = pytest.mark.unit  # pure: make unit runs it without root

ROOT = DEPLOY.parent
SECTION = ("## Deploying lbctl: replacing kube-proxy", "## How it works")


def runbook_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    start, end = text.index(SECTION[0]), text.index(SECTION[1])
    blocks = re.findall(r"^ *```sh\n(.*?)^ *```", text[start:end], re.S | re.M)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line in ("done",):
                continue
            if line.startswith("for "):  # for pod in $(CMD); do
                inner = re.search(r"\$\((.*)\); do$", line)
                assert inner, line
                line = inner.group(1)
            commands.append(shlex.split(line))
    return commands


def daemonsets() -> dict[str, dict[str, Any]]:
    return {
        doc["metadata"]["name"]: doc
        for path in MANIFESTS
        for doc in documents(path)
        if doc["kind"] == "DaemonSet"
    }


def option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def check_kubectl(args: list[str], seen: dict[str, Any]) -> None:
    namespace = option(args, "-n")
    if namespace is not None:
        at = args.index("-n")
        args = args[:at] + args[at + 2 :]
    verb = args[0]
    if verb == "kustomize" or "-k" in args:
        directory = ROOT / (args[1] if verb == "kustomize" else option(args, "-k") or "")
        rendered = kustomize(directory)
        for version in VERSIONS:
            assert not problems(rendered, version), (args, version)
        seen["kustomized"] = True
        return
    if "-f" in args:
        path = ROOT / (option(args, "-f") or "")
        assert path.exists() and path in MANIFESTS, args
        for version in VERSIONS:
            assert not problems(documents(path), version), (args, version)
        return
    assert namespace == "kube-system", f"{args}: deploy/ is in kube-system"
    if verb == "rollout":
        name = args[2].removeprefix("daemonset/")
        assert name in daemonsets() or name == "kube-proxy", args
        return
    if verb == "patch":
        assert args[1:3] == ["daemonset", "kube-proxy"], args
        patch = json.loads(option(args, "-p") or "")
        if option(args, "--type") == "json":
            (op,) = patch
            assert op["op"] == "remove", op
            seen["removed"] = op["path"].replace("~1", "/")
        else:
            (selector,) = patch["spec"]["template"]["spec"]["nodeSelector"].items()
            seen["added"] = f"/spec/template/spec/nodeSelector/{selector[0]}"
        return
    label = option(args, "-l")
    if label is not None:  # get pods / logs by the DaemonSets' pod labels
        key, value = label.split("=")
        (ds,) = [
            d
            for d in daemonsets().values()
            if d["spec"]["template"]["metadata"]["labels"].get(key) == value
        ]
        container = option(args, "-c")
        if container is not None:
            spec = pod_spec(ds)
            names = {c["name"] for c in spec["containers"] + spec.get("initContainers", [])}
            assert container in names, args
        return
    if verb == "exec":
        lbctl = args[args.index("--") + 1 :]
        assert lbctl[0] == "lbctl", args
        parsed = _parser().parse_args(lbctl[1:])
        seen.setdefault("lbctl", []).append(parsed)
        return
    if verb in ("describe", "get") and args[1] in ("pod", "configmap", "daemonset"):
        return  # reads only
    raise AssertionError(f"the runbook's command `kubectl {' '.join(args)}` is not checked here")


def test_every_runbook_command_holds_against_deploy(tmp_path: Path) -> None:
    commands = runbook_commands()
    assert len(commands) >= 15, commands
    seen: dict[str, Any] = {}
    for command in commands:
        tool, args = command[0], command[1:]
        if tool == "kubectl":
            check_kubectl(args, seen)
        elif (tool.startswith("IMAGE=") and args == ["make", "image"]) or command == [
            "make",
            "image",
        ]:
            assert "\nimage:" in (ROOT / "Makefile").read_text()
        elif tool in ("podman", "docker") and args[0] == "push":
            seen["pushed"] = args[1]
        else:
            raise AssertionError(f"the runbook's command `{' '.join(command)}` is not checked here")
    assert seen.get("kustomized")
    # the rollback undoes the install's node selector, exactly
    assert seen["added"] == seen["removed"], seen
    # what is pushed is what was built
    built = [c[0].removeprefix("IMAGE=") for c in commands if c[0].startswith("IMAGE=")]
    assert built == [seen["pushed"]], (built, seen)
    # `lbctl` in the agent's pod finds the maps by asking the agent (lbctl/cli/locate.py,
    # tests/test_pindir.py, and test_deploy runs it as `kubectl exec` would): no
    # --bpffs, or exactly the config's, where the DaemonSet mounts the host's bpffs
    bpffs = yaml.safe_load(configmap_config(tmp_path).read_text())["bpffs"]
    for parsed in seen["lbctl"]:
        if parsed.command == "status":
            assert parsed.bpffs is None or str(parsed.bpffs) == bpffs, parsed
    assert {p.command for p in seen["lbctl"]} == {"status", "cleanup"}


def test_the_check_notices_a_wrong_command() -> None:
    for wrong in (
        ["-n", "kube-system", "rollout", "status", "daemonset/lbctl-agent"],
        ["-n", "kube-system", "logs", "-l", "app.kubernetes.io/name=lbctl-cleanup", "-c", "clean"],
        ["-n", "kube-system", "exec", "pod", "--", "lbctl", "stats"],
        ["apply", "-f", "deploy/rollback/cleanup.yaml"],
        ["-n", "kube-system", "scale", "daemonset/lbctl"],
    ):
        try:
            check_kubectl(wrong, {})
        except (AssertionError, SystemExit):
            continue
        raise AssertionError(f"{wrong} passed")
