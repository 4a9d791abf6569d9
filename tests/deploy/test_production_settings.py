"""API, worker and relay started with the settings of the prod overlay: quorum queues and worker heartbeats.

The stack has its own database (``conveyor_test_deploy_<run>``) and queue prefix
(``conveyor_quorum_<run>.``), so it neither sees the other tests' jobs nor collides with their
classic ``conveyor_test_<run>.*`` queues.
Leases are 3 s (tests/conftest.py), so each worker process beats every second.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from dramatiq.errors import ConnectionClosed
from support import LOG_DIR, ROOT, RUN_ID, ApiClient, ServiceProcess, amqp_channel, free_port, pg, wait_for

from shared import heartbeat
from shared.broker import create_broker
from shared.settings import Settings
from shared.store.migrate import drop_database

pytestmark = pytest.mark.e2e

PREFIX = f"conveyor_quorum_{RUN_ID}."
QUEUE = PREFIX + "default"
DATABASE = f"conveyor_test_deploy_{RUN_ID}"  # dropped at the end (by a later run if this one dies)
DELIVERY_LIMIT = 5
WORKER_PROCESSES = 2


@dataclass
class Stack:
    env: dict[str, str]
    api: ApiClient
    worker: ServiceProcess
    heartbeat_file: str


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def delete_queues(broker_url: str) -> None:
    with amqp_channel(broker_url) as channel:
        for suffix in ("", ".DQ", ".XQ"):
            channel.queue_delete(queue=QUEUE + suffix)


def drop_stack_database(dsn: str) -> str:
    """Drop the stack's database if it exists (``conveyor migrate`` creates it); returns its DSN."""
    base = dsn.rsplit("/", 1)[0]
    with pg(base + "/postgres") as cur:
        drop_database(cur, DATABASE)
    return f"{base}/{DATABASE}"


def service(command: str, env: dict[str, str]) -> ServiceProcess:
    proc = ServiceProcess(command, env)
    proc.log_path = LOG_DIR / f"quorum-{command}.log"
    return proc.start()


@pytest.fixture(scope="module")
def stack(
    service_env: dict[str, str], settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    heartbeat_file = str(tmp_path_factory.mktemp("heartbeat") / "worker")
    env = {
        **service_env,
        "CONVEYOR_DATABASE_URL": drop_stack_database(settings.database_url),
        "CONVEYOR_QUEUE_PREFIX": PREFIX,
        "CONVEYOR_QUEUE_TYPE": "quorum",
        "CONVEYOR_QUEUE_DELIVERY_LIMIT": str(DELIVERY_LIMIT),
        "CONVEYOR_API_BIND": f"127.0.0.1:{free_port()}",
        "CONVEYOR_WORKER_PROCESSES": str(WORKER_PROCESSES),
        "CONVEYOR_WORKER_HEARTBEAT_FILE": heartbeat_file,
    }
    delete_queues(settings.broker_url)
    migrated = cli(env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    created = cli(
        env, "keys", "create", "--tenant", "deploy", "--scope", "jobs:read", "--scope", "jobs:write"
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    # A stale file of a live pid (pid 1 always exists): `conveyor worker` must remove it before starting.
    stale = heartbeat.path_for(heartbeat_file, 1)
    stale.touch()
    os.utime(stale, (0, 0))

    processes = [service("api", env), service("worker", env), service("relay", env)]
    api_proc, worker, _relay = processes
    base_url = f"http://{env['CONVEYOR_API_BIND']}"

    def api_up() -> bool:
        assert api_proc.running, f"the API exited:\n{api_proc.log_text()[-3000:]}"
        try:
            return requests.get(f"{base_url}/healthz", timeout=2).status_code == 200
        except requests.RequestException:  # refused, or accepted by gunicorn before a worker serves
            return False

    def workers_beating() -> bool:
        assert worker.running, f"the worker exited:\n{worker.log_text()[-3000:]}"
        return len(heartbeat.heartbeats(heartbeat_file)) == WORKER_PROCESSES

    try:
        wait_for(api_up, timeout=30, interval=0.2, what="the quorum API to answer /healthz")
        wait_for(workers_beating, timeout=30, interval=0.2, what="both worker processes to beat")
        yield Stack(env, ApiClient(base_url, key), worker, heartbeat_file)
    finally:
        stop_together(processes)
        delete_queues(settings.broker_url)
        drop_stack_database(settings.database_url)


def stop_together(processes: list[ServiceProcess]) -> None:
    """SIGTERM all at once (each stop takes seconds), then wait; SIGKILL what is still running."""
    running = [p.proc for p in processes if p.proc is not None and p.proc.poll() is None]
    for proc in running:
        os.killpg(proc.pid, signal.SIGCONT)  # in case a test left the worker frozen
        proc.send_signal(signal.SIGTERM)
    for proc in running:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def queues_as_rabbitmqctl_lists_them() -> dict[str, dict[str, object]]:
    listed = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "name", "type", "arguments", "--formatter", "json"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return {
        q["name"]: {"type": q["type"], "arguments": {name: value for name, _kind, value in q["arguments"]}}
        for q in json.loads(listed.stdout)
        if q["name"].startswith(PREFIX)
    }


def test_job_runs_to_success_on_quorum_queues(stack: Stack) -> None:
    response = stack.api.submit({"type": "noop"})
    assert response.status_code == 202, response.text
    job = stack.api.wait_status(response.json()["id"], "succeeded")
    assert job["attempts"] == 1


def test_job_priority_is_accepted_though_quorum_queues_ignore_it(stack: Stack) -> None:
    response = stack.api.submit({"type": "noop", "priority": 9})
    assert response.status_code == 202, response.text
    stack.api.wait_status(response.json()["id"], "succeeded")


def test_all_three_queues_are_quorum_queues_with_the_right_limits(stack: Stack) -> None:
    queues = queues_as_rabbitmqctl_lists_them()
    assert set(queues) == {QUEUE, QUEUE + ".DQ", QUEUE + ".XQ"}
    assert {q["type"] for q in queues.values()} == {"quorum"}
    main = queues[QUEUE]["arguments"]
    assert main == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": QUEUE + ".XQ",
        "x-delivery-limit": DELIVERY_LIMIT,
    }
    for name in (QUEUE + ".DQ", QUEUE + ".XQ"):
        arguments = queues[name]["arguments"]
        assert "x-max-priority" not in arguments
        assert "x-message-ttl" not in arguments
        assert arguments["x-delivery-limit"] > 10**9  # type: ignore[operator]


def test_classic_declaration_of_a_quorum_queue_is_refused(stack: Stack, settings: Settings) -> None:
    # Why switching CONVEYOR_QUEUE_TYPE needs new queues (docs/deploy.md): RabbitMQ refuses the other type.
    classic = create_broker(Settings.from_env({**stack.env, "CONVEYOR_QUEUE_TYPE": "classic"}))
    try:
        with pytest.raises(ConnectionClosed, match="inequivalent arg 'x-queue-type'"):
            classic.declare_queue(QUEUE, ensure=True)
    finally:
        classic.close()


def worker_alive(stack: Stack, max_age: float) -> subprocess.CompletedProcess[str]:
    return cli(stack.env, "worker-alive", "--max-age", str(max_age))


def test_every_worker_process_keeps_its_own_heartbeat_fresh(stack: Stack) -> None:
    first = heartbeat.heartbeats(stack.heartbeat_file)
    assert len(first) == WORKER_PROCESSES
    assert 1 not in first, "conveyor worker did not remove the old heartbeat files"
    assert all(heartbeat.process_exists(pid) for pid in first)

    def all_advanced() -> bool:
        now = heartbeat.heartbeats(stack.heartbeat_file)
        return set(now) == set(first) and all(now[pid] > first[pid] for pid in first)

    wait_for(all_advanced, timeout=5, interval=0.2, what="every worker process to beat again")
    alive = worker_alive(stack, 3)
    assert alive.returncode == 0, alive.stderr
    assert f"{WORKER_PROCESSES} worker process(es) alive" in alive.stdout


def test_frozen_worker_fails_the_liveness_check_until_it_resumes(stack: Stack) -> None:
    assert stack.worker.proc is not None
    group = stack.worker.proc.pid
    os.killpg(group, signal.SIGSTOP)
    try:
        time.sleep(2.5)
        frozen = worker_alive(stack, 2)
        assert frozen.returncode == 1
        assert "stopped beating" in frozen.stderr
    finally:
        os.killpg(group, signal.SIGCONT)
    wait_for(lambda: worker_alive(stack, 2).returncode == 0, timeout=10, interval=0.5,
             what="the resumed worker to pass the liveness check")  # fmt: skip


def test_worker_that_stops_removes_its_heartbeat_files(stack: Stack) -> None:
    # Last in this module: it stops the stack's worker.
    assert stack.worker.stop() == 0
    assert heartbeat.heartbeats(stack.heartbeat_file) == {}
    gone = worker_alive(stack, 60)
    assert gone.returncode == 1
    assert f"0 of {WORKER_PROCESSES} worker processes" in gone.stderr


def test_quorum_queue_survives_its_consumers(stack: Stack) -> None:
    # With the worker stopped, a submitted job waits in the quorum queue (durable, replicated).
    response = stack.api.submit({"type": "noop"})
    assert response.status_code == 202, response.text

    def waiting() -> int:
        with amqp_channel(stack.env["CONVEYOR_BROKER_URL"]) as channel:
            return int(channel.queue_declare(queue=QUEUE, passive=True).method.message_count)

    assert wait_for(waiting, timeout=10, what="the job's message to wait in the queue") >= 1
    stack.worker.start()
    stack.api.wait_status(response.json()["id"], "succeeded", timeout=30)
