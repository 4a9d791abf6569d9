"""POST /v1/jobs/batch against the running system."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import psycopg2
import pytest
import requests
from conftest import TEST_TENANT, Keys
from support import ROOT, ApiClient, count_rows, new_key, pg, wait_for

from api_service.batch import SINGLE_SUBMIT_PATH
from api_service.idempotency import fingerprint
from shared.job_types import REGISTRY
from shared.jobs import NewJob
from shared.store import jobs as job_store

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


@contextmanager
def key_being_written(dsn: str, key: str, item: dict[str, Any]) -> Iterator[tuple[Any, job_store.Job]]:
    """Another request (a batch, inside its transaction) has written ``key`` for the job ``item``
    describes and not committed yet. Yields its connection, to commit, and its job."""
    new = NewJob("noop", REGISTRY["noop"].queue, {}, 5, 3, 60, None, float(item["delay_seconds"]),
                 item.get("labels", {}))  # fmt: skip
    record = job_store.IdempotencyRecord(key, fingerprint("POST", SINGLE_SUBMIT_PATH, item), 3600, 202)
    holder = psycopg2.connect(dsn)
    try:
        with holder.cursor() as cur:
            [written] = job_store.insert_jobs(
                cur, TEST_TENANT, [job_store.NewRow(uuid.uuid4(), new, record)], max_active_jobs=10**6,
                outbox_grace_seconds=0,
            )  # fmt: skip
        assert written is not None
        yield holder, written[0]
    finally:
        holder.close()  # rolls back unless committed


def waiting_submissions(dsn: str) -> list[int]:
    """The sessions of Conveyor's API whose submission statement waits for a lock."""
    with pg(dsn) as cur:
        cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            " AND (query LIKE 'EXECUTE conveyor_insert_jobs%%' OR query LIKE 'EXECUTE conveyor_submit%%')"
        )
        return [row[0] for row in cur.fetchall()]


def in_background(send: Any) -> tuple[threading.Thread, list[Any]]:
    answers: list[Any] = []
    thread = threading.Thread(target=lambda: answers.append(send()))
    thread.start()
    return thread, answers


def test_a_keyed_batch_holds_a_handful_of_locks_not_one_per_key(api: ApiClient, dsn: str) -> None:
    """A batch used to take an advisory lock per keyed job, 1,000 for a full batch, held until COMMIT:
    a dozen concurrent batches filled Postgres' shared lock table, and every session of the server
    then failed ("out of shared memory"). Stopped by a key that sorts last, the batch has written all
    its other keys and jobs: it must hold a few locks, whatever its size."""
    item: dict[str, Any] = {"type": "noop", "delay_seconds": 3600}
    last = "zzzz-" + new_key()
    jobs = [{**item, "idempotency_key": k} for k in [*(new_key() for _ in range(999)), last]]
    with key_being_written(dsn, last, item) as (holder, written):
        sender, answer = in_background(lambda: batch(api, jobs))
        [waiting] = wait_for(lambda: waiting_submissions(dsn), timeout=20, what="the batch to wait")
        with pg(dsn) as cur:
            cur.execute("SELECT count(*) FROM pg_locks WHERE pid = %s", (waiting,))
            held = cur.fetchone()
        holder.commit()
        sender.join(timeout=30)
    assert held is not None
    assert held[0] < 50, f"the waiting batch holds {held[0]} locks"
    assert not sender.is_alive()
    [response] = answer
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["created"], body["replayed"]) == (999, 1)
    assert body["results"][-1]["job"]["id"] == str(written.id)


@pytest.mark.parametrize("via", ["batch", "single"])
def test_a_key_another_batch_is_writing_is_waited_for_then_replayed(
    api: ApiClient, dsn: str, via: str
) -> None:
    """Another batch has written the key and not committed yet: a batch item with that key, or a single
    submission, waits for it and replays its job. (Before, a batch item had no lock to tell it the key
    was taken, and was refused as if the tenant were at its cap.)"""
    key, other = new_key(), new_key()
    item: dict[str, Any] = {"type": "noop", "delay_seconds": 3600}

    def send() -> requests.Response:
        if via == "single":
            return api.submit(item, key=key)
        return batch(api, [{**item, "idempotency_key": key}, {**item, "idempotency_key": other}])

    with key_being_written(dsn, key, item) as (holder, written):
        sender, answer = in_background(send)
        wait_for(lambda: waiting_submissions(dsn), timeout=10, what="the request to wait for the key")
        holder.commit()
        sender.join(timeout=30)
    assert not sender.is_alive()
    [response] = answer
    if via == "single":
        assert response.status_code == 202, response.text
        assert response.headers.get("Idempotent-Replayed") == "true"
        assert response.json()["id"] == str(written.id)
        return
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert (first["status"], first["replayed"]) == (202, True), first["problem"]
    assert first["job"]["id"] == str(written.id)
    assert (second["status"], second["replayed"]) == (202, False)


def test_batches_sharing_keys_in_opposite_orders_wait_in_one_order_and_create_each_job_once(
    api: ApiClient, dsn: str
) -> None:
    """Eight batches, half with the keys reversed, all held up by a key in the middle that another
    request is writing. Keys taken in the batch's own order would deadlock them once it commits;
    taken in one order (sorted), they wait for each other and every key names one job."""
    run = str(uuid.uuid4())
    keys = sorted(new_key() for _ in range(200))
    item: dict[str, Any] = {"type": "noop", "delay_seconds": 3600, "labels": {"run": run}}

    def send(n: int) -> requests.Response:
        ordered = keys if n % 2 else keys[::-1]
        with requests.Session() as session:
            session.headers["Authorization"] = api.session.headers["Authorization"]
            jobs = [{**item, "idempotency_key": k} for k in ordered]
            return session.post(f"{api.base_url}/v1/jobs/batch", json={"jobs": jobs}, timeout=60)

    with key_being_written(dsn, keys[100], item) as (holder, written), ThreadPoolExecutor(8) as pool:
        sent = [pool.submit(send, n) for n in range(8)]
        wait_for(lambda: len(waiting_submissions(dsn)) == 8, timeout=20, what="all eight batches to wait")
        holder.commit()
        responses = [future.result(timeout=60) for future in sent]
    answers = []
    for n, response in enumerate(responses):
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert {r["status"] for r in results} == {202}, [r["problem"] for r in results if r["problem"]]
        ordered = keys if n % 2 else keys[::-1]
        answers.append({key: r["job"]["id"] for key, r in zip(ordered, results, strict=True)})
    assert all(answer == answers[0] for answer in answers), "every batch names the same job per key"
    assert answers[0][keys[100]] == str(written.id)
    with pg(dsn) as cur:
        cur.execute("SELECT count(*) FROM jobs WHERE labels @> %s", (json.dumps({"run": run}),))
        assert cur.fetchone() == (200,)
