"""The whole pipeline over HTTP: the real API (gunicorn), worker (dramatiq) and relay processes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from support import DEFAULT_QUEUE, ApiClient, ServiceProcess, dead_letter_of, peek_message_ids, pg, wait_for

pytestmark = pytest.mark.e2e

DEAD_LETTERS = DEFAULT_QUEUE + ".XQ"


def submit(api: ApiClient, body: dict[str, object]) -> str:
    response = api.submit(body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    assert response.headers["Location"] == f"/v1/jobs/{job_id}"
    return job_id


def test_submitted_job_runs_to_success(conveyor: ApiClient) -> None:
    response = conveyor.submit({"type": "noop", "labels": {"suite": "e2e"}})
    assert response.status_code == 202
    accepted = response.json()
    assert accepted["status"] == "queued"
    assert accepted["attempts"] == 0
    job = conveyor.wait_status(accepted["id"], "succeeded")
    assert job["attempts"] == 1
    assert job["error"] is None
    assert job["started_at"] is not None
    assert job["finished_at"] is not None
    assert job["labels"] == {"suite": "e2e"}


def test_failed_attempt_is_retried_then_succeeds(conveyor: ApiClient) -> None:
    job_id = submit(conveyor, {"type": "demo.sleep", "payload": {"seconds": 0, "fail_attempts": 1}})
    job = conveyor.wait_status(job_id, "succeeded")
    assert job["attempts"] == 2
    assert job["result"] == {"slept_seconds": 0, "attempt": 2}
    assert job["error"] is None


def test_exhausted_job_fails_and_becomes_a_dead_letter(conveyor: ApiClient, broker_url: str) -> None:
    job_id = submit(
        conveyor, {"type": "demo.sleep", "payload": {"seconds": 0, "fail_attempts": 5}, "max_attempts": 3}
    )
    job = conveyor.wait_status(job_id, "failed")
    assert job["attempts"] == 3
    assert job["error"]["attempt"] == 3
    assert job["error"]["type"] == "worker_service.handlers.demo_sleep.DemoFailure"
    assert "on purpose" in job["error"]["detail"]
    assert job["result"] is None
    dead = dead_letter_of(conveyor, job_id)
    assert dead is not None
    assert dead["error_type"] == "worker_service.handlers.demo_sleep.DemoFailure"
    assert dead["attempts"] == 3
    # The nacked message went through RabbitMQ's dead-letter queue, where the relay filed it away.
    wait_for(lambda: job_id not in peek_message_ids(broker_url, DEAD_LETTERS), what="the XQ copy to be filed")


def test_fatal_error_fails_the_job_after_one_attempt(conveyor: ApiClient, broker_url: str) -> None:
    job_id = submit(
        conveyor, {"type": "demo.sleep", "payload": {"seconds": 0, "fail_attempts": 1, "fatal": True}}
    )
    job = conveyor.wait_status(job_id, "failed")
    assert job["attempts"] == 1
    assert job["error"]["title"] == "The handler reported a permanent failure"
    assert dead_letter_of(conveyor, job_id) is not None


def test_attempt_past_its_timeout_is_interrupted(conveyor: ApiClient) -> None:
    job_id = submit(
        conveyor,
        {"type": "demo.sleep", "payload": {"seconds": 30}, "timeout_seconds": 1, "max_attempts": 1},
    )
    job = conveyor.wait_status(job_id, "failed", timeout=10)
    assert job["error"]["type"] == "JobTimeout"
    finished = datetime.fromisoformat(job["finished_at"])
    started = datetime.fromisoformat(job["started_at"])
    assert finished - started < timedelta(seconds=5)


def test_progress_is_visible_while_running_and_polling_gets_a_hint(conveyor: ApiClient) -> None:
    job_id = submit(conveyor, {"type": "demo.sleep", "payload": {"seconds": 2.5}})

    def running_with_progress() -> dict[str, object] | None:
        response = conveyor.session.get(f"{conveyor.base_url}/v1/jobs/{job_id}", timeout=5)
        body = response.json()
        if body["status"] == "running" and body["progress"] and body["progress"]["percent"] > 0:
            assert response.headers["Retry-After"] == "1"
            return body
        return None

    from support import wait_for

    running = wait_for(running_with_progress, timeout=10, what="progress to be reported")
    assert running["progress"]["message"].startswith("slept")  # type: ignore[index]
    done = conveyor.wait_status(job_id, "succeeded")
    assert done["progress"] == {"percent": 100.0, "message": "done"}
    finished = conveyor.session.get(f"{conveyor.base_url}/v1/jobs/{job_id}", timeout=5)
    assert "Retry-After" not in finished.headers


def test_delayed_job_waits_until_it_is_due(conveyor: ApiClient) -> None:
    response = conveyor.submit({"type": "noop", "delay_seconds": 2})
    accepted = response.json()
    due = datetime.fromisoformat(accepted["run_at"])
    assert due - datetime.fromisoformat(accepted["created_at"]) == timedelta(seconds=2)
    hint = conveyor.session.get(f"{conveyor.base_url}/v1/jobs/{accepted['id']}", timeout=5)
    assert hint.json()["status"] == "queued"
    assert 1 <= int(hint.headers["Retry-After"]) <= 2
    job = conveyor.wait_status(accepted["id"], "succeeded", timeout=15)
    assert datetime.fromisoformat(job["started_at"]) >= due


def test_job_scheduled_with_run_at_starts_on_time(conveyor: ApiClient) -> None:
    run_at = datetime.now(UTC) + timedelta(seconds=1.5)
    job_id = submit(conveyor, {"type": "noop", "run_at": run_at.isoformat()})
    job = conveyor.wait_status(job_id, "succeeded", timeout=15)
    started = datetime.fromisoformat(job["started_at"])
    assert run_at <= started < run_at + timedelta(seconds=5)


def list_jobs(api: ApiClient, **params: object) -> dict[str, object]:
    response = api.session.get(f"{api.base_url}/v1/jobs", params=params, timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def test_pagination_is_stable_while_new_jobs_arrive(api: ApiClient) -> None:
    batch = str(uuid.uuid4())
    created = [
        submit(api, {"type": "noop", "delay_seconds": 3600, "labels": {"batch": batch}}) for _ in range(5)
    ]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, object] = {"label": f"batch:{batch}", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = list_jobs(api, **params)
        seen += [job["id"] for job in page["items"]]  # type: ignore[attr-defined]
        submit(
            api, {"type": "noop", "delay_seconds": 3600, "labels": {"batch": batch}}
        )  # arrives mid-listing
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(created)), "newest first, each job exactly once, no newcomer mid-listing"


def test_list_filters_by_status_type_label_and_time(api: ApiClient) -> None:
    tag = str(uuid.uuid4())
    before = datetime.now(UTC)
    scheduled = submit(api, {"type": "noop", "delay_seconds": 3600, "labels": {"tag": tag, "kind": "a"}})
    other = submit(api, {"type": "demo.sleep", "delay_seconds": 3600, "labels": {"tag": tag, "kind": "b"}})

    def ids(**params: object) -> list[str]:
        params.setdefault("label", f"tag:{tag}")
        return [job["id"] for job in list_jobs(api, **params)["items"]]  # type: ignore[attr-defined]

    assert ids() == [other, scheduled]
    assert ids(type="noop") == [scheduled]
    assert ids(label=[f"tag:{tag}", "kind:b"]) == [other]
    assert ids(status=["queued"]) == [other, scheduled]
    assert ids(status=["succeeded", "failed"]) == []
    assert ids(created_after=before.isoformat()) == [other, scheduled]
    assert ids(created_before=before.isoformat()) == []


def test_the_api_forgets_the_outbox_rows_it_published_without_the_relay(
    api: ApiClient, worker: ServiceProcess, relay: ServiceProcess, dsn: str
) -> None:
    relay.stop()  # only the API can delete these rows now
    try:
        single = submit(api, {"type": "noop"})
        response = api.session.post(f"{api.base_url}/v1/jobs/batch", json={"jobs": [{"type": "noop"}] * 50},
                                    timeout=30)  # fmt: skip
        assert response.status_code == 200, response.text
        ids = [single] + [r["job"]["id"] for r in response.json()["results"]]

        def rows_left() -> int:
            with pg(dsn) as cur:
                cur.execute("SELECT count(*) FROM outbox WHERE job_id = ANY(%s::uuid[])", (ids,))
                row = cur.fetchone()
                assert row is not None
                return int(row[0])

        # Published inline, confirmed, then deleted by the API's background thread within ~50 ms.
        wait_for(lambda: rows_left() == 0, timeout=5, interval=0.05, what="the API to delete its outbox rows")
        for job_id in (ids[0], ids[-1]):
            api.wait_status(job_id, "succeeded")
    finally:
        relay.start()
