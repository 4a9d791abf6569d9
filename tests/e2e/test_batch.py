"""POST /v1/jobs/batch against the running system."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from conftest import Keys
from support import ROOT, ApiClient, count_rows, new_key, pg

pytestmark = pytest.mark.e2e


def batch(api: ApiClient, jobs: list[Any]) -> requests.Response:
    return api.session.post(f"{api.base_url}/v1/jobs/batch", json={"jobs": jobs}, timeout=30)


def test_each_job_of_a_batch_gets_its_own_result(conveyor: ApiClient) -> None:
    key = new_key()
    response = batch(conveyor, [
        {"type": "noop"},
        {"type": "nope"},
        {"type": "demo.sleep", "payload": {"seconds": 0}, "idempotency_key": key},
        {"type": "noop", "idempotency_key": "has space"},
    ])  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert [r["status"] for r in results] == [202, 422, 202, 400]
    assert (body["created"], body["replayed"], body["refused"]) == (2, 0, 2)
    assert results[1]["problem"]["errors"] == [
        {"pointer": "/jobs/1/type", "detail": "Unknown job type 'nope'. Known types: demo.sleep, noop."}
    ]
    assert results[3]["problem"]["type"] == "/problems/idempotency-key-invalid"
    for created in (results[0], results[2]):
        conveyor.wait_status(created["job"]["id"], "succeeded")
    assert "RateLimit" in response.headers


def test_a_batch_replays_like_single_submissions(conveyor: ApiClient, dsn: str) -> None:
    key, run = new_key(), str(uuid.uuid4())
    job = {"type": "noop", "delay_seconds": 3600, "labels": {"run": run}}
    single = conveyor.submit(job, key=key).json()
    again = batch(conveyor, [{**job, "idempotency_key": key}, {**job, "idempotency_key": key},
                             {**job, "priority": 1, "idempotency_key": key}]).json()  # fmt: skip
    assert [r["replayed"] for r in again["results"]] == [True, True, False]
    assert {r["job"]["id"] for r in again["results"][:2]} == {single["id"]}
    assert again["results"][2]["problem"]["type"] == "/problems/idempotency-key-reused"
    fresh_key = new_key()
    twice = batch(
        conveyor, [{**job, "idempotency_key": fresh_key}, {**job, "idempotency_key": fresh_key}]
    ).json()
    first, second = twice["results"]
    assert (first["replayed"], second["replayed"]) == (False, True), "a key repeated in one batch: one job"
    assert first["job"]["id"] == second["job"]["id"]


@pytest.mark.parametrize(
    "body",
    [{"jobs": []}, {"jobs": [{"type": "noop"}] * 1001}, {"jobs": "noop"}, {"items": []}, [{"type": "noop"}]],
)
def test_a_malformed_batch_is_refused_whole(api: ApiClient, dsn: str, body: Any) -> None:
    before = count_rows(dsn, "jobs")
    response = api.session.post(f"{api.base_url}/v1/jobs/batch", json=body, timeout=30)
    assert response.status_code == 422
    assert response.json()["type"] == "/problems/validation-error"
    assert count_rows(dsn, "jobs") == before


def test_batch_needs_the_write_scope(api: ApiClient, keys: Keys) -> None:
    reader = ApiClient(api.base_url, keys.reader)
    assert batch(reader, [{"type": "noop"}]).status_code == 403


def test_a_batch_counts_every_job_against_the_rate(api: ApiClient, service_env: dict[str, str]) -> None:
    name = f"batch-{uuid.uuid4().hex[:8]}"
    created = subprocess.run([sys.executable, "-m", "shared.cli", "keys", "create", "--tenant", name,
                              "--scope", "jobs:write"], env=service_env, cwd=ROOT, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert created.returncode == 0, created.stderr
    subprocess.run([sys.executable, "-m", "shared.cli", "tenants", "set", name, "--submit-rate", "1",
                    "--submit-burst", "5", "--max-active-jobs", "6"], env=service_env, cwd=ROOT, check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    client = ApiClient(api.base_url, created.stdout.strip())
    first = batch(client, [{"type": "noop", "delay_seconds": 3600}] * 4)
    assert first.json()["created"] == 4
    refused = batch(client, [{"type": "noop", "delay_seconds": 3600}] * 4)
    assert refused.status_code == 429, "1 token left, 4 needed"
    assert refused.json()["type"] == "/problems/rate-limited"
    time.sleep(int(refused.headers["Retry-After"]) + 0.5)
    capped = batch(client, [{"type": "noop", "delay_seconds": 3600}] * 4).json()
    assert [r["status"] for r in capped["results"]] == [202, 202, 429, 429], (
        "the tenant may have 6 active jobs"
    )
    assert capped["results"][2]["problem"]["type"] == "/problems/too-many-active-jobs"


def test_concurrent_batches_of_one_tenant_all_go_through(api: ApiClient, dsn: str) -> None:
    """Each batch writes many jobs in one transaction; concurrent ones must not deadlock each other."""
    run = str(uuid.uuid4())
    jobs = [{"type": "noop", "delay_seconds": 3600, "labels": {"run": run}}] * 100

    def send(_: int) -> int:
        with requests.Session() as session:
            session.headers["Authorization"] = api.session.headers["Authorization"]
            response = session.post(f"{api.base_url}/v1/jobs/batch", json={"jobs": jobs}, timeout=60)
            assert response.status_code == 200, response.text
            return int(response.json()["created"])

    with ThreadPoolExecutor(max_workers=8) as pool:
        created = list(pool.map(send, range(16)))
    assert created == [100] * 16
    with pg(dsn) as cur:
        cur.execute("SELECT count(*) FROM jobs WHERE labels @> %s", (json.dumps({"run": run}),))
        assert cur.fetchone() == (1600,)
