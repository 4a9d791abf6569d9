"""The real ``/metrics`` of the API, the worker and the relay, after traffic that gives every metric
family samples: promtool finds nothing to say about them, and the alert rules and the dashboard ask
only for metrics and labels that they export."""

from __future__ import annotations

import json
import re
from typing import Any

import pika
import pytest
import requests
import yaml
from conftest import Keys
from prometheus_client.parser import text_string_to_metric_families
from promql import PROMETHEUS_SERIES, TARGET_LABELS, label_names, metric_names
from promtool import ROOT, promtool
from support import DEFAULT_QUEUE, ApiClient, ServiceProcess, amqp_channel, wait_for

from shared.settings import Settings

pytestmark = pytest.mark.e2e

RULES = ROOT / "deploy" / "prometheus" / "conveyor.rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "conveyor-dashboard.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

Exposition = dict[str, str]


def scrape(url: str, headers: dict[str, str] | None = None) -> str:
    response = requests.get(url, headers=headers or {}, timeout=5)
    assert response.status_code == 200, response.text
    return response.text


def families_without_samples(text: str) -> list[str]:
    return [family.name for family in text_string_to_metric_families(text) if not family.samples]


def _submit(api: ApiClient, body: dict[str, Any], key: str | None = None) -> requests.Response:
    response = api.submit(body, key=key)
    assert response.status_code in (202, 200, 422, 429), response.text
    return response


def _limited_client(base_url: str, settings: Settings) -> ApiClient:
    """A client of a tenant allowed one submission: its second one is refused by the rate limit."""
    from shared.api_keys import Scope, generate_key
    from shared.store import Database
    from shared.store import api_keys as key_store
    from shared.store import tenants as tenant_store

    new = generate_key()

    def create(cur: Any) -> None:
        tenant_store.create_tenant(cur, "observability-limited")
        tenant_store.set_limits(cur, "observability-limited", max_active_jobs=None,
                                submit_rate_per_second=0.001, submit_burst=1)  # fmt: skip
        key_store.insert_key(cur, new, "observability-limited", frozenset({Scope.JOBS_WRITE}), "tests")

    db = Database(settings)
    try:
        db.run(create)
    finally:
        db.close()
    return ApiClient(base_url, new.key)


def _make_traffic(
    api: ApiClient, worker: ServiceProcess, broker_url: str, settings: Settings, keys: Keys
) -> None:
    """Jobs and requests that touch every metric: success, retry, dead letter, cancel, lost job,
    replay, idempotency conflict, rate limit, and a garbage message the relay files."""
    # First, since it restarts the worker (and so its counters): a job that kills its worker process.
    # Its lease lapses and the relay counts it in conveyor_jobs_lost_total.
    lost = _submit(api, {"type": "demo.sleep", "payload": {"crash": True}, "max_attempts": 1}).json()["id"]
    assert worker.proc is not None
    worker.proc.wait(30)  # dramatiq stops the other processes once one is killed
    worker.start_worker(broker_url)

    done = _submit(api, {"type": "noop"}).json()["id"]
    retried = _submit(api, {"type": "demo.sleep", "payload": {"seconds": 0, "fail_attempts": 1}}).json()["id"]
    failing = {"type": "demo.sleep", "payload": {"seconds": 0, "fail_attempts": 5}, "max_attempts": 1}
    dead = _submit(api, failing).json()["id"]
    slow = _submit(api, {"type": "demo.sleep", "payload": {"seconds": 30}}).json()["id"]

    key = f"observability-{worker.proc.pid}"
    _submit(api, {"type": "noop"}, key=key)
    assert _submit(api, {"type": "noop"}, key=key).status_code == 202, "a replay"
    assert _submit(api, {"type": "noop", "priority": 1}, key=key).status_code == 422, "a reused key"

    limited = _limited_client(api.base_url, settings)
    assert _submit(limited, {"type": "noop"}).status_code == 202
    assert _submit(limited, {"type": "noop"}).status_code == 429

    with amqp_channel(broker_url) as channel:
        channel.basic_publish("", DEFAULT_QUEUE, b"not a job", pika.BasicProperties(delivery_mode=2))

    wait_for(lambda: api.job(slow)["progress"], timeout=15, what="the slow job to run")
    cancel = api.session.post(f"{api.base_url}/v1/jobs/{slow}/cancel", timeout=10)
    assert cancel.status_code == 202, cancel.text

    api.wait_status(done, "succeeded")
    api.wait_status(retried, "succeeded")
    api.wait_status(dead, "failed")
    api.wait_status(slow, "cancelled")
    api.wait_status(lost, "failed", timeout=30)


@pytest.fixture(scope="module")
def exposition(
    api_process: ServiceProcess,
    worker_process: ServiceProcess,
    relay_process: ServiceProcess,
    keys: Keys,
    settings: Settings,
    service_env: dict[str, str],
    broker_url: str,
) -> Exposition:
    """The text of each endpoint's /metrics once every metric family it declares has samples."""
    if not worker_process.running:
        worker_process.start_worker(broker_url)
    if not relay_process.running:
        relay_process.start()
    api = ApiClient(f"http://{settings.api_bind}", keys.writer)
    _make_traffic(api, worker_process, broker_url, settings, keys)
    urls = {
        "api": (f"http://{settings.api_bind}/metrics", {"Authorization": f"Bearer {settings.metrics_token}"}),
        "worker": (f"http://{service_env['CONVEYOR_WORKER_METRICS_BIND']}/metrics", {}),
        "relay": (f"http://{service_env['CONVEYOR_RELAY_METRICS_BIND']}/metrics", {}),
    }

    def complete() -> Exposition | None:
        texts = {name: scrape(url, headers) for name, (url, headers) in urls.items()}
        return texts if not any(families_without_samples(text) for text in texts.values()) else None

    try:
        texts = wait_for(complete, timeout=30, interval=0.5, what="samples in every metric family")
    except AssertionError:
        texts = {name: scrape(url, headers) for name, (url, headers) in urls.items()}
        empty = {name: families_without_samples(text) for name, text in texts.items()}
        pytest.fail(f"metric families without samples (promtool would not lint them): {empty}")
    return texts


@pytest.mark.parametrize("endpoint", ["api", "worker", "relay"])
def test_promtool_check_metrics_finds_nothing(exposition: Exposition, endpoint: str) -> None:
    result = promtool("check", "metrics", stdin=exposition[endpoint])
    assert (result.returncode, result.stdout + result.stderr) == (0, ""), exposition[endpoint]


def exported(exposition: Exposition) -> dict[str, set[str]]:
    """Every sample name the three endpoints export (histograms' _bucket, _sum, _count included), with
    its label names; plus what Prometheus adds."""
    names: dict[str, set[str]] = {n: set(labels) for n, labels in PROMETHEUS_SERIES.items()}
    for text in exposition.values():
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                names.setdefault(sample.name, set()).update(sample.labels)
    return names


def unknown_names(expr: str, legend: str, names: dict[str, set[str]]) -> list[str]:
    """Metric names the expression reads that nothing exports, and labels none of its metrics carry."""
    metrics = metric_names(expr)
    missing = sorted(m for m in metrics if m not in names)
    labels = set(TARGET_LABELS).union(*(names.get(m, set()) for m in metrics))
    return missing + sorted(f"label {label}" for label in label_names(expr, legend) - labels)


def test_dashboard_queries_read_only_exported_metrics_and_labels(exposition: Exposition) -> None:
    names = exported(exposition)
    board = json.loads(DASHBOARD.read_text())
    problems = {}
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            unknown = unknown_names(target["expr"], target.get("legendFormat", ""), names)
            if unknown:
                problems[f"{panel['title']} {target['refId']}"] = unknown
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(<metric>, <label>)
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"]).groups()
            if label not in names.get(metric, set()):
                problems[f"variable {variable['name']}"] = [metric, label]
    assert problems == {}


def test_alert_rules_read_only_exported_metrics_and_labels(exposition: Exposition) -> None:
    names = exported(exposition)
    rules = yaml.safe_load(RULES.read_text())
    problems = {
        rule["alert"]: unknown
        for group in rules["groups"]
        for rule in group["rules"]
        if (unknown := unknown_names(rule["expr"], "", names))
    }
    assert problems == {}


def test_every_exported_metric_is_documented(exposition: Exposition) -> None:
    documented = METRICS_DOC.read_text()
    families = {
        family.name
        for text in exposition.values()
        for family in text_string_to_metric_families(text)
        # prometheus_client's <counter>_created gauges are documented once, not one by one.
        if family.name.startswith("conveyor_") and not family.name.endswith("_created")
    }
    assert sorted(f for f in families if f"`{f}" not in documented) == []
