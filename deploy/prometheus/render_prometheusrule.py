"""Wrap conveyor.rules.yaml in a PrometheusRule for the Prometheus Operator.

    python3 deploy/prometheus/render_prometheusrule.py           # (re)write the PrometheusRule
    python3 deploy/prometheus/render_prometheusrule.py --check   # exit 1 if it is out of date

`make prometheusrule` runs the first. The rules file stays the one place the alerts are written; the
PrometheusRule is that file's groups, indented under ``spec:`` as they are (comments included), so the
two cannot drift apart and no YAML library is needed. tests/observability checks that the committed
PrometheusRule is what this script writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "conveyor.rules.yaml"
PROMETHEUS_RULE = ROOT / "deploy" / "k8s" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/conveyor.rules.yaml by deploy/prometheus/render_prometheusrule.py:
# edit the rules file, then run `make prometheusrule`. tests/observability fails if the two differ.
#
# Conveyor's alerts for the Prometheus Operator. Your Prometheus selects PrometheusRules by label
# (kube-prometheus-stack: `release: <its release name>`); add that label in your overlay. The alerts
# expect the scrape jobs conveyor-api, conveyor-worker and conveyor-relay (docs/metrics.md).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: conveyor
  labels:
    app.kubernetes.io/name: conveyor
    app.kubernetes.io/component: alerts
spec:
"""


def render(rules_text: str) -> str:
    """The PrometheusRule: the rules file without its leading comment, indented under ``spec:``."""
    lines = rules_text.splitlines()
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    body = "".join(f"  {line}\n" if line.strip() else "\n" for line in lines)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the PrometheusRule is out of date")
    args = parser.parse_args(argv)
    wanted = render(RULES.read_text())
    current = PROMETHEUS_RULE.read_text() if PROMETHEUS_RULE.exists() else None
    if args.check:
        if current != wanted:
            sys.stderr.write(
                f"{PROMETHEUS_RULE.relative_to(ROOT)} is out of date: run `make prometheusrule`\n"
            )
            return 1
        return 0
    if current != wanted:
        PROMETHEUS_RULE.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
