"""Nothing lost, nothing run twice: real process kills, a broker outage and duplicated messages."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEST_TENANT, Keys
from support import (
    DEFAULT_QUEUE,
    ApiClient,
    ServiceProcess,
    free_port,
    one_value,
    pg,
    queue_counts,
    rabbitmqctl,
    wait_for,
    wait_for_http,
)

from shared.broker import Publisher, create_broker
from shared.jobs import NewJob
from shared.messages import Dispatch
from shared.settings import Settings
from shared.store import Database
from shared.store import jobs as job_store

pytestmark = pytest.mark.e2e

QUEUE = DEFAULT_QUEUE


def submit(api: ApiClient, body: dict[str, object]) -> str:
    response = api.submit(body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def outbox_rows(dsn: str, job_id: str) -> int:
    return int(one_value(dsn, "SELECT count(*) FROM outbox WHERE job_id = %s", job_id))


def wait_queue_drained(broker_url: str) -> None:
    wait_for(lambda: queue_counts(broker_url, QUEUE)[0] == 0, timeout=20, what=f"{QUEUE} to drain")


def test_job_committed_but_never_published_is_delivered_by_the_relay(
    conveyor: ApiClient, settings: Settings
) -> None:
    """The API died between COMMIT and publish: only the outbox row knows about the job."""
    db = Database(settings)
    job_id = uuid.uuid4()
    new = NewJob("noop", "default", {}, 5, 1, 60, None, 0.0, {})
    db.run(
        lambda cur: job_store.insert_job(
            cur,
            job_id,
            TEST_TENANT,
            new,
            max_active_jobs=10**6,
            outbox_grace_seconds=settings.outbox_grace_seconds,
        )
    )
    db.close()
    job = conveyor.wait_status(str(job_id), "succeeded", timeout=15)
    assert job["attempts"] == 1


@pytest.fixture
def api_without_broker(service_env: dict[str, str], keys: Keys) -> Iterator[ApiClient]:
    # A free port, not the session API's plus one: that one lies among the ephemeral ports, and a client
    # connection that had it as its local port and closed first keeps it bound for a minute (TIME_WAIT).
    port = free_port()
    env = {**service_env, "CONVEYOR_API_BIND": f"127.0.0.1:{port}",
           "CONVEYOR_BROKER_URL": "amqp://guest:guest@127.0.0.1:1/%2F"}  # fmt: skip
    proc = ServiceProcess("api", env)
    proc.log_path = proc.log_path.with_name("api-without-broker.log")
    proc.start()
    client = ApiClient(f"http://127.0.0.1:{port}", keys.writer)
    wait_for_http(proc, f"{client.base_url}/healthz", what="the broker-less API")
    yield client
    proc.stop()


def test_submit_while_rabbitmq_is_unreachable_is_accepted_and_runs_later(
    api_without_broker: ApiClient, worker: ServiceProcess, relay: ServiceProcess, dsn: str
) -> None:
    started = time.monotonic()
    job_id = submit(api_without_broker, {"type": "noop"})
    assert time.monotonic() - started < 5, "a dead broker must not hold the request"
    assert outbox_rows(dsn, job_id) == 1, "the job waits in the outbox"
    ready = api_without_broker.session.get(f"{api_without_broker.base_url}/readyz", timeout=10)
    assert ready.status_code == 503
    reason = ready.json()["checks"]["rabbitmq"]
    assert reason.startswith("AMQPConnectionError: "), reason
    assert "Connection refused" in reason, "the reason, not only the exception's name"
    job = api_without_broker.wait_status(job_id, "succeeded", timeout=20)
    assert job["attempts"] == 1
    assert outbox_rows(dsn, job_id) == 0


def test_relay_killed_while_publishing_loses_no_job_and_runs_none_twice(
    api_without_broker: ApiClient, worker: ServiceProcess, relay: ServiceProcess, broker_url: str, dsn: str
) -> None:
    """SIGKILL the relay in the middle of a backlog: the batch it was publishing is due again as soon
    as its transaction ends (some of its messages are then published twice), and the rows it never
    reached wait for the next relay. The API cannot reach RabbitMQ here, so the relay publishes all."""
    worker.stop()
    backlog = str(uuid.uuid4())

    def submit_batch() -> None:
        response = api_without_broker.session.post(
            f"{api_without_broker.base_url}/v1/jobs/batch",
            json={"jobs": [{"type": "noop", "labels": {"backlog": backlog}}] * 500},
            timeout=60,
        )
        assert response.status_code == 200, response.text

    for _ in range(2):
        submit_batch()
    wait_for(lambda: queue_counts(broker_url, QUEUE)[0] > 0, timeout=30, interval=0.01,
             what="the relay to start publishing")  # fmt: skip
    relay.kill()
    for _ in range(2):  # committed while no relay runs
        submit_batch()

    def backlog_jobs() -> tuple[int, int, int, int]:
        with pg(dsn) as cur:
            cur.execute(
                "SELECT count(*), count(*) FILTER (WHERE status = 'succeeded'), COALESCE(max(attempts), 0),"
                " (SELECT count(*) FROM outbox o JOIN jobs j ON j.id = o.job_id WHERE j.labels @> %s)"
                " FROM jobs WHERE labels @> %s",
                (f'{{"backlog": "{backlog}"}}',) * 2,
            )
            row = cur.fetchone()
            assert row is not None
            return int(row[0]), int(row[1]), int(row[2]), int(row[3])

    total, _, _, waiting = backlog_jobs()
    assert total == 2000
    assert waiting >= 1000, "the jobs submitted after the kill wait in the outbox"
    relay.start()
    worker.start_worker(broker_url)
    wait_for(lambda: backlog_jobs()[1:] == (2000, 1, 0), timeout=90, interval=0.5,
             what="every job of the backlog to run once and the outbox to empty")  # fmt: skip


@pytest.mark.broker_restart
def test_rabbitmq_restart_loses_no_job(conveyor: ApiClient, broker_url: str) -> None:
    before = submit(conveyor, {"type": "demo.sleep", "payload": {"seconds": 0}, "delay_seconds": 1})
    rabbitmqctl("stop_app")
    try:
        during = submit(conveyor, {"type": "noop"})
        ready = conveyor.session.get(f"{conveyor.base_url}/readyz", timeout=10)
        assert ready.status_code == 503
    finally:
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")
    for job_id in (before, during):
        job = conveyor.wait_status(job_id, "succeeded", timeout=60)
        assert job["attempts"] == 1
    after = submit(conveyor, {"type": "noop"})
    conveyor.wait_status(after, "succeeded", timeout=30)


def test_duplicated_message_runs_the_job_once(
    conveyor: ApiClient, worker: ServiceProcess, settings: Settings, broker_url: str
) -> None:
    worker.stop()
    job_id = submit(conveyor, {"type": "demo.sleep", "payload": {"seconds": 0.5}})
    job = conveyor.job(job_id)
    publisher = Publisher(create_broker(settings), settings.queue_prefix, 0)
    try:
        for _ in range(2):  # two more copies: a relay republish and a producer retry, say
            publisher.publish(Dispatch(uuid.UUID(job_id), job["type"], job["queue"], job["priority"]))
    finally:
        publisher.close()
    assert queue_counts(broker_url, QUEUE)[0] >= 3
    worker.start_worker(broker_url)
    done = conveyor.wait_status(job_id, "succeeded")
    wait_queue_drained(broker_url)
    time.sleep(0.5)
    assert conveyor.job(job_id) == done, "the extra copies changed nothing"
    assert done["attempts"] == 1
    assert worker.log_text().count('"skipping message: job is') >= 2


def test_worker_killed_mid_job_finishes_after_restart(
    conveyor: ApiClient, worker: ServiceProcess, broker_url: str
) -> None:
    job_id = submit(conveyor, {"type": "demo.sleep", "payload": {"seconds": 2}, "max_attempts": 3})
    wait_for(lambda: conveyor.job(job_id)["progress"], timeout=15, what="the job to be running")
    worker.kill()  # SIGKILL to the whole process group: no cleanup, no ack
    assert conveyor.job(job_id)["status"] == "running"
    worker.start_worker(broker_url)
    job = conveyor.wait_status(job_id, "succeeded", timeout=30)
    assert job["attempts"] == 2, "the killed attempt counts; the job succeeded once, on attempt 2"
    assert job["result"] == {"slept_seconds": 2, "attempt": 2}
    assert job["error"] is None


def test_sigterm_drains_running_jobs_and_loses_none(
    conveyor: ApiClient, worker: ServiceProcess, broker_url: str
) -> None:
    batch = str(uuid.uuid4())
    job_ids = [
        submit(conveyor, {"type": "demo.sleep", "payload": {"seconds": 1.5}, "labels": {"batch": batch}})
        for _ in range(8)
    ]  # 4 worker threads: half run, half wait in the worker's prefetch
    wait_for(lambda: conveyor.job(job_ids[0])["status"] == "running", timeout=10, what="jobs to start")
    worker.signal(signal.SIGTERM)
    assert worker.proc is not None
    assert worker.proc.wait(20) == 0, "the worker exits cleanly after draining"
    finished = [conveyor.job(j) for j in job_ids]
    assert all(j["status"] in ("succeeded", "queued") for j in finished), [j["status"] for j in finished]
    assert any(j["status"] == "succeeded" for j in finished), "running jobs finished during the drain"
    worker.start_worker(broker_url)
    for job_id in job_ids:
        job = conveyor.wait_status(job_id, "succeeded", timeout=30)
        assert job["attempts"] == 1, "no job ran twice and none was interrupted"


def test_relay_liveness_probe_tells_a_hung_relay_from_a_working_one(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**service_env, "CONVEYOR_RELAY_HEARTBEAT_FILE": str(tmp_path / "relay-heartbeat"),
           "CONVEYOR_RELAY_METRICS_BIND": ""}  # fmt: skip
    relay = ServiceProcess("relay", env)
    relay.log_path = relay.log_path.with_name("relay-heartbeat.log")
    relay.start()

    def probe() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shared.cli", "relay-alive", "--max-age", "2"],
                              env=env, capture_output=True, text=True, timeout=30)  # fmt: skip

    try:
        wait_for(
            lambda: probe().returncode == 0, timeout=20, interval=0.3, what="the relay's first heartbeat"
        )
        relay.signal(signal.SIGSTOP)  # hung: the process lives, its loop does not go round
        time.sleep(3)
        hung = probe()
        assert hung.returncode == 1
        assert "stopped beating" in hung.stderr
        relay.signal(signal.SIGCONT)
        wait_for(lambda: probe().returncode == 0, timeout=10, interval=0.3, what="the relay to beat again")
    finally:
        relay.signal(signal.SIGCONT)
        relay.stop()
