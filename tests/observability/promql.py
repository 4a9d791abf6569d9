"""Reading the metric and label names out of PromQL expressions, and checking expressions with promtool.

Not a PromQL parser: promtool judges the syntax (``check_syntax``); this only collects names to compare
with what the services really export.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from promtool import promtool

#: Labels Prometheus attaches to every scraped series, and the bucket label of histograms.
TARGET_LABELS = frozenset({"job", "instance", "le"})
#: Series Prometheus makes itself for every target: name -> labels.
PROMETHEUS_SERIES = {"up": TARGET_LABELS - {"le"}}

_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
_LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
#: Grafana's variables, replaced by something PromQL accepts before promtool reads an expression.
_GRAFANA_INTERVAL = re.compile(r"\$__(?:rate_)?interval")
_GRAFANA_VARIABLE = re.compile(r"\$\{?\w+\}?")


def metric_names(expr: str) -> set[str]:
    """The Conveyor metric names (and ``up``) an expression reads."""
    words = set(_IDENTIFIER.findall(_STRING.sub('""', expr)))
    return {w for w in words if w.startswith("conveyor_") or w in PROMETHEUS_SERIES}


def label_names(expr: str, legend: str = "") -> set[str]:
    """Label names an expression groups or matches on, and those a Grafana legend prints."""
    grouped = {name.strip() for names in _GROUPING.findall(expr) for name in names.split(",") if name.strip()}
    return grouped | set(_MATCHER.findall(expr)) | set(_LEGEND.findall(legend))


def as_promql(grafana_expr: str) -> str:
    """A Grafana panel's query with its variables replaced: what Prometheus would receive."""
    return _GRAFANA_VARIABLE.sub(".*", _GRAFANA_INTERVAL.sub("5m", grafana_expr))


def check_syntax(exprs: list[str], tmp_path: Path) -> str:
    """promtool's complaints about these expressions (written as recording rules), or ''."""
    rules = [{"record": f"conveyor:check_{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path = tmp_path / "exprs.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    return "" if result.returncode == 0 else result.stdout + result.stderr
