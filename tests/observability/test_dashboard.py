"""The Grafana dashboard: importable as is (a datasource variable, no datasource uid of anyone's Grafana),
laid out on Grafana's 24-column grid, with the panels an SRE expects, and every query valid PromQL.
test_exposition.py checks its queries against the metrics the services really export."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from promql import as_promql, check_syntax
from promtool import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "conveyor-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])  # inside a collapsed row


def queries() -> Iterator[tuple[str, dict[str, Any]]]:
    """(panel title, target) of every query."""
    for panel in panels():
        for target in panel.get("targets", []):
            yield panel["title"], target


def test_dashboard_is_loadable_as_is() -> None:
    board = dashboard()
    assert isinstance(board["schemaVersion"], int)
    assert board["schemaVersion"] >= 36  # Grafana 9.4 and later
    assert board["uid"]
    assert board["title"]
    assert board.get("id") is None, "an id belongs to one Grafana's database"
    assert "__inputs" not in board, "a datasource variable, not an import-time input"
    (variable,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert (variable["name"], variable["query"]) == ("datasource", "prometheus")


def test_every_query_uses_the_datasource_variable_not_a_fixed_uid() -> None:
    for title, target in queries():
        assert target["datasource"] == DATASOURCE, title
    for panel in panels():
        if panel["type"] != "row":
            assert panel["datasource"] == DATASOURCE, panel["title"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


def test_panels_have_unique_ids_and_fit_the_grid() -> None:
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids))
    for panel in panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert {t["refId"] for t in panel["targets"]} == {
                chr(ord("A") + i) for i in range(len(panel["targets"]))
            }, panel["title"]


@pytest.mark.parametrize(
    ("subject", "metrics"),
    [
        ("throughput", ["conveyor_jobs_submitted_total", "conveyor_worker_jobs_started_total",
                        "conveyor_worker_jobs_succeeded_total"]),
        ("failures", ["conveyor_worker_jobs_failed_total", "conveyor_worker_jobs_retried_total",
                      "conveyor_worker_jobs_dead_lettered_total"]),
        ("queue depth", ["conveyor_queue_ready_messages", "conveyor_queue_unacknowledged_messages",
                         "conveyor_queue_waiting_jobs", "conveyor_queue_delayed_jobs",
                         "conveyor_queue_running_jobs", "conveyor_queue_dead_letters"]),
        ("latency", ["conveyor_http_request_duration_seconds_bucket",
                     "conveyor_worker_job_duration_seconds_bucket",
                     "conveyor_worker_queue_wait_seconds_bucket"]),
        ("outbox", ["conveyor_outbox_backlog_messages", "conveyor_outbox_oldest_age_seconds"]),
    ],
)  # fmt: skip
def test_dashboard_charts(subject: str, metrics: list[str]) -> None:
    charted = " ".join(target["expr"] for _, target in queries())
    assert [m for m in metrics if m not in charted] == [], subject


def test_latency_panels_are_percentiles() -> None:
    for title, target in queries():
        if "_bucket" in target["expr"]:
            assert target["expr"].startswith("histogram_quantile("), title


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    exprs = [as_promql(target["expr"]) for _, target in queries()]
    assert check_syntax(exprs, tmp_path) == ""
