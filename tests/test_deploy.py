"""deploy/: the manifests, the image recipe and the Grafana dashboard.

- Every manifest passes the Kubernetes API schemas of the newest release that
  kubernetes-validate bundles, in strict mode (an unknown field fails).
- The DaemonSet's command line parses with lbctl's own parser, its config file
  (the ConfigMap's) loads and validates with lbctl's config loader, and its
  ports, probes and mounts agree with what that configuration makes the agent
  do.
- The real agent runs with the DaemonSet's arguments, the ConfigMap's config
  file and only the DaemonSet's capabilities (`setpriv` bounds them as the
  container runtime would), against tests/apiserver.py in a test namespace:
  its probes answer on the DaemonSet's port, the API requests it makes are
  exactly the ClusterRole's rules, and every PromQL query of the dashboard
  uses only metric names, labels and label values it exports.
- With the ConfigMap's mode auto, this kernel runs the eBPF datapath; without
  CAP_SYS_ADMIN a restart fails naming that capability (not kernel headers), and
  without CAP_NET_ADMIN the start fails naming it (nothing could be attached);
  the rollback DaemonSet's `lbctl cleanup`, with its capabilities, removes
  everything; `lbctl cleanup
  --kube-proxy` works with the agent's capabilities (CAP_NET_RAW is for
  iptables-legacy); the ConfigMap's empty API server address stops the agent
  with the reason.

Nothing is attached outside the test namespaces and the test's own cgroups.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import lbctl
from lbctl.agent import config
from lbctl.cli.main import _parser
from lbctl.datapath.ebpf import cgroup
from tests import k8s_yaml
from tests.agent_proc import LBCTL
from tests.apiserver import FakeApiServer, Request
from tests.conftest import BPFFS, PIN_PREFIX, remove_pins
from tests.netlab import Netns, link_mac
from tests.test_cleanup_kube_proxy import TOOLS, build_kube_proxy

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
# deploy/prometheus/ holds a Prometheus rule file and prometheus-operator's
# objects, which need its CRDs: tests/test_alert_rules.py checks them
MONITORING = DEPLOY / "prometheus"
MANIFESTS = sorted(
    p
    for p in DEPLOY.rglob("*.yaml")
    if p.name != "kustomization.yaml" and MONITORING not in p.parents
)
DASHBOARD = DEPLOY / "grafana" / "lbctl-dashboard.json"
K8S_VERSION = kubernetes_validate.latest_version()
NODE_NAME = "node-a"
# kube-proxy's ports, which lbctl serves by default
METRICS_PORT, HEALTHZ_PORT = 10249, 10256
# What the agent reads from the API: (API group, resource, verb).
AGENT_API_USE = {
    (group, resource, verb)
    for group, resource in (("", "services"), ("", "nodes"), ("discovery.k8s.io", "endpointslices"))
    for verb in ("list", "watch")
}
# Packages the agent needs at run time; install-deps.sh must install them too.
RUNTIME_PACKAGES = {
    "python3-bpfcc",
    "libbpfcc",
    "libbpf1",
    "bpftool",
    "python3-venv",
    "iproute2",
    "iptables",
    "nftables",
}
# Labels Prometheus gives every series it scrapes, whatever the target exports.
TARGET_LABELS = {"instance", "job"}

Doc = dict[str, Any]


# -- the manifests --------------------------------------------------------------------


def documents(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def find(kind: str, name: str) -> Doc:
    found = [
        doc
        for path in MANIFESTS
        for doc in documents(path)
        if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"expected one {kind} {name} in deploy/, found {len(found)}"
    return found[0]


def pod_spec(daemonset: Doc) -> Doc:
    spec: Doc = daemonset["spec"]["template"]["spec"]
    return spec


def agent_container() -> Doc:
    (container,) = pod_spec(find("DaemonSet", "lbctl"))["containers"]
    return container


def cleanup_container() -> Doc:
    (container,) = pod_spec(find("DaemonSet", "lbctl-cleanup"))["initContainers"]
    return container


def capabilities(container: Doc) -> set[str]:
    caps = container["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"], "start from no capability and add what is needed"
    return set(caps["add"])


def parse_command(container: Doc) -> argparse.Namespace:
    """The container's command line, parsed by lbctl's own parser (exit 2 fails)."""
    assert container["command"] == ["lbctl"], container["command"]
    try:
        return _parser().parse_args(container["args"])
    except SystemExit as err:  # argparse printed why
        raise AssertionError(f"lbctl rejects {container['args']}") from err


def merged_config(args: argparse.Namespace, path: Path) -> config.Config:
    """The configuration `lbctl run` builds from the file and its flags."""
    fields = {f.name for f in dataclasses.fields(config.Config)}
    flags = {k: v for k, v in vars(args).items() if k in fields}
    merged = config.with_overrides(config.load(path), **flags)
    config.validate(merged, f"{path} and the DaemonSet's flags")
    return merged


def mount_of(spec: Doc, container: Doc, path: str) -> tuple[Doc, Doc]:
    """The volume mount covering `path` in the container, and its volume."""
    mounts = [
        m
        for m in container["volumeMounts"]
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{path} is on no volume of container {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def container_port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def schema_problem(doc: Doc) -> str | None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(str(p) for p in err.path) or "(top)"
        return f"{doc['kind']} {doc['metadata'].get('name')}: {where}: {err.message}"
    return None


def test_the_schemas_are_of_a_current_release() -> None:
    major, minor = (int(n) for n in K8S_VERSION.split(".")[:2])
    assert (major, minor) >= (1, 33), f"kubernetes-validate bundles only up to {K8S_VERSION}"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_passes_the_kubernetes_schema_strictly(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path} holds no object"
    problems = [p for p in map(schema_problem, docs) if p]
    assert not problems, f"{path}, against Kubernetes {K8S_VERSION}:\n" + "\n".join(problems)


def test_the_schema_check_rejects_unknown_fields_and_wrong_types() -> None:
    daemonset = find("DaemonSet", "lbctl")
    assert schema_problem(daemonset) is None
    misspelt = json.loads(json.dumps(daemonset))
    pod_spec(misspelt)["containers"][0]["securityContext"]["privilegd"] = False
    assert "'privilegd' was unexpected" in (schema_problem(misspelt) or "")
    wrong = json.loads(json.dumps(daemonset))
    pod_spec(wrong)["hostNetwork"] = "yes"
    assert "hostNetwork" in (schema_problem(wrong) or "")


def test_deploy_holds_what_replacing_kube_proxy_takes() -> None:
    kinds = sorted(
        (doc["kind"], doc["metadata"]["name"]) for p in MANIFESTS for doc in documents(p)
    )
    assert kinds == [
        ("ClusterRole", "lbctl"),
        ("ClusterRoleBinding", "lbctl"),
        ("ConfigMap", "lbctl-config"),
        ("DaemonSet", "lbctl"),
        ("DaemonSet", "lbctl-cleanup"),
        ("ServiceAccount", "lbctl"),
    ]
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    # the agent's objects; the rollback DaemonSet is applied on its own
    assert sorted(kustomization["resources"]) == ["configmap.yaml", "daemonset.yaml", "rbac.yaml"]
    image = agent_container()["image"]
    (entry,) = kustomization["images"]
    assert image == f"{entry['name']}:{entry['newTag']}" and entry["newTag"] == lbctl.__version__
    assert cleanup_container()["image"] == image
    assert all(
        doc["metadata"].get("namespace", "kube-system") == "kube-system"
        for doc in (d for p in MANIFESTS for d in documents(p))
    )


def test_rbac_grants_only_list_and_watch_of_what_the_agent_reads() -> None:
    role = find("ClusterRole", "lbctl")
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, f"unexpected keys in {rule}"
    assert granted(role) == AGENT_API_USE
    binding = find("ClusterRoleBinding", "lbctl")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "lbctl",
    }
    account = find("ServiceAccount", "lbctl")["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    assert pod_spec(find("DaemonSet", "lbctl"))["serviceAccountName"] == account["name"]


def granted(role: Doc) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def configmap_config(tmp_path: Path) -> Path:
    """The ConfigMap's embedded config file, written where lbctl can load it."""
    data = find("ConfigMap", "lbctl-config")["data"]
    path = tmp_path / "config.yaml"
    path.write_text(data["config.yaml"])
    return path


def test_the_daemonset_runs_the_agent_with_the_configmaps_config(tmp_path: Path) -> None:
    container = agent_container()
    args = parse_command(container)
    assert args.command == "run" and args.in_cluster
    spec = pod_spec(find("DaemonSet", "lbctl"))
    # --config names the ConfigMap's config.yaml, mounted read-only
    mount, volume = mount_of(spec, container, str(args.config))
    assert mount.get("readOnly") is True and volume["configMap"]["name"] == "lbctl-config"
    (item,) = volume["configMap"]["items"]
    assert item["key"] == "config.yaml"
    assert args.config == Path(mount["mountPath"]) / item["path"]
    cfg = merged_config(args, configmap_config(tmp_path))
    assert cfg.in_cluster and cfg.mode == "auto"  # the default: IPVS where BPF cannot run

    # ports and probes: kube-proxy's, as the agent binds them
    assert config.Config().metrics_bind_address.endswith(f":{METRICS_PORT}")
    assert config.Config().healthz_bind_address.endswith(f":{HEALTHZ_PORT}")
    assert config.parse_bind_address(cfg.metrics_bind_address) == ("0.0.0.0", METRICS_PORT)
    assert config.parse_bind_address(cfg.healthz_bind_address) == ("0.0.0.0", HEALTHZ_PORT)
    ports = {p["name"]: (p["containerPort"], p["protocol"]) for p in container["ports"]}
    assert ports == {"metrics": (METRICS_PORT, "TCP"), "healthz": (HEALTHZ_PORT, "TCP")}
    probes = {
        kind: (
            container[kind]["httpGet"]["path"],
            container_port(container, container[kind]["httpGet"]["port"]),
        )
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes == {
        "startupProbe": ("/livez", HEALTHZ_PORT),
        "livenessProbe": ("/livez", HEALTHZ_PORT),
        "readinessProbe": ("/readyz", HEALTHZ_PORT),
    }

    # the node: its network namespace, its name, every node
    assert spec["hostNetwork"] is True and spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"], "tolerate every taint"
    env = {e["name"]: e for e in container["env"]}
    assert not cfg.hostname_override, "the node name must come from NODE_NAME"
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    # --in-cluster must reach the API server directly, not through a ClusterIP
    data = find("ConfigMap", "lbctl-config")["data"]
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        ref = env[name]["valueFrom"]["configMapKeyRef"]
        assert ref["name"] == "lbctl-config" and ref["key"] in data and not ref.get("optional")

    # the host paths the agent works on
    mount, volume = mount_of(spec, container, str(cfg.bpffs))
    assert volume["hostPath"]["path"] == "/sys/fs/bpf" and not mount.get("readOnly")
    assert cfg.cgroup_path, "the socket hooks need the host's cgroup2 root"
    mount, volume = mount_of(spec, container, cfg.cgroup_path)
    assert volume["hostPath"]["path"] == "/sys/fs/cgroup"
    assert Path(cfg.cgroup_path) == Path(mount["mountPath"]), "the root of the host's hierarchy"
    for host in ("/lib/modules", "/usr/src"):  # bcc's kernel headers
        mount, volume = mount_of(spec, container, host)
        assert volume["hostPath"]["path"] == host and mount["readOnly"] is True
    security = container["securityContext"]
    assert not security.get("privileged")
    assert capabilities(container) == {
        "BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE", "NET_RAW",
    }  # fmt: skip
    text = (DEPLOY / "daemonset.yaml").read_text()
    for cap in capabilities(container):
        assert re.search(rf"#\s*{cap}:", text), f"daemonset.yaml does not say why {cap} is needed"


def test_the_rollback_daemonset_cleans_where_the_agent_pins(tmp_path: Path) -> None:
    agent_cfg = merged_config(parse_command(agent_container()), configmap_config(tmp_path))
    container = cleanup_container()
    args = parse_command(container)
    assert args.command == "cleanup" and not getattr(args, "kube_proxy", False)
    assert args.bpffs == agent_cfg.bpffs
    spec = pod_spec(find("DaemonSet", "lbctl-cleanup"))
    _, volume = mount_of(spec, container, str(args.bpffs))
    assert volume["hostPath"]["path"] == "/sys/fs/bpf"
    assert spec["hostNetwork"] is True, "lbctl cleanup works on the node's interfaces"
    assert capabilities(container) <= capabilities(agent_container())


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.replace("\\\n", " ").splitlines() if line.strip()]
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.strip().partition(" ") for line in lines)
        if not word.startswith("#")
    ]


def test_the_dockerfile_builds_what_the_daemonset_runs() -> None:
    steps = dockerfile_instructions()
    # Debian 12 unless the build names another base (make image: one made from Debian's packages)
    assert steps[0] == ("ARG", "BASE=debian:12-slim"), steps[0]
    stages = [arg for cmd, arg in steps if cmd == "FROM"]
    assert stages == ["${BASE} AS build", "${BASE}"], stages
    final = steps[max(i for i, (cmd, _) in enumerate(steps) if cmd == "FROM") :]
    runs = " ".join(arg for cmd, arg in steps if cmd == "RUN")
    installs = re.findall(r"apt-get install ([^&;]*)", runs)
    packages = {w for words in installs for w in words.split() if not w.startswith("-")}
    missing = RUNTIME_PACKAGES - packages
    assert not missing, f"the image lacks {sorted(missing)}"
    deps = (ROOT / "scripts" / "install-deps.sh").read_text()
    listed = re.search(r"DEB_PACKAGES=\((.*?)\n\)", deps, re.S)
    assert listed is not None
    dev = {w for line in listed.group(1).splitlines() for w in line.split("#")[0].split()}
    assert dev >= RUNTIME_PACKAGES, f"install-deps.sh lacks {sorted(RUNTIME_PACKAGES - dev)}"
    # a venv that sees Debian's bcc, with the package installed from its sources
    venv = re.search(r"python3 -m venv --system-site-packages (\S+)", runs)
    assert venv is not None, "the venv must see python3-bpfcc (--system-site-packages)"
    prefix = venv.group(1)
    copied = {src for cmd, arg in steps if cmd == "COPY" for src in shlex.split(arg)[:-1]}
    assert {"setup.py", "pyproject.toml", "lbctl", "bpf"} <= copied, copied
    assert re.search(rf"{re.escape(prefix)}/bin/pip install .*/src", runs)
    # what runs is installed in the final stage; the venv is copied there whole
    final_runs = " ".join(arg for cmd, arg in final if cmd == "RUN")
    assert not RUNTIME_PACKAGES - {"python3-venv"} - set(final_runs.split())
    assert ("COPY", f"--from=build {prefix} {prefix}") in final
    env = [arg for cmd, arg in final if cmd == "ENV"]
    assert f"PATH={prefix}/bin:$PATH" in env, "the DaemonSet's command `lbctl` is on PATH"
    assert ("ENTRYPOINT", '["lbctl"]') in final


# -- PromQL: the metric names, labels and values a query uses -------------------------

_FUNCTION_NAMES = """
abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month
deg delta deriv double_exponential_smoothing exp floor histogram_avg histogram_count
histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum
holt_winters hour idelta increase irate label_join label_replace last_over_time ln log10 log2
mad_over_time max_over_time min_over_time minute month pi predict_linear present_over_time
quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_by_label
sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time
timestamp vector year
"""
_AGGREGATION_NAMES = """
sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio
"""
FUNCTIONS = set(_FUNCTION_NAMES.split())
AGGREGATIONS = set(_AGGREGATION_NAMES.split())
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "start", "end", "inf", "nan"}
TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<var>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
  | (?P<range>\[[^\]]*\])
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w.]))
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][\w:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},@])
    """,
    re.VERBOSE,
)
Exposition = dict[str, dict[str, set[str]]]  # sample name -> label -> values


@dataclasses.dataclass
class Selector:
    metric: str
    matchers: list[tuple[str, str, str]]  # (label, operator, value)


@dataclasses.dataclass
class Query:
    selectors: list[Selector]
    grouping: list[str]  # labels of by/without/on/ignoring/group_left/group_right
    variables: set[str]  # Grafana variables used
    problems: list[str]  # what could not be parsed


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        match = TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read {expr[pos:]!r} in {expr!r}")
        kind = match.lastgroup or ""
        if kind != "space":
            out.append((kind, match.group()))
        pos = match.end()
    return out


def unquote(text: str) -> str:
    if text.startswith("`"):
        return text[1:-1]
    return re.sub(r"\\(.)", r"\1", text[1:-1])


def parse_query(expr: str) -> Query:
    """The selectors, grouping labels and Grafana variables of a PromQL expression."""
    toks = tokens(expr)
    query = Query([], [], set(), [])
    query.variables = {
        re.sub(r"[${}\[\]]", "", text).split(":")[0] for kind, text in toks if kind == "var"
    }
    for kind, text in toks:
        if kind in ("string", "range"):
            query.variables |= set(re.findall(r"\$\{?(\w+)", text))

    def matchers(i: int) -> tuple[list[tuple[str, str, str]], int]:
        found = []
        i += 1  # past "{"
        while i < len(toks) and toks[i][1] != "}":
            if i + 2 >= len(toks) or toks[i][0] != "ident" or toks[i + 2][0] != "string":
                query.problems.append(f"cannot read the label matcher at {toks[i][1]!r}")
                return found, len(toks)
            label, op, value = toks[i][1], toks[i + 1][1], unquote(toks[i + 2][1])
            if op not in ("=", "!=", "=~", "!~"):
                query.problems.append(f"{op!r} is not a label matcher")
            found.append((label, op, value))
            i += 3
            if i < len(toks) and toks[i][1] == ",":
                i += 1
        return found, i + 1

    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "ident" and text.lower() in GROUPING:
            i += 1
            if following == "(":
                i += 1
                while i < len(toks) and toks[i][1] != ")":
                    if toks[i][0] == "ident":
                        query.grouping.append(toks[i][1])
                    i += 1
                i += 1
        elif (
            kind == "ident"
            and text.lower() in AGGREGATIONS
            and following.lower()
            in (
                "(",
                "by",
                "without",
            )
        ):
            i += 1
        elif kind == "ident" and following == "(":
            if text not in FUNCTIONS:
                query.problems.append(f"{text}() is not a PromQL function")
            i += 1
        elif kind == "ident" and text.lower() in KEYWORDS:
            i += 1
        elif kind == "ident":
            found: list[tuple[str, str, str]] = []
            i += 1
            if following == "{":
                found, i = matchers(i)
            query.selectors.append(Selector(text, found))
        elif text == "{":
            found, i = matchers(i)
            names = [value for label, op, value in found if label == "__name__" and op == "="]
            if len(names) != 1:
                query.problems.append("a selector without a metric name")
                continue
            rest = [m for m in found if m[0] != "__name__"]
            query.selectors.append(Selector(names[0], rest))
        else:
            i += 1
    return query


def check_query(expr: str, exported: Exposition) -> list[str]:
    """What in `expr` the agent does not export: names, labels, label values."""
    query = parse_query(expr)
    problems = list(query.problems)
    labels_here = set(TARGET_LABELS)
    for sel in query.selectors:
        if sel.metric not in exported:
            problems.append(f"{sel.metric}: the agent exports no such series")
            continue
        labels = exported[sel.metric]
        labels_here |= set(labels)
        for label, _op, value in sel.matchers:
            if label in TARGET_LABELS:
                continue
            if label not in labels:
                problems.append(f"{sel.metric} has no label {label!r} (it has {sorted(labels)})")
            elif "$" not in value:
                problems += value_problems(sel.metric, label, _op, value, labels[label])
    problems += [
        f"{label!r} in by/on/without is on none of the metrics used"
        for label in query.grouping
        if label not in labels_here
    ]
    return problems


def value_problems(metric: str, label: str, op: str, value: str, values: set[str]) -> list[str]:
    if op in ("=", "!="):
        wanted = [value]
    elif re.fullmatch(r"[\w.:-]+(\|[\w.:-]+)*", value):
        wanted = value.split("|")  # alternatives of plain values: each must exist
    else:
        if any(re.fullmatch(value, v) for v in values):
            return []
        return [f'{metric}{{{label}{op}"{value}"}} matches none of {sorted(values)}']
    return [
        f'{metric}{{{label}{op}"{w}"}}: {w!r} is not a value of {label} ({sorted(values)})'
        for w in wanted
        if w not in values
    ]


def exposition(text: str) -> Exposition:
    out: Exposition = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = out.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                labels.setdefault(label, set()).add(value)
    return out


def dashboard() -> Doc:
    data: Doc = json.loads(DASHBOARD.read_text())
    return data


def dashboard_queries(board: Doc) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and template variable query."""
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
            assert match, f"variable {var['name']}: {query!r} is not label_values(expr, label)"
            expr, label = match.groups()
            out.append((f"variable {var['name']}", f"group by ({label}) ({expr})"))
    return out


def test_promql_reading() -> None:
    q = parse_query(
        'histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{instance=~"$instance", '
        'x!="y,}"}[$__rate_interval] offset 5m)))  / on(instance) group_left(map) '
        'b_total # c_comment\n + count(up == bool 0) * 1e3 - {__name__="d", k=`v`} '
        "and sum(rate(e[5m:1m])) by (job)"
    )
    assert [(s.metric, s.matchers) for s in q.selectors] == [
        ("a_bucket", [("instance", "=~", "$instance"), ("x", "!=", "y,}")]),
        ("b_total", []),
        ("up", []),
        ("d", [("k", "=", "v")]),
        ("e", []),
    ]
    assert q.grouping == ["instance", "le", "instance", "map", "job"]
    assert q.variables == {"instance", "__rate_interval"} and q.problems == []
    assert parse_query("rte(x[5m])").problems == ["rte() is not a PromQL function"]


def test_dashboard_is_a_grafana_dashboard() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    defined = {v["name"] for v in board["templating"]["list"]}
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"panel {panel['title']!r} has no query"
    queries = dashboard_queries(board)
    for where, expr in queries:
        query = parse_query(expr)
        assert not query.problems, f"{where}: {query.problems}"
        unknown = {v for v in query.variables if not v.startswith("__")} - defined
        assert not unknown, f"{where} uses undefined variables {unknown}"
    titles = " / ".join(p["title"] for p in board["panels"]).lower()
    for topic in (
        "verdict",
        "drops",
        "latency",
        "first sync",
        "map fill",
        "resources followed",
        "traffic per service",
        "drops per service",
        "sync latency",
        "network programming latency",
        "mode per node",
        "nat port exhaustion",
    ):
        assert topic in titles, f"no panel about {topic}"


# -- the real agent, as the DaemonSet runs it -----------------------------------------


def bounding_set(caps: set[str]) -> str:
    return ",".join(["-all", *sorted(f"+{c.lower()}" for c in caps)])


class CappedAgent:
    """`lbctl ARGS` in the node's namespace with only the given capabilities."""

    def __init__(self, node: Netns, caps: set[str], log: Path, env: dict[str, str]) -> None:
        self.node, self.caps, self.log, self.env = node, caps, log, env
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, *args: str) -> list[str]:
        return [
            "nsenter",
            f"--net={self.node.path}",
            "setpriv",
            "--bounding-set",
            bounding_set(self.caps),
            "--inh-caps",
            "-all",
            LBCTL,
            *args,
        ]

    def start(self, *args: str) -> CappedAgent:
        self.log.write_text("")
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                self.command(*args),
                stdout=sink,
                stderr=sink,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
            )
        return self

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}):\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"agent never logged {text!r}:\n{self.text()}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """SIGTERM the agent we started (by its PID); the datapath stays."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


def node_with_links(prefix: str) -> Netns:
    """A node namespace with a veth pair for the programs to attach to."""
    node = Netns.create(prefix)
    try:
        node.ip("link", "add", "name", "dep0", "type", "veth", "peer", "name", "dep1")
        for link in ("dep0", "dep1"):
            node.ip("link", "set", link, "up")
        node.ip("addr", "add", "192.168.240.1/24", "dev", "dep0")
    except BaseException:
        node.delete()
        raise
    return node


def new_cgroup(name: str) -> Path:
    """A fresh, empty cgroup of our own for the socket hooks (never the host's root)."""
    path = cgroup.cgroup2_mount() / f"lbctl-test-{os.getpid()}-{name}"
    path.mkdir()
    return path


def remove_cgroup(path: Path) -> None:
    deadline = time.monotonic() + 5
    while path.exists():
        try:
            path.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def cleanup_datapath(node: Netns, pin_dir: Path) -> None:
    subprocess.run(
        ["nsenter", f"--net={node.path}", LBCTL, "cleanup", "--bpffs", str(pin_dir)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    remove_pins(pin_dir)


def daemonset_args(cfg_file: Path, source: list[str], pin_dir: Path, cg: Path) -> list[str]:
    """The DaemonSet's arguments with the test's config file, source, pins and cgroup."""
    args = list(agent_container()["args"])
    args[args.index("--config") + 1] = str(cfg_file)
    at = args.index("--in-cluster")
    args[at : at + 1] = source
    return [*args, "--bpffs", str(pin_dir), "--cgroup", str(cg)]


def http_get(node: Netns, port: int, path: str) -> tuple[int, bytes]:
    with node.entered():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


@dataclasses.dataclass
class AgentRun:
    metrics: str  # the /metrics exposition
    probes: dict[str, tuple[int, Doc]]  # probe -> (status, JSON body)
    requests: list[Request]  # what the agent asked the API server
    log: str
    pin_dir: Path  # the agent's --bpffs
    commands: dict[str, subprocess.CompletedProcess[str]]  # `kubectl exec ds/lbctl -- lbctl ...`


@pytest.fixture(scope="module")
def agent_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentRun]:
    tmp = tmp_path_factory.mktemp("deploy")
    pin_dir = BPFFS / f"{PIN_PREFIX}deploy-run"
    node = node_with_links("dep")
    cg: Path | None = None
    try:
        sock = node.open_socket()
        sock.bind(("127.0.0.1", 0))
        server = FakeApiServer(sock).start()
        node.on_delete(server.stop)
        server.apply(k8s_yaml.service("web", "10.96.0.10", [("http", "TCP", 80)]))
        server.apply(k8s_yaml.endpoint_slice("web", ["10.244.0.20"], [("http", "TCP", 8080)]))
        server.apply(k8s_yaml.node(NODE_NAME))
        # no endpoints: a datagram to it is refused, so a per-Service drop is counted
        server.apply(k8s_yaml.service("empty", "10.96.0.11", [("dns", "UDP", 53)]))
        source = ["--kubeconfig", str(server.write_kubeconfig(tmp / "kubeconfig"))]
        cg = new_cgroup("deploy-run")
        args = daemonset_args(configmap_config(tmp), source, pin_dir, cg)
        caps = capabilities(agent_container())
        # NODE_NAME: what the downward API gives the pod
        agent = CappedAgent(node, caps, tmp / "agent.log", {"NODE_NAME": NODE_NAME})
        try:
            agent.start(*args).wait_for("synced:")
            # a change after the first sync, so the latency histogram has a sample
            server.apply(k8s_yaml.endpoint_slice("web", ["10.244.0.21"], [("http", "TCP", 8080)]))
            # real traffic: a datagram out of dep0 enters dep1, where tc refuses it
            node.ip(
                "neigh", "replace", "192.168.240.2", "lladdr", link_mac(node, "dep1"), "dev", "dep0"
            )
            node.ip("route", "add", "10.96.0.0/16", "via", "192.168.240.2", "dev", "dep0")
            with node.open_socket(kind=socket.SOCK_DGRAM) as udp:
                udp.sendto(b"hi", ("10.96.0.11", 53))
            deadline = time.monotonic() + 10
            while True:
                status, body = http_get(node, METRICS_PORT, "/metrics")
                applied = re.search(
                    r"^lbctl_change_apply_latency_seconds_count (\S+)$", body.decode(), re.M
                )
                # the drop series exist from the start (at 0): wait for the count
                dropped = re.search(
                    r'^lbctl_service_drops_total\{[^}]*service="empty"[^}]*\} [1-9]',
                    body.decode(),
                    re.M,
                )
                if applied and float(applied.group(1)) >= 1 and dropped:
                    break
                assert time.monotonic() < deadline, f"the change was never applied:\n{agent.text()}"
                time.sleep(0.1)
            assert status == 200
            probes = {}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                get = agent_container()[probe]["httpGet"]
                port = container_port(agent_container(), get["port"])
                code, raw = http_get(node, port, get["path"])
                probes[probe] = (code, json.loads(raw))
            requests = list(server.requests)
            # what `kubectl exec ds/lbctl -- lbctl ...` runs: no flags, the container's
            # capabilities, the node's namespace
            commands = {
                what: subprocess.run(
                    agent.command(*args), capture_output=True, text=True, timeout=60, check=False
                )
                for what, args in (
                    ("status", ("status", "-o", "json")),
                    ("maps dump", ("maps", "dump", "services", "-o", "json")),
                )
            }
        finally:
            agent.stop()
        yield AgentRun(body.decode(), probes, requests, agent.text(), pin_dir, commands)
    finally:
        cleanup_datapath(node, pin_dir)
        node.delete()
        if cg is not None:
            remove_cgroup(cg)


@pytest.mark.netns
def test_the_agent_runs_and_answers_probes_with_the_daemonsets_settings(
    agent_run: AgentRun,
) -> None:
    for probe, (status, body) in agent_run.probes.items():
        assert status == 200, f"{probe}: {status} {body}"
        # the ConfigMap's mode auto picks ebpf on this kernel, with these capabilities
        assert body["synced"] is True and body["mode"] == "ebpf" and body["problems"] == []
    log = agent_run.log
    for link in ("dep0", "dep1"):
        assert f"attached tc ingress and egress programs to {link}" in log, log
    assert "socket hooks on cgroup" in log and "0 errors" in log, log
    assert "ERROR" not in log, log


@pytest.mark.netns
def test_status_and_maps_dump_in_the_pod_need_no_flags(agent_run: AgentRun) -> None:
    """`kubectl exec ds/lbctl -- lbctl status` and `maps dump` find the agent's maps
    (its --bpffs is a test directory here, not the default) by asking the agent."""
    dump = agent_run.commands["maps dump"]
    assert dump.returncode == 0, dump.stderr
    services = {f["service"] for f in json.loads(dump.stdout)["frontends"]}
    assert services == {"test/web", "test/empty"}
    status = agent_run.commands["status"]
    assert status.returncode == 0, status.stderr
    maps = json.loads(status.stdout)["kernel"]["pinnedMaps"]
    assert maps["directory"] == str(agent_run.pin_dir) and maps["missing"] == [], maps
    assert maps["foundBy"] == f"the agent's, as its /statusz at 127.0.0.1:{HEALTHZ_PORT} says"


@pytest.mark.netns
def test_rbac_is_exactly_what_the_agent_asks_the_api_for(agent_run: AgentRun) -> None:
    used = {api_use(r) for r in agent_run.requests}
    assert used == granted(find("ClusterRole", "lbctl")), (
        f"the agent made {sorted(used)}; the ClusterRole grants "
        f"{sorted(granted(find('ClusterRole', 'lbctl')))}"
    )
    nodes = [r for r in agent_run.requests if r.path.endswith("/nodes")]
    assert nodes and all(
        r.query.get("fieldSelector") == f"metadata.name={NODE_NAME}" for r in nodes
    ), "the agent follows the Node that NODE_NAME names"


def api_use(request: Request) -> tuple[str, str, str]:
    """(API group, resource, verb) of an HTTP request, as RBAC sees it."""
    match = re.fullmatch(
        r"/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?:/namespaces/[^/]+)?/(?P<res>[^/]+)(?P<name>/[^/]+)?",
        request.path,
    )
    if match is None:
        return ("(non-resource)", request.path, request.method.lower())
    if request.method == "GET":
        named = match["name"] is not None
        verb = (
            "watch" if request.query.get("watch") in ("true", "1") else "get" if named else "list"
        )
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
            request.method, request.method.lower()
        )
    return (match["group"] or "", match["res"], verb)


@pytest.mark.netns
def test_dashboard_queries_use_only_what_the_agent_exports(agent_run: AgentRun) -> None:
    exported = exposition(agent_run.metrics)
    problems = [
        f"{where}: {problem}"
        for where, expr in dashboard_queries(dashboard())
        for problem in check_query(expr, exported)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.netns
def test_the_dashboard_check_catches_mistakes(agent_run: AgentRun) -> None:
    exported = exposition(agent_run.metrics)
    wrong = {
        "rate(lbctl_verdict_total[5m])": "lbctl_verdict_total: the agent exports no such series",
        "lbctl_change_apply_latency_seconds": "exports no such series",  # a histogram's name
        "histogram_quantile(0.9, rate(lbctl_change_apply_latency_seconds_buckets[5m]))": (
            "exports no such series"
        ),
        'rate(lbctl_verdicts_total{verdict="dropped"}[5m])': "'dropped' is not a value",
        'rate(lbctl_verdicts_total{verdict=~"drop_no_backend|drop_nat"}[5m])': "'drop_nat'",
        'lbctl_source_up{resource=~"End.*s"}': "matches none",
        'lbctl_map_entries{mapname="services"}': "has no label 'mapname'",
        "sum by (resource) (lbctl_frontends)": "'resource' in by/on/without",
        "rte(lbctl_verdicts_total[5m])": "rte() is not a PromQL function",
        '{__name__="lbctl_nope"}': "lbctl_nope: the agent exports no such series",
    }
    for expr, problem in wrong.items():
        found = check_query(expr, exported)
        assert any(problem in p for p in found), f"{expr}: expected {problem!r}, got {found}"
    right = [
        'sum by (instance, verdict) (rate(lbctl_verdicts_total{verdict=~"drop_.*"}[5m]))',
        "lbctl_map_entries / on(instance, map) lbctl_map_capacity",
        'lbctl_source_up{resource="EndpointSlice", job="lbctl"} == 0',
    ]
    for expr in right:
        assert check_query(expr, exported) == [], expr
    # a name misspelt in the real dashboard is caught
    where, expr = next(q for q in dashboard_queries(dashboard()) if "lbctl_map_capacity" in q[1])
    misspelt = expr.replace("lbctl_map_capacity", "lbctl_map_capacities")
    assert check_query(misspelt, exported) == [
        "lbctl_map_capacities: the agent exports no such series"
    ], where


@pytest.mark.netns
def test_the_daemonsets_capabilities_are_enough_and_needed(tmp_path: Path, pin_dir: Path) -> None:
    """Restarts, XDP and the rollback cleanup, each with the capabilities it is given."""
    (tmp_path / "manifests").mkdir()
    k8s_yaml.write(
        tmp_path / "manifests" / "web.yaml",
        k8s_yaml.service("web", "10.96.0.10", [("http", "TCP", 80)]),
        k8s_yaml.endpoint_slice("web", ["10.244.0.20"], [("http", "TCP", 8080)]),
    )
    caps = capabilities(agent_container())
    node = node_with_links("caps")
    cg = new_cgroup("deploy-caps")
    try:
        args = daemonset_args(
            configmap_config(tmp_path), ["--manifests", str(tmp_path / "manifests")], pin_dir, cg
        )
        # an operator who turns the XDP fast path on
        args += ["--xdp", "generic", "--external-interfaces", "dep0"]
        env = {"NODE_NAME": NODE_NAME}

        def run(caps: set[str], name: str) -> CappedAgent:
            return CappedAgent(node, caps, tmp_path / f"{name}.log", env).start(*args)

        first = run(caps, "first")
        try:
            first.wait_for("synced:")
        finally:
            first.stop()
        log = first.text()
        assert "attached XDP program (generic) to dep0" in log and "0 errors" in log, log

        # without CAP_SYS_ADMIN bcc cannot re-open the pinned maps: eBPF cannot run, and
        # the message names the missing capability (not kernel headers); mode auto then
        # falls back to IPVS, which this kernel lacks, so the restart fails
        denied = run(caps - {"SYS_ADMIN"}, "no-sys-admin")
        try:
            assert denied.wait_exit() != 0, denied.text()
        finally:
            denied.stop()
        said = denied.text()
        assert "not permitted (EPERM): this process lacks CAP_SYS_ADMIN (bcc: " in said, said
        assert "Operation not permitted" in said and "kernel headers" not in said, said
        assert "the IPVS fallback (chosen by mode in " in said, said

        # with them all, the restart adopts the running datapath
        again = run(caps, "again")
        try:
            again.wait_for("synced:")
        finally:
            again.stop()
        assert re.search(r"adopted 1 frontends?\b", again.text()), again.text()
        assert "0 errors" in again.text(), again.text()

        # without CAP_NET_ADMIN it could attach nothing: mode auto's probe finds that
        # out first and says so, instead of running a datapath no packet reaches
        blind = run(caps - {"NET_ADMIN"}, "no-net-admin")
        try:
            assert blind.wait_exit() != 0, blind.text()
        finally:
            blind.stop()
        said = blind.text()
        assert "not permitted (EPERM): this process lacks CAP_NET_ADMIN" in said, said
        assert "synced:" not in said, said

        # the rollback DaemonSet's cleanup, with its capabilities, removes everything
        container = cleanup_container()
        cleanup_args = list(container["args"])
        cleanup_args[cleanup_args.index("--bpffs") + 1] = str(pin_dir)
        out = subprocess.run(
            CappedAgent(node, capabilities(container), tmp_path / "x", {}).command(*cleanup_args),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert "XDP program detached from: dep0" in out.stdout, out.stdout
        assert "socket hooks detached: connect4, getpeername4, recvmsg4, sendmsg4" in out.stdout
        assert not pin_dir.exists(), out.stdout
        links = node.ip("-d", "link", "show").stdout
        assert "xdp" not in links, links
        for link in ("dep0", "dep1"):
            filters = node.run("tc", "filter", "show", "dev", link, "ingress").stdout
            assert filters.strip() == "", filters
    finally:
        cleanup_datapath(node, pin_dir)
        node.delete()
        remove_cgroup(cg)


@pytest.mark.netns
def test_an_api_server_address_left_empty_stops_the_agent_with_a_reason(
    tmp_path: Path, pin_dir: Path
) -> None:
    """The ConfigMap ships apiServerHost empty: the agent must refuse, not wait."""
    data = find("ConfigMap", "lbctl-config")["data"]
    env = {}
    for var in agent_container()["env"]:
        ref = var.get("valueFrom", {}).get("configMapKeyRef")
        if ref:
            env[var["name"]] = data[ref["key"]]
    assert env == {"KUBERNETES_SERVICE_HOST": "", "KUBERNETES_SERVICE_PORT": "6443"}
    args = list(agent_container()["args"])
    args[args.index("--config") + 1] = str(configmap_config(tmp_path))
    node = Netns.create("api")
    try:
        agent = CappedAgent(node, capabilities(agent_container()), tmp_path / "log", env)
        agent.start(*args, "--bpffs", str(pin_dir), "--cgroup", "")
        try:
            assert agent.wait_exit(timeout=30) == 1
        finally:
            agent.stop()
        assert "Service host/port is set but empty" in agent.text(), agent.text()
    finally:
        node.delete()


def kube_proxy_left(node: Netns) -> dict[str, bool]:
    """Whether kube-proxy's rules are still there, per backend."""
    left = {tool: "KUBE-SERVICES" in node.run(f"{tool}-save").stdout for tool in TOOLS}
    left["nftables"] = "kube-proxy" in node.run("nft", "list", "tables").stdout
    return left


@pytest.mark.netns
def test_cleanup_kube_proxy_works_in_the_agents_container(tmp_path: Path) -> None:
    """The README has `lbctl cleanup --kube-proxy` run in the agent's pod: its
    capabilities must do for both iptables backends, both families and nftables."""
    backends = (*TOOLS, "nftables")
    node = Netns.create("kp")
    try:
        build_kube_proxy(node)  # test_cleanup_kube_proxy's kube-proxy-shaped node
        assert kube_proxy_left(node) == dict.fromkeys(backends, True)
        caps = capabilities(agent_container())

        def cleanup(caps: set[str]) -> subprocess.CompletedProcess[str]:
            command = CappedAgent(node, caps, tmp_path / "x", {}).command("cleanup", "--kube-proxy")
            return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

        # iptables-legacy works through a raw socket: without CAP_NET_RAW it cannot
        partial = cleanup(caps - {"NET_RAW"})
        assert partial.returncode != 0 and "iptables-legacy" in partial.stderr, partial
        assert kube_proxy_left(node)["iptables-legacy"], partial.stdout
        assert not kube_proxy_left(node)["iptables-nft"], partial.stdout
        done = cleanup(caps)
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
        assert kube_proxy_left(node) == dict.fromkeys(backends, False), done.stdout
    finally:
        node.delete()
