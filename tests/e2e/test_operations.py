"""Operations against the running system: dead letters, replay, purge, cancel, retry, poison and garbage
messages, scheduled jobs beyond RabbitMQ's consumer_timeout, queue statistics."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pytest
import requests
from conftest import TEST_TENANT, Keys
from support import (
    DEFAULT_QUEUE,
    ApiClient,
    ServiceProcess,
    amqp_channel,
    dead_letter_of,
    wait_for,
)

pytestmark = pytest.mark.e2e

FAILING = {"type": "demo.sleep", "payload": {"seconds": 0, "fail_attempts": 5}, "max_attempts": 1}


def submit(api: ApiClient, body: dict[str, Any]) -> str:
    response = api.submit(body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def post(api: ApiClient, path: str, body: dict[str, Any] | None = None) -> requests.Response:
    return api.session.post(f"{api.base_url}{path}", json=body, timeout=10)


def dead_letters(api: ApiClient, **params: Any) -> list[dict[str, Any]]:
    response = api.session.get(f"{api.base_url}/v1/dead-letters", params={"limit": 200, **params}, timeout=10)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def admin_of(api: ApiClient, keys: Keys) -> ApiClient:
    return ApiClient(api.base_url, keys.admin)


# --- dead letters ----------------------------------------------------------------------------------


def test_failed_job_is_listed_as_a_dead_letter_with_its_last_error(conveyor: ApiClient, keys: Keys) -> None:
    since = datetime.now(UTC).isoformat()
    job_id = submit(conveyor, FAILING)
    conveyor.wait_status(job_id, "failed")
    mine = dead_letters(conveyor, dead_after=since, type="demo.sleep")
    entry = next(d for d in mine if d["job_id"] == job_id)
    assert entry["tenant"] == TEST_TENANT
    assert entry["queue"] == "default"
    assert entry["attempts"] == 1
    assert entry["error"]["detail"].startswith("failing attempt 1")
    assert entry["error_type"] == "worker_service.handlers.demo_sleep.DemoFailure"
    assert dead_letters(conveyor, dead_after=since, error_type="NoSuchError") == []
    others = ApiClient(conveyor.base_url, keys.other_tenant)
    assert job_id not in {d["job_id"] for d in dead_letters(others)}, "a tenant sees only its own"


def test_dead_letters_are_paginated_newest_first(conveyor: ApiClient) -> None:
    since = datetime.now(UTC).isoformat()
    ids = [submit(conveyor, FAILING) for _ in range(3)]
    for job_id in ids:
        conveyor.wait_status(job_id, "failed")
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"dead_after": since, "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = conveyor.session.get(f"{conveyor.base_url}/v1/dead-letters", params=params, timeout=10).json()
        seen += [d["job_id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids)
    assert len(seen) == len(set(seen))


def test_replay_runs_each_dead_letter_once_however_often_it_is_called(
    conveyor: ApiClient, keys: Keys
) -> None:
    since = datetime.now(UTC).isoformat()
    ids = [submit(conveyor, FAILING) for _ in range(2)]
    first_deaths = {job_id: conveyor.wait_status(job_id, "failed")["finished_at"] for job_id in ids}
    admin = admin_of(conveyor, keys)
    selection = {"tenant": TEST_TENANT, "dead_after": since, "type": ["demo.sleep"]}
    replies = [post(admin, "/v1/dead-letters/replay", selection) for _ in range(2)]
    assert [r.status_code for r in replies] == [200, 200]
    assert [r.json()["replayed"] for r in replies] == [2, 0], "the second replay finds nothing left to replay"

    def failed_again(job_id: str) -> dict[str, Any] | None:
        job = conveyor.job(job_id)
        return job if job["status"] == "failed" and job["finished_at"] != first_deaths[job_id] else None

    for job_id in ids:
        again = wait_for(lambda j=job_id: failed_again(j), what="the replayed job to run its fresh attempt")
        assert again["attempts"] == 1, "one fresh attempt, run once"


def test_purge_needs_a_filter_and_keeps_the_failed_jobs(conveyor: ApiClient, keys: Keys) -> None:
    admin = admin_of(conveyor, keys)
    refused = post(admin, "/v1/dead-letters/purge", {})
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["pointer"] == "/all"
    since = datetime.now(UTC).isoformat()
    job_id = submit(conveyor, FAILING)
    conveyor.wait_status(job_id, "failed")
    purged = post(admin, "/v1/dead-letters/purge", {"tenant": TEST_TENANT, "dead_after": since})
    assert purged.status_code == 200
    assert purged.json()["purged"] >= 1
    assert dead_letter_of(conveyor, job_id) is None
    assert conveyor.job(job_id)["status"] == "failed", "the job itself stays, as failed"


def test_replay_and_purge_are_for_admins(conveyor: ApiClient) -> None:
    for path in ("/v1/dead-letters/replay", "/v1/dead-letters/purge"):
        response = post(conveyor, path, {"all": True})
        assert response.status_code == 403
        assert response.json()["type"] == "/problems/forbidden"


# --- retry and cancel -------------------------------------------------------------------------------


def test_retry_sends_a_failed_job_round_again(conveyor: ApiClient, keys: Keys) -> None:
    job_id = submit(conveyor, FAILING)
    failed = conveyor.wait_status(job_id, "failed")
    retried = post(conveyor, f"/v1/jobs/{job_id}/retry")
    assert retried.status_code == 202
    assert retried.json()["attempts"] == 0
    assert retried.json()["status"] in ("queued", "running", "failed")
    assert retried.headers["Location"] == f"/v1/jobs/{job_id}"
    wait_for(lambda: conveyor.job(job_id)["finished_at"] not in (None, failed["finished_at"]),
             what="the retried job to run again")  # fmt: skip
    assert conveyor.job(job_id)["attempts"] == 1
    intruder = ApiClient(conveyor.base_url, keys.other_tenant)
    assert post(intruder, f"/v1/jobs/{job_id}/retry").status_code == 404


def test_retry_of_a_job_that_has_not_failed_is_a_conflict(conveyor: ApiClient) -> None:
    done = submit(conveyor, {"type": "noop"})
    conveyor.wait_status(done, "succeeded")
    response = post(conveyor, f"/v1/jobs/{done}/retry")
    assert response.status_code == 409
    assert response.json()["type"] == "/problems/illegal-transition"


def test_cancelled_scheduled_job_never_runs(conveyor: ApiClient) -> None:
    job_id = submit(conveyor, {"type": "noop", "delay_seconds": 1})
    first = post(conveyor, f"/v1/jobs/{job_id}/cancel")
    assert first.status_code == 200
    assert first.json()["status"] == "cancelled"
    assert post(conveyor, f"/v1/jobs/{job_id}/cancel").status_code == 200, "cancelling twice is harmless"
    time.sleep(2.5)
    job = conveyor.job(job_id)
    assert job["status"] == "cancelled"
    assert job["attempts"] == 0
    assert job["started_at"] is None


def test_cancelling_a_finished_job_is_a_conflict(conveyor: ApiClient, keys: Keys) -> None:
    job_id = submit(conveyor, {"type": "noop"})
    conveyor.wait_status(job_id, "succeeded")
    response = post(conveyor, f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 409
    assert "succeeded" in response.json()["detail"]
    assert (
        post(ApiClient(conveyor.base_url, keys.other_tenant), f"/v1/jobs/{job_id}/cancel").status_code == 404
    )


def test_running_job_sees_the_cancel_request_and_stops(conveyor: ApiClient) -> None:
    job_id = submit(conveyor, {"type": "demo.sleep", "payload": {"seconds": 20}, "max_attempts": 3})
    wait_for(lambda: conveyor.job(job_id)["progress"], timeout=15, what="the job to run")
    requested = post(conveyor, f"/v1/jobs/{job_id}/cancel")
    assert requested.status_code == 202
    assert requested.json()["cancel_requested_at"] is not None
    job = conveyor.wait_status(job_id, "cancelled", timeout=10)
    assert job["attempts"] == 1, "a cancel-requested job is not retried"
    elapsed = datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
    assert elapsed < timedelta(seconds=10), "stopped early, not after its 20 s"


# --- poison and garbage messages, orphans -------------------------------------------------------------


def test_job_that_kills_its_worker_fails_after_max_attempts(
    conveyor: ApiClient, worker: ServiceProcess, broker_url: str
) -> None:
    job_id = submit(conveyor, {"type": "demo.sleep", "payload": {"crash": True}, "max_attempts": 2})
    for _ in range(2):
        assert worker.proc is not None
        worker.proc.wait(30)  # the job SIGKILLs a worker process; dramatiq then stops the rest
        worker.start_worker(broker_url)  # the platform restarts the pod
    job = conveyor.wait_status(job_id, "failed", timeout=30)
    assert job["attempts"] == 2
    assert job["error"]["type"] == "WorkerLost"
    assert dead_letter_of(conveyor, job_id) is not None
    survivor = submit(conveyor, {"type": "noop"})
    conveyor.wait_status(survivor, "succeeded")


def publish_raw(broker_url: str, body: bytes) -> None:
    with amqp_channel(broker_url) as channel:
        channel.basic_publish("", DEFAULT_QUEUE, body, pika.BasicProperties(delivery_mode=2))


@pytest.mark.parametrize(
    ("body", "error_type"),
    [
        (b"\xff\xfe not json at all", "InvalidMessage"),
        (json.dumps({"queue_name": DEFAULT_QUEUE, "actor_name": "no.such.type", "args": [], "kwargs": {},
                     "options": {}, "message_id": str(uuid.uuid4()), "message_timestamp": 0}).encode(),
         "UnknownJobType"),
        (json.dumps({"queue_name": DEFAULT_QUEUE, "actor_name": "noop", "args": [], "kwargs": {},
                     "options": {}, "message_id": str(uuid.uuid4()), "message_timestamp": 0}).encode(),
         "UnknownJob"),
        # dramatiq ran it, then looked up the consumer of the queue it names: none, so the worker thread
        # died (KeyError) and the message stayed unacknowledged, never filed.
        (json.dumps({"queue_name": "default", "actor_name": "noop", "args": [], "kwargs": {},
                     "options": {}, "message_id": str(uuid.uuid4()), "message_timestamp": 0}).encode(),
         "UnknownJob"),
    ],
    ids=["garbage", "unknown-type", "unknown-job", "names-another-queue"],
)  # fmt: skip
def test_invalid_message_becomes_a_visible_dead_letter_and_the_worker_goes_on(
    conveyor: ApiClient, keys: Keys, broker_url: str, body: bytes, error_type: str
) -> None:
    since = datetime.now(UTC).isoformat()
    publish_raw(broker_url, body)
    admin = admin_of(conveyor, keys)
    filed = wait_for(lambda: dead_letters(admin, dead_after=since, error_type=error_type), timeout=15,
                     what=f"a {error_type} dead letter")  # fmt: skip
    assert filed[0]["job_id"] is None
    assert filed[0]["reason"]
    assert filed[0]["message"]
    assert all(d["error_type"] != error_type for d in dead_letters(conveyor, dead_after=since)), (
        "messages that name no job are for admins only"
    )
    good = submit(conveyor, {"type": "noop"})
    conveyor.wait_status(good, "succeeded")


# --- scheduling beyond consumer_timeout ---------------------------------------------------------------


def set_consumer_timeout(ms: int) -> None:
    subprocess.run(
        ["rabbitmqctl", "eval", f"application:set_env(rabbit, consumer_timeout, {ms})."],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


@pytest.mark.broker_restart
def test_job_scheduled_beyond_consumer_timeout_runs_once_on_time(
    conveyor: ApiClient, worker: ServiceProcess, broker_url: str
) -> None:
    set_consumer_timeout(2000)
    try:
        worker.stop()
        worker.start_worker(broker_url)  # channels opened under the short timeout
        run_at = datetime.now(UTC) + timedelta(seconds=6)
        job_id = submit(conveyor, {"type": "noop", "run_at": run_at.isoformat()})
        job = conveyor.wait_status(job_id, "succeeded", timeout=30)
        started = datetime.fromisoformat(job["started_at"])
        assert run_at <= started < run_at + timedelta(seconds=3)
        assert job["attempts"] == 1
        assert worker.running, "no channel was closed under the worker for holding a message too long"
    finally:
        set_consumer_timeout(1_800_000)
        worker.stop()
        worker.start_worker(broker_url)


# --- queue statistics -----------------------------------------------------------------------------------


def test_queue_stats_show_depth_backlog_and_consumers(conveyor: ApiClient, keys: Keys) -> None:
    submit(conveyor, {"type": "noop", "delay_seconds": 3600})
    admin = admin_of(conveyor, keys)

    def stats() -> tuple[dict[str, Any], dict[str, Any]] | None:
        response = admin.session.get(f"{conveyor.base_url}/v1/queues", timeout=10)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        default = next(q for q in body["queues"] if q["name"] == "default")
        # The management API refreshes its figures every few seconds: a worker restarted by an
        # earlier test may not be counted yet.
        return (body, default) if default["consumers"] else None

    body, default = wait_for(stats, timeout=20, interval=0.5, what="the worker to show as a consumer")
    assert default["rabbitmq_queue"] == DEFAULT_QUEUE
    assert default["delayed"] >= 1
    assert default["consumers"] >= 1
    assert default["source"] == "management", "CI enables RabbitMQ's management plugin"
    assert default["unacknowledged"] is not None
    assert default["dead"] >= 0
    assert body["outbox"]["backlog"] >= 0
    refused = conveyor.session.get(f"{conveyor.base_url}/v1/queues", timeout=10)
    assert refused.status_code == 403


def test_a_worker_idle_past_its_heartbeats_stops_without_errors(
    service_env: dict[str, str], broker_url: str
) -> None:
    """dramatiq declared the queues on a connection of each consumer thread and kept it, idle (the
    consumers use connections of their own): RabbitMQ dropped it after two missed heartbeats, and
    stopping the worker then logged eight pika errors per process ("Connection reset by peer"), which
    an SRE's error alerts and the runbook's error queries picked up after every clean stop."""
    separator = "&" if "?" in broker_url else "?"
    env = {**service_env, "CONVEYOR_BROKER_URL": f"{broker_url}{separator}heartbeat=2",
           "CONVEYOR_WORKER_METRICS_BIND": ""}  # fmt: skip
    proc = ServiceProcess("worker", env)
    proc.log_path = proc.log_path.with_name(f"worker-heartbeat-2s-{uuid.uuid4().hex[:8]}.log")
    try:
        proc.start_worker(broker_url)
        time.sleep(7)  # RabbitMQ drops a connection after two missed heartbeats: here 4 s
    finally:
        assert proc.stop() == 0
    errors = [line for line in proc.log_text().splitlines() if '"level": "error"' in line]
    assert errors == [], "\n".join(errors)
