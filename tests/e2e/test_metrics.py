"""Metrics and logs as an SRE sees them: counters, queue depth, staleness, request ids."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import requests
from conftest import Keys
from prometheus_client.parser import text_string_to_metric_families
from support import DEFAULT_QUEUE, ROOT, ApiClient, ServiceProcess, free_port, pg, queue_counts, wait_for

pytestmark = pytest.mark.e2e

DEMO_FAILURE = "worker_service.handlers.demo_sleep.DemoFailure"


def scrape(
    url: str, headers: dict[str, str] | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, keyed by (name, sorted labels)."""
    response = requests.get(url, headers=headers or {}, timeout=5)
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def worker_metrics(worker: ServiceProcess, service_env: dict[str, str]) -> str:
    url = f"http://{service_env['CONVEYOR_WORKER_METRICS_BIND']}/metrics"
    wait_for(lambda: _up(url), timeout=15, what="the worker's metrics server")
    return url


@pytest.fixture
def relay_metrics(relay: ServiceProcess, service_env: dict[str, str]) -> str:
    url = f"http://{service_env['CONVEYOR_RELAY_METRICS_BIND']}/metrics"
    wait_for(lambda: _up(url), timeout=15, what="the relay's metrics server")
    return url


def _up(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def counters(url: str, job_type: str, error_type: str = DEMO_FAILURE) -> dict[str, float]:
    samples = scrape(url)
    job = {"type": job_type, "queue": "default"}
    return {
        "started": value(samples, "conveyor_worker_jobs_started_total", **job),
        "succeeded": value(samples, "conveyor_worker_jobs_succeeded_total", **job),
        "failed": value(samples, "conveyor_worker_jobs_failed_total", **job, error_type=error_type),
        "retried": value(samples, "conveyor_worker_jobs_retried_total", **job, error_type=error_type),
        "dead": value(samples, "conveyor_worker_jobs_dead_lettered_total", **job, error_type=error_type),
        "durations": value(samples, "conveyor_worker_job_duration_seconds_count", **job, outcome="succeeded"),
        "waits": value(samples, "conveyor_worker_queue_wait_seconds_count", **job),
        "in_progress": value(samples, "conveyor_worker_jobs_in_progress", **job),
    }


def quiet_counters(url: str, dsn: str) -> dict[str, float]:
    """The counters once no other demo.sleep job is running or about to start: earlier tests may leave
    some in flight, or due soon (a retry's backoff), and any of them would move the counters too. They
    must also read the same twice in a row: a success is counted by the worker's writer thread just
    after its round commits, so a job already ``succeeded`` in Postgres may not be counted yet."""
    last: list[dict[str, float]] = []

    def others() -> int:
        with pg(dsn) as cur:
            cur.execute(
                "SELECT count(*) FROM jobs WHERE type = 'demo.sleep'"
                " AND status IN ('queued', 'running', 'retrying') AND run_at < now() + interval '1 minute'"
            )
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def quiet() -> dict[str, float] | None:
        now = counters(url, "demo.sleep")
        steady = last == [now]
        last[:] = [now]
        return now if steady and now["in_progress"] == 0 and others() == 0 else None

    return wait_for(quiet, timeout=60, interval=0.2, what="no other demo.sleep job running or due")


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before if after[name] != before[name]}


@pytest.mark.parametrize(
    ("body", "final", "expected"),
    [
        ({"type": "demo.sleep", "payload": {"seconds": 0}}, "succeeded",
         {"started": 1, "succeeded": 1, "durations": 1, "waits": 1}),
        ({"type": "demo.sleep", "payload": {"seconds": 0, "fail_attempts": 1}}, "succeeded",
         {"started": 2, "failed": 1, "retried": 1, "succeeded": 1, "durations": 1, "waits": 2}),
        ({"type": "demo.sleep", "payload": {"seconds": 0, "fail_attempts": 9}, "max_attempts": 2}, "failed",
         {"started": 2, "failed": 2, "retried": 1, "dead": 1, "waits": 2}),
    ],
    ids=["success", "retry-then-success", "failure-dead-lettered"],
)  # fmt: skip
def test_worker_counters_move_by_exactly_the_right_amount(
    conveyor: ApiClient,
    worker_metrics: str,
    dsn: str,
    body: dict[str, object],
    final: str,
    expected: dict[str, float],
) -> None:
    before = quiet_counters(worker_metrics, dsn)
    job_id = conveyor.submit(body).json()["id"]
    conveyor.wait_status(job_id, final)

    def settled() -> dict[str, float] | None:
        now = counters(worker_metrics, "demo.sleep")
        return now if moved(before, now) == expected else None

    try:
        after = wait_for(settled, timeout=5, what=f"counters to move by {expected}")
    except AssertionError as timed_out:
        raise AssertionError(
            f"{timed_out}; moved: {moved(before, counters(worker_metrics, 'demo.sleep'))}"
        ) from None
    assert after["in_progress"] == before["in_progress"], "the gauge is back where it was"
    assert moved(before, after) == expected


def test_queue_depth_matches_what_rabbitmq_reports(
    conveyor: ApiClient, worker: ServiceProcess, relay_metrics: str, broker_url: str
) -> None:
    worker.stop()  # nothing consumes: the messages wait in the queue
    try:
        for _ in range(5):
            conveyor.submit({"type": "noop"})
        wait_for(lambda: queue_counts(broker_url, DEFAULT_QUEUE)[0] >= 5, what="5 ready messages")

        def exported() -> tuple[float, int] | None:
            # Compared with what RabbitMQ says at the same moment: earlier tests' retries and scheduled
            # jobs may still arrive while nothing consumes.
            got = value(scrape(relay_metrics), "conveyor_queue_ready_messages", queue="default")
            ready = queue_counts(broker_url, DEFAULT_QUEUE)[0]
            return (got, ready) if got == ready else None

        wait_for(exported, timeout=30, interval=0.5, what="the ready gauge to match RabbitMQ")
        samples = scrape(relay_metrics)
        assert value(samples, "conveyor_queue_waiting_jobs", queue="default") >= 5
        assert value(samples, "conveyor_rabbitmq_up") == 1
        assert value(samples, "conveyor_queue_stats_age_seconds") < 5
        assert value(samples, "conveyor_jobs", status="queued") >= 5
    finally:
        worker.start_worker(broker_url)


@pytest.fixture
def relay_without_rabbitmq(service_env: dict[str, str]) -> Iterator[str]:
    bind = f"127.0.0.1:{free_port()}"
    env = {
        **service_env,
        "CONVEYOR_BROKER_URL": "amqp://guest:guest@127.0.0.1:1/%2F",
        "CONVEYOR_RABBITMQ_MANAGEMENT_URL": "http://127.0.0.1:1",
        "CONVEYOR_RELAY_METRICS_BIND": bind,
    }
    proc = ServiceProcess("relay", env)
    proc.log_path = proc.log_path.with_name("relay-without-rabbitmq.log")
    proc.start()
    url = f"http://{bind}/metrics"
    wait_for(lambda: _up(url), timeout=15, what="the broker-less relay's metrics")
    yield url
    proc.stop()


def test_scrape_while_rabbitmq_is_unreachable_is_quick_and_leaves_broker_gauges_out(
    relay_without_rabbitmq: str,
) -> None:
    wait_for(lambda: ("conveyor_rabbitmq_up", ()) in scrape(relay_without_rabbitmq), what="a first refresh")
    started = time.monotonic()
    samples = scrape(relay_without_rabbitmq)
    assert time.monotonic() - started < 1.0
    assert value(samples, "conveyor_rabbitmq_up") == 0
    assert not [key for key in samples if key[0] == "conveyor_queue_ready_messages"]
    assert ("conveyor_queue_waiting_jobs", (("queue", "default"),)) in samples, "Postgres figures stay"


def test_second_worker_on_the_same_metrics_port_says_why_and_still_works(
    conveyor: ApiClient, worker_metrics: str, service_env: dict[str, str], broker_url: str
) -> None:
    second = ServiceProcess("worker", service_env)
    second.log_path = second.log_path.with_name("worker-second.log")
    second.start_worker(broker_url)
    try:
        wait_for(lambda: "worker metrics disabled: cannot listen on" in second.log_text(), timeout=15,
                 what="the second worker to explain its metrics port")  # fmt: skip
        assert second.running
        job_id = conveyor.submit({"type": "noop"}).json()["id"]
        conveyor.wait_status(job_id, "succeeded")
        assert _up(worker_metrics), "the first worker's metrics are untouched"
    finally:
        second.stop()


def test_api_metrics_use_route_templates_and_count_submissions(
    api: ApiClient, keys: Keys, settings: object
) -> None:
    url = f"{api.base_url}/metrics"
    auth = {"Authorization": f"Bearer {keys.admin}"}
    before = scrape(url, auth)
    key = str(uuid.uuid4())
    body = {"type": "noop", "delay_seconds": 3600}
    job_id = api.submit(body, key=key).json()["id"]
    api.submit(body, key=key)  # replay
    api.submit({**body, "priority": 1}, key=key)  # reused with another body: 422
    reused_in_a_batch = {"jobs": [{**body, "priority": 2, "idempotency_key": key}]}
    assert api.session.post(f"{api.base_url}/v1/jobs/batch", json=reused_in_a_batch, timeout=10).ok
    for _ in range(3):  # invented methods: one series for all of them, not one each
        api.session.request(f"X{uuid.uuid4().hex[:8].upper()}", f"{api.base_url}/v1/jobs", timeout=10)
    api.job(job_id)
    after = scrape(url, auth)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("conveyor_jobs_submitted_total", type="noop") == 1
    assert delta("conveyor_idempotent_replays_total") == 1
    assert delta("conveyor_idempotency_conflicts_total", reason="reused") == 2, "the batch's job counts"
    methods = {dict(labels)["method"] for name, labels in after if name == "conveyor_http_requests_total"}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, methods
    assert delta("conveyor_http_requests_total", method="other", route="unmatched", status="405") == 3
    route = "/v1/jobs/<uuid:job_id>"
    assert delta("conveyor_http_requests_total", method="GET", route=route, status="200") == 1
    assert not [k for k in after if job_id in str(k)], "no job id ever becomes a label"


def test_an_api_started_on_a_taken_port_leaves_the_running_apis_metrics_alone(
    api: ApiClient, keys: Keys, service_env: dict[str, str]
) -> None:
    """The directory of the API's samples is named after its bind; a second API on that bind emptied
    it before failing to bind, and the running API's counters went back to zero."""
    url, auth = f"{api.base_url}/metrics", {"Authorization": f"Bearer {keys.admin}"}
    api.submit({"type": "noop", "delay_seconds": 3600})
    before = value(scrape(url, auth), "conveyor_jobs_submitted_total", type="noop")
    assert before >= 1
    second = subprocess.run(
        [sys.executable, "-m", "shared.cli", "api"], env=service_env, cwd=ROOT, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode != 0, "the port is taken"
    assert "in use" in second.stdout + second.stderr
    assert value(scrape(url, auth), "conveyor_jobs_submitted_total", type="noop") >= before


def test_request_id_travels_from_the_request_into_the_worker_logs(
    conveyor: ApiClient, worker: ServiceProcess
) -> None:
    request_id = f"req-{uuid.uuid4().hex}"
    response = conveyor.session.post(f"{conveyor.base_url}/v1/jobs", json={"type": "noop"},
                                     headers={"X-Request-ID": request_id}, timeout=10)  # fmt: skip
    assert response.headers["X-Request-ID"] == request_id
    job_id = response.json()["id"]
    conveyor.wait_status(job_id, "succeeded")
    lines = [line for line in worker.log_text().splitlines() if job_id in line]
    assert lines
    assert all(f'"request_id": "{request_id}"' in line for line in lines if '"job succeeded"' in line)
    generated = conveyor.session.get(f"{conveyor.base_url}/v1/jobs/{job_id}", timeout=10)
    assert len(generated.headers["X-Request-ID"]) == 32, "one is generated when none is sent"
    hostile = conveyor.session.get(f"{conveyor.base_url}/v1/jobs/{job_id}", timeout=10,
                                   headers={"X-Request-ID": "x" * 500})  # fmt: skip
    assert hostile.headers["X-Request-ID"] != "x" * 500, "an unusable id is replaced, not echoed"


def test_metrics_add_up_across_gunicorn_workers_and_dramatiq_processes(
    worker: ServiceProcess, service_env: dict[str, str], keys: Keys, broker_url: str
) -> None:
    api_bind, worker_bind = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {**service_env, "CONVEYOR_API_BIND": api_bind, "CONVEYOR_API_WORKERS": "2",
           "CONVEYOR_WORKER_PROCESSES": "2", "CONVEYOR_WORKER_METRICS_BIND": worker_bind}  # fmt: skip
    api_proc, second_worker = ServiceProcess("api", env), ServiceProcess("worker", env)
    api_proc.log_path = api_proc.log_path.with_name("api-two-workers.log")
    second_worker.log_path = second_worker.log_path.with_name("worker-two-processes.log")
    worker.stop()  # only the two-process worker consumes during this test
    api_proc.start()
    try:
        wait_for(lambda: _up(f"http://{api_bind}/healthz"), timeout=30, what="the two-worker API")
        second_worker.start_worker(broker_url)
        wait_for(lambda: _up(f"http://{worker_bind}/metrics"), timeout=15, what="the worker's metrics")
        job_ids = []
        for _ in range(20):  # a new connection each time, so both gunicorn workers answer some
            headers = {"Authorization": f"Bearer {keys.writer}", "Connection": "close"}
            response = requests.post(
                f"http://{api_bind}/v1/jobs", json={"type": "noop"}, timeout=10, headers=headers
            )
            assert response.status_code == 202
            job_ids.append(response.json()["id"])
        client = ApiClient(f"http://{api_bind}", keys.writer)
        for job_id in job_ids:
            client.wait_status(job_id, "succeeded")
        api_samples = scrape(f"http://{api_bind}/metrics", {"Authorization": f"Bearer {keys.admin}"})
        assert value(api_samples, "conveyor_jobs_submitted_total", type="noop") == 20
        assert value(api_samples, "conveyor_http_requests_total", method="POST", route="/v1/jobs",
                     status="202") == 20  # fmt: skip

        def all_counted() -> bool:
            samples = scrape(f"http://{worker_bind}/metrics")
            return value(samples, "conveyor_worker_jobs_succeeded_total", type="noop", queue="default") == 20

        wait_for(all_counted, timeout=10, what="the worker processes' counts to add up to 20")
    finally:
        second_worker.stop()
        api_proc.stop()
        worker.start_worker(broker_url)
