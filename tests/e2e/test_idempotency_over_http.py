"""Idempotency-Key over HTTP against the running API."""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest
import requests
from conftest import TEST_TENANT
from support import ApiClient, count_rows, new_key, pg

from shared.store.idempotency import lock_id

pytestmark = pytest.mark.e2e


def jobs_labelled(dsn: str, run: str) -> int:
    with pg(dsn) as cur:
        cur.execute("SELECT count(*) FROM jobs WHERE labels @> %s", (json.dumps({"run": run}),))
        row = cur.fetchone()
        assert row is not None
        return int(row[0])


def test_replayed_key_returns_the_original_response(api: ApiClient) -> None:
    key = new_key()
    body = {"type": "noop", "delay_seconds": 3600}
    first = api.submit(body, key=key)
    again = api.submit(body, key=key)
    assert first.status_code == again.status_code == 202
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == first.headers["Location"]
    assert again.json()["id"] == first.json()["id"]


def test_key_order_and_whitespace_do_not_change_the_request(api: ApiClient, dsn: str) -> None:
    key, run = new_key(), str(uuid.uuid4())
    compact = json.dumps(
        {"type": "noop", "labels": {"run": run}, "delay_seconds": 3600}, separators=(",", ":")
    )
    spaced = json.dumps({"delay_seconds": 3600.0, "labels": {"run": run}, "type": "noop"}, indent=4)
    headers = {"Content-Type": "application/json", "Idempotency-Key": f'"{key}"'}
    first = api.session.post(f"{api.base_url}/v1/jobs", data=compact, headers=headers, timeout=10)
    second = api.session.post(
        f"{api.base_url}/v1/jobs", data=spaced, headers={**headers, "Idempotency-Key": key}, timeout=10
    )
    assert first.status_code == second.status_code == 202
    assert second.headers["Idempotent-Replayed"] == "true"
    assert jobs_labelled(dsn, run) == 1


def test_key_reused_with_a_different_request_is_422(api: ApiClient, dsn: str) -> None:
    key = new_key()
    assert api.submit({"type": "noop", "delay_seconds": 3600}, key=key).status_code == 202
    before = count_rows(dsn, "jobs")
    response = api.submit({"type": "noop", "delay_seconds": 60}, key=key)
    assert response.status_code == 422
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json()["type"] == "/problems/idempotency-key-reused"
    assert count_rows(dsn, "jobs") == before


def test_key_in_flight_is_409_with_retry_after(api: ApiClient, dsn: str) -> None:
    key = new_key()
    holder = psycopg2.connect(dsn)  # plays the first request, still inside its transaction
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id(TEST_TENANT, key),))
            response = api.submit({"type": "noop"}, key=key)
        assert response.status_code == 409
        assert response.json()["type"] == "/problems/idempotency-key-in-flight"
        assert response.headers["Retry-After"] == "1"
    finally:
        holder.rollback()
        holder.close()
    assert api.submit({"type": "noop"}, key=key).status_code == 202, "the key is free once the first is done"


def test_fifty_concurrent_identical_requests_create_exactly_one_job(api: ApiClient, dsn: str) -> None:
    key, run = new_key(), str(uuid.uuid4())
    body = {"type": "noop", "delay_seconds": 3600, "labels": {"run": run}}
    start = threading.Barrier(50)

    def send(_: int) -> requests.Response:
        with requests.Session() as session:
            session.headers["Authorization"] = api.session.headers["Authorization"]
            start.wait()
            return session.post(
                f"{api.base_url}/v1/jobs", json=body, headers={"Idempotency-Key": key}, timeout=30
            )

    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(send, range(50)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {202, 409}, statuses
    accepted = [r for r in responses if r.status_code == 202]
    assert accepted, "at least the first request is accepted"
    assert len({r.json()["id"] for r in accepted}) == 1
    assert all(r.headers["Retry-After"] == "1" for r in responses if r.status_code == 409)
    assert jobs_labelled(dsn, run) == 1


def test_a_rejected_request_does_not_use_up_its_key(api: ApiClient) -> None:
    key = new_key()
    assert api.submit({"type": "noop", "priority": 99}, key=key).status_code == 422
    fixed = api.submit({"type": "noop"}, key=key)
    assert fixed.status_code == 202
    assert "Idempotent-Replayed" not in fixed.headers


def test_an_expired_key_still_answers_for_its_unfinished_job(api: ApiClient, dsn: str) -> None:
    """A job still waiting (or retrying) past its key's TTL: the client's retry gets it back."""
    key = new_key()
    body = {"type": "noop", "delay_seconds": 3600}
    first = api.submit(body, key=key).json()["id"]
    with pg(dsn) as cur:
        cur.execute(
            "UPDATE idempotency_keys SET expires_at = now() - interval '1 hour' WHERE key = %s", (key,)
        )
    again = api.submit(body, key=key)
    assert again.status_code == 202
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json()["id"] == first


def test_expired_key_of_a_finished_job_is_a_new_request(api: ApiClient, dsn: str) -> None:
    key = new_key()
    body = {"type": "noop", "delay_seconds": 3600}
    first = api.submit(body, key=key).json()["id"]
    cancelled = api.session.post(f"{api.base_url}/v1/jobs/{first}/cancel", timeout=10)
    assert cancelled.json()["status"] == "cancelled", cancelled.text
    with pg(dsn) as cur:
        cur.execute(
            "UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = %s", (key,)
        )
    second = api.submit(body, key=key)
    assert second.status_code == 202
    assert "Idempotent-Replayed" not in second.headers
    assert second.json()["id"] != first
    assert api.submit(body, key=key).json()["id"] == second.json()["id"], "the renewed key replays again"
