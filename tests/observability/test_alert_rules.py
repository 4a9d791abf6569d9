"""The alert rules: valid for promtool, unit-tested alert by alert, documented in the runbook, scraped
under the job names they expect, and published unchanged as a PrometheusRule."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from promtool import ROOT, promtool

PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "conveyor.rules.yaml"
RULE_TESTS = PROMETHEUS / "conveyor.rules.test.yaml"
SCRAPE_CONFIG = PROMETHEUS / "prometheus.yml"
RENDER = PROMETHEUS / "render_prometheusrule.py"
PROMETHEUS_RULE = ROOT / "deploy" / "k8s" / "monitoring" / "prometheusrule.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"
METRICS_DOC = ROOT / "docs" / "metrics.md"
#: The scrape job names the rules are written for (up{job=...}).
JOBS = {"conveyor-api", "conveyor-worker", "conveyor-relay"}
SEVERITIES = {"warning", "critical"}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alerts() -> dict[str, dict[str, Any]]:
    groups = load(RULES)["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a Markdown file's headings."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.MULTILINE):
        text = re.sub(r"[`*_]", "", heading).lower()
        anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text)))
    return anchors


def test_rules_pass_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_rules_pass_their_promtool_unit_tests() -> None:
    result = promtool("test", "rules", str(RULE_TESTS), cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    firing: dict[str, list[dict[str, Any]]] = {}
    silent: set[str] = set()
    for group in load(RULE_TESTS)["tests"]:
        for case in group.get("alert_rule_test", []):
            if case["exp_alerts"]:
                firing.setdefault(case["alertname"], []).extend(case["exp_alerts"])
            else:
                silent.add(case["alertname"])
    assert set(firing) == set(alerts()), "every alert fires in a test, and only real alerts"
    assert silent == set(alerts()), "every alert stays silent in a test"
    for name, expected in firing.items():
        for alert in expected:
            assert alert["exp_labels"]["severity"] == alerts()[name]["labels"]["severity"], name
            assert set(alert["exp_annotations"]) == {"summary", "description", "runbook_url"}, name


def test_every_alert_has_a_severity_annotations_and_a_for_duration() -> None:
    for name, rule in alerts().items():
        assert name.startswith("Conveyor"), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name


def test_every_runbook_url_points_at_its_own_runbook_section() -> None:
    anchors = heading_anchors(RUNBOOK.read_text())
    for name, rule in alerts().items():
        assert rule["annotations"]["runbook_url"] == f"docs/runbook.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/runbook.md has no section {name}"


def test_rules_watch_the_scrape_jobs_prometheus_is_configured_with() -> None:
    asked = set(re.findall(r'job="([^"]+)"', RULES.read_text()))
    assert asked == JOBS
    config = load(SCRAPE_CONFIG)
    assert {job["job_name"] for job in config["scrape_configs"]} >= JOBS
    assert [PROMETHEUS / f for f in config["rule_files"]] == [RULES]
    documented = METRICS_DOC.read_text()
    assert [job for job in sorted(JOBS) if f"job_name: {job}" not in documented] == [], "docs/metrics.md"


def test_scrape_config_passes_promtool_check_config() -> None:
    # Syntax only: the API's token file exists only inside the compose container.
    result = promtool("check", "config", "--syntax-only", str(SCRAPE_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheusrule_is_what_the_script_renders_from_the_rules() -> None:
    result = subprocess.run([sys.executable, str(RENDER), "--check"], capture_output=True, text=True,
                            timeout=30, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    resource = load(PROMETHEUS_RULE)
    assert (resource["apiVersion"], resource["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert resource["spec"] == load(RULES)


def test_prometheusrule_spec_passes_promtool_check_rules(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"  # promtool reads files, not the resource around them
    spec.write_text(yaml.safe_dump(load(PROMETHEUS_RULE)["spec"]))
    result = promtool("check", "rules", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr


def test_monitoring_component_includes_the_prometheusrule() -> None:
    component = load(PROMETHEUS_RULE.parent / "kustomization.yaml")
    assert PROMETHEUS_RULE.name in component["resources"]


@pytest.mark.parametrize("name", sorted(alerts()))
def test_runbook_section_says_what_it_means_how_to_investigate_and_fix(name: str) -> None:
    text = RUNBOOK.read_text()
    start = text.index(f"## {name}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else None]
    for part in ("What it means", "Likely causes", "Investigate", "Fix"):
        assert f"**{part}" in section, f"{name}: no '{part}' in its runbook section"
    assert "```promql" in section, f"{name}: no PromQL to investigate with"
