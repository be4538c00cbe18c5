"""The configuration file: parsing, defaults, errors, durations, addresses, precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbctl.agent import config
from lbctl.agent.config import Config, ConfigError
from lbctl.datapath.ebpf.settings import DEFAULT_PIN_DIR, BpfSettings

pytestmark = pytest.mark.unit  # pure: make unit runs it without root

HEADER = "apiVersion: lbctl.io/v1alpha1\nkind: LbctlConfiguration\n"

FULL = (
    HEADER
    + """\
mode: ebpf
hostnameOverride: node-a
clientConnection:
  kubeconfig: /etc/lbctl/kubeconfig
  inCluster: false
interfaces: [eth0, eth1]
bpffs: /sys/fs/bpf/other
metricsBindAddress: "127.0.0.1:9100"
healthzBindAddress: "[::]:10256"
capacity:
  maxServices: 1024
  maxBackends: 2048
  maxSlots: 8192
  conntrackSize: 4096
conntrack:
  tcpEstablishedTimeout: 1h30m
  tcpSynTimeout: 30s
  tcpCloseWaitTimeout: 5
  udpTimeout: 2m
syncPeriod: 24h0m0s
"""
)


def write(tmp_path: Path, text: str, name: str = "lbctl.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_full_file_round_trips_into_config_and_bpf_settings(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, FULL))
    assert cfg == Config(
        mode="ebpf",
        hostname_override="node-a",
        kubeconfig=Path("/etc/lbctl/kubeconfig"),
        in_cluster=False,
        manifests=None,
        interfaces=("eth0", "eth1"),
        bpffs=Path("/sys/fs/bpf/other"),
        metrics_bind_address="127.0.0.1:9100",
        healthz_bind_address="[::]:10256",
        max_services=1024,
        max_backends=2048,
        max_slots=8192,
        ct_size=4096,
        ct_tcp_timeout_s=5400,
        ct_tcp_syn_timeout_s=30,
        ct_tcp_closing_timeout_s=5,
        ct_udp_timeout_s=120,
        sync_period_s=86400,
    )
    config.validate(cfg)  # exactly one source: the kubeconfig
    assert cfg.bpf_settings() == BpfSettings(
        pin_dir=Path("/sys/fs/bpf/other"),
        max_services=1024,
        max_backends=2048,
        max_slots=8192,
        ct_size=4096,
        ct_tcp_timeout_s=5400,
        ct_tcp_syn_timeout_s=30,
        ct_tcp_closing_timeout_s=5,
        ct_udp_timeout_s=120,
    )


def test_absent_keys_take_the_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, HEADER))
    assert cfg == Config()
    assert cfg.mode == "auto"
    assert cfg.interfaces is None
    assert cfg.bpffs == DEFAULT_PIN_DIR
    assert cfg.metrics_bind_address == "127.0.0.1:10249"  # kube-proxy's default
    assert cfg.healthz_bind_address == "0.0.0.0:10256"
    assert cfg.sync_period_s == 30
    assert cfg.bpf_settings() == BpfSettings()


def test_null_and_empty_values_mean_unset_but_empty_address_disables(tmp_path: Path) -> None:
    text = HEADER + (
        'hostnameOverride: ""\nclientConnection:\n  kubeconfig: ""\nconntrack:\n'
        'interfaces: null\nmetricsBindAddress: ""\n'
    )
    cfg = config.load(write(tmp_path, text))
    assert cfg == Config(metrics_bind_address="")
    assert config.parse_bind_address(cfg.metrics_bind_address) is None


@pytest.mark.parametrize(
    ("body", "path", "words"),
    [
        ("conntrack:\n  udpTimeOut: 1s\n", "conntrack.udpTimeOut", ["udpTimeout", "valid keys"]),
        ("metricsPort: 1\n", "metricsPort", ["unknown key", "syncPeriod"]),
        ("conntrack: 5\n", "conntrack", ["expected a mapping", "tcpSynTimeout"]),
        ("conntrack:\n  udpTimeout: 1.5m\n", "conntrack.udpTimeout", ["fractions", "1h30m"]),
        ("conntrack:\n  tcpSynTimeout: 10ms\n", "conntrack.tcpSynTimeout", ["sub-second"]),
        ("conntrack:\n  udpTimeout: '60'\n", "conntrack.udpTimeout", ["missing unit", "60s"]),
        ("conntrack:\n  udpTimeout: 0s\n", "conntrack.udpTimeout", ["not positive"]),
        ("syncPeriod: -5\n", "syncPeriod", ["negative"]),
        ("capacity:\n  maxSlots: 0\n", "capacity.maxSlots", ["out of range"]),
        ("capacity:\n  maxSlots: -3\n", "capacity.maxSlots", ["out of range"]),
        ("capacity:\n  maxSlots: '1k'\n", "capacity.maxSlots", ["whole number"]),
        ("capacity:\n  conntrackSize: true\n", "capacity.conntrackSize", ["whole number"]),
        ("clientConnection:\n  inCluster: 'yes'\n", "clientConnection.inCluster", ["true or"]),
        ("interfaces: eth0\n", "interfaces", ["list of interface names"]),
        ("interfaces: []\n", "interfaces", ["empty list", "leave it out"]),
        ("interfaces: [a/b]\n", "interfaces", ["not an interface name"]),
        ("bpffs: relative/dir\n", "bpffs", ["not absolute"]),
        ("metricsBindAddress: '0.0.0.0'\n", "metricsBindAddress", ["host:port", '""']),
        ("healthzBindAddress: '::1:80'\n", "healthzBindAddress", ["brackets"]),
        ("healthzBindAddress: '1.2.3.4:70000'\n", "healthzBindAddress", ["65535"]),
        ("healthzBindAddress: 'node:80'\n", "healthzBindAddress", ["not an IP address"]),
        ("mode: iptables\n", "mode", ["unknown mode", "mode: ebpf"]),
        ("hostnameOverride: 42\n", "hostnameOverride", ["expected a string"]),
    ],
)
def test_each_error_names_file_field_and_fix(
    tmp_path: Path, body: str, path: str, words: list[str]
) -> None:
    file = write(tmp_path, HEADER + body, "bad-config.yaml")
    with pytest.raises(ConfigError) as caught:
        config.load(file)
    message = str(caught.value)
    assert message.startswith(f"{file}: {path}: ")
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("kind: LbctlConfiguration\n", ["apiVersion: missing", "lbctl.io/v1alpha1"]),
        ("apiVersion: v1\nkind: LbctlConfiguration\n", ["apiVersion: got 'v1'"]),
        ("apiVersion: lbctl.io/v1alpha1\nkind: KubeProxyConfiguration\n", ["kind: got"]),
        ("", ["empty", "apiVersion"]),
        ("- a\n- b\n", ["expected a mapping"]),
        ("apiVersion: [\n", ["not valid YAML", "fix the syntax"]),
        ("just text\n", ["expected a mapping"]),
    ],
)
def test_document_level_errors_name_the_file(tmp_path: Path, text: str, words: list[str]) -> None:
    file = write(tmp_path, text, "doc.yaml")
    with pytest.raises(ConfigError) as caught:
        config.load(file)
    assert str(caught.value).startswith(f"{file}: ")
    for word in words:
        assert word in str(caught.value)


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        config.load(missing)
    with pytest.raises(ConfigError, match=r"cannot read the config file"):
        config.load(tmp_path)  # a directory
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match=r"binary\.yaml: cannot read"):
        config.load(binary)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("60s", 60),
        ("10m", 600),
        ("1h", 3600),
        ("1h30m", 5400),
        ("24h0m0s", 86400),
        ("86400s", 86400),
        ("1m1s", 61),
        ("0", 0),
        (0, 0),
        (45, 45),
        (" 2m ", 120),
    ],
)
def test_parse_duration(value: str | int, seconds: int) -> None:
    assert config.parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("1.5h", "fractions"),
        ("90", "missing unit"),
        ("1h30", "missing unit"),
        ("500ms", "sub-second"),
        ("1d", "unknown unit"),
        ("-1s", "not a positive duration"),
        ("", "not a positive duration"),
        ("soon", "not a duration"),
        (-1, "negative"),
    ],
)
def test_parse_duration_rejects(value: str | int, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        config.parse_duration(value)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("0.0.0.0:10249", ("0.0.0.0", 10249)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::]:10249", ("::", 10249)),
        ("[fd00::1]:65535", ("fd00::1", 65535)),
        ("", None),
    ],
)
def test_parse_bind_address(text: str, parsed: tuple[str, int] | None) -> None:
    assert config.parse_bind_address(text) == parsed


@pytest.mark.parametrize(
    "text", ["0.0.0.0", ":10249", "::1:80", "[::1]", "1.2.3.4:65536", "1.2.3.4:x", "host:80"]
)
def test_parse_bind_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"host:port|brackets|port|IP address"):
        config.parse_bind_address(text)


def test_with_overrides_flag_beats_file_beats_default(tmp_path: Path) -> None:
    text = HEADER + "manifests: /srv/manifests\ncapacity:\n  maxSlots: 1000\n"
    from_file = config.load(write(tmp_path, text))
    merged = config.with_overrides(
        from_file,
        max_slots=None,  # flag not given: the file's value stays
        max_services=77,  # flag given: beats the default
        manifests=Path("/flag/dir"),  # flag given: beats the file
        interfaces=["eth9"],  # the CLI's list becomes the frozen tuple
        in_cluster=None,
    )
    assert merged.max_slots == 1000
    assert merged.max_services == 77
    assert merged.manifests == Path("/flag/dir")
    assert merged.interfaces == ("eth9",)
    assert merged.max_backends == Config().max_backends  # neither: the default
    assert from_file.manifests == Path("/srv/manifests")  # the input is unchanged
    config.validate(merged)


def test_with_overrides_of_nothing_is_the_same_config() -> None:
    base = Config(max_slots=5)
    assert config.with_overrides(base, max_slots=None, mode=None) == base


def test_with_overrides_rejects_unknown_fields() -> None:
    with pytest.raises(TypeError):
        config.with_overrides(Config(), no_such_field=1)


@pytest.mark.parametrize(
    "sources",
    [
        {"manifests": Path("/m")},
        {"kubeconfig": Path("/k")},
        {"in_cluster": True},
    ],
)
def test_validate_accepts_exactly_one_source(sources: dict[str, object]) -> None:
    config.validate(config.with_overrides(Config(), **sources))


@pytest.mark.parametrize(
    ("sources", "problem"),
    [
        ({}, "no source is set"),
        ({"manifests": Path("/m"), "kubeconfig": Path("/k")}, "more than one source"),
        ({"manifests": Path("/m"), "in_cluster": True}, "more than one source"),
        ({"kubeconfig": Path("/k"), "in_cluster": True}, "more than one source"),
    ],
)
def test_validate_rejects_zero_or_several_sources(sources: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.validate(config.with_overrides(Config(), **sources), "cfg.yaml + flags")
    message = str(caught.value)
    assert message.startswith("cfg.yaml + flags: ")
    assert problem in message
    for fix in ("--manifests", "--kubeconfig", "--in-cluster", "clientConnection.inCluster"):
        assert fix in message


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ({"max_services": 0}, "capacity.maxServices"),
        ({"ct_udp_timeout_s": 0}, "conntrack.udpTimeout"),
        ({"mode": "iptables"}, "mode"),
        ({"healthz_bind_address": "nowhere"}, "healthzBindAddress"),
        ({"interfaces": []}, "interfaces"),
    ],
)
def test_validate_checks_values_that_came_from_flags(
    override: dict[str, object], path: str
) -> None:
    merged = config.with_overrides(Config(manifests=Path("/m")), **override)
    with pytest.raises(ConfigError, match=rf"^flags: {path}: "):
        config.validate(merged, "flags")


def test_example_file_is_valid_and_shows_the_defaults() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "lbctl-config.yaml"
    cfg = config.load(example)
    assert cfg == Config(manifests=Path("/etc/lbctl/manifests"))
    config.validate(cfg)
    text = example.read_text()
    for key in config._FIELDS:
        assert f"{key.rsplit('.', 1)[-1]}:" in text


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--manifests", "{tmp}", "--kubeconfig", "{tmp}/kc"], "more than one source is set"),
        ([], "no source is set; set exactly one source"),
        (["--config", "{tmp}/missing.yaml"], "missing.yaml: config file not found"),
        (["--kubeconfig", "{tmp}/nothing"], "kubeconfig {tmp}/nothing: "),
        (["--manifests", "{tmp}", "--max-slots", "0"], "capacity.maxSlots: 0 is out of range"),
    ],
)
def test_lbctl_run_refuses_a_bad_configuration_with_the_fix(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    """The real CLI: exit 1, one line naming the setting; nothing is compiled or pinned."""
    import subprocess
    import sys

    lbctl = str(Path(sys.executable).parent / "lbctl")
    pins = Path("/sys/fs/bpf") / f"lbctl-test-cli-{tmp_path.name}"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    run = subprocess.run(
        [lbctl, "run", "--bpffs", str(pins), *argv], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1, run.stderr
    assert expected.replace("{tmp}", str(tmp_path)) in run.stderr
    assert not pins.exists()


def test_flags_replace_the_files_source_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        f"apiVersion: {config.API_VERSION}\nkind: {config.KIND}\nmode: ipvs\n"
        "clientConnection:\n  inCluster: true\n"
    )
    cfg = config.load(path)
    merged = config.with_overrides(cfg, kubeconfig=Path("/etc/kubeconfig"), mode="ebpf")
    config.validate(merged)
    assert (merged.kubeconfig, merged.in_cluster, merged.mode) == (
        Path("/etc/kubeconfig"),
        False,
        "ebpf",
    )
    config.validate(cfg)  # ipvs is a mode of its own now
