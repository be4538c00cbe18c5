#!/usr/bin/env python3
"""Write deploy/prometheus/prometheusrule.yaml from deploy/prometheus/lbctl-rules.yaml.

The plain rule file is the one source of lbctl's alerts; prometheus-operator
users apply the same groups as a PrometheusRule.  Run this after editing the
rule file: `python3 scripts/prometheusrule.py` (`--check` only reports whether
the PrometheusRule is up to date; tests/test_alert_rules.py runs it).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = HERE / "lbctl-rules.yaml"
TARGET = HERE / "prometheusrule.yaml"
HEADER = """\
# lbctl's alerting rules for prometheus-operator: the groups of lbctl-rules.yaml,
# generated from it by scripts/prometheusrule.py (edit that file, then run the
# script).  Your Prometheus selects PrometheusRules by label (its ruleSelector,
# e.g. release: <helm release> for kube-prometheus-stack) and by namespace
# (ruleNamespaceSelector): add what yours asks for.  README, "Alerts".
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: lbctl
  namespace: kube-system
  labels:
    app.kubernetes.io/name: lbctl
spec:
"""


def render(rules_text: str) -> str:
    """The PrometheusRule: the rule file's body (its header comment left out) under spec."""
    lines = rules_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = "".join(f"  {line}\n" if line else "\n" for line in lines[start:])
    return HEADER + body


def main(argv: list[str]) -> int:
    wanted = render(RULES.read_text())
    if "--check" in argv:
        if TARGET.read_text() != wanted:
            print(f"{TARGET} is out of date: run scripts/prometheusrule.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
