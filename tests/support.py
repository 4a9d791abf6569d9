"""Test support: the real services as child processes, and small waiting/inspection helpers.

Nothing here mocks Postgres or RabbitMQ; when one cannot be reached, the fixtures fail with the command
that would start it (they never skip).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pika
import psycopg2
import requests

from shared.errors import StoreUnavailable

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = ROOT / ".run" / "test-logs"

#: Each test run has its own database and queues, so two runs on one machine (CI and a developer, or
#: two sessions) never see each other's jobs. Child processes inherit the id through the environment.
RUN_ID = os.environ.setdefault("CONVEYOR_TEST_RUN_ID", str(os.getpid()))
TEST_DATABASE = f"conveyor_test_{RUN_ID}"
QUEUE_PREFIX = f"conveyor_test_{RUN_ID}."
#: The queue every shipped job type uses, with the test run's prefix.
DEFAULT_QUEUE = QUEUE_PREFIX + "default"

START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
START_RABBITMQ = "rabbitmq-server -detached"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    check: Callable[[], T | None], *, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


class AnswerLostDatabase:
    """A real ``Database`` whose next ``lose`` statements commit but lose their answer, as psycopg2
    reports a connection that broke after COMMIT. Everything else goes to the database itself."""

    def __init__(self, db: Any, lose: int = 0) -> None:
        self.db, self.lose = db, lose

    def execute(self, work: Callable[[Any], T]) -> T:
        result: T = self.db.execute(work)
        if self.lose > 0:
            self.lose -= 1
            raise StoreUnavailable("OperationalError: server closed the connection unexpectedly (simulated)")
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def wait_for_http(proc: ServiceProcess, url: str, *, what: str, timeout: float = 30) -> None:
    """Wait until ``url`` answers 200, failing at once (with its log) if ``proc`` exits meanwhile."""

    def answering() -> bool:
        try:
            return requests.get(url, timeout=2).status_code == 200
        except requests.ConnectionError:
            assert proc.running, f"{proc.command} exited:\n{proc.log_text()[-3000:]}"
            return False

    wait_for(answering, timeout=timeout, interval=0.2, what=what)


class ServiceProcess:
    """One Conveyor process (``python -m shared.cli <command>``) in its own process group."""

    #: Every one made in this test session, for ``stop_all``.
    made: ClassVar[list[ServiceProcess]] = []

    def __init__(self, command: str, env: dict[str, str]) -> None:
        ServiceProcess.made.append(self)
        self.command = command
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{command}.log"

    def start(self) -> ServiceProcess:
        assert self.proc is None or self.proc.poll() is not None, f"{self.command} is already running"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", self.command],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    def start_worker(self, broker_url: str) -> ServiceProcess:
        """Start (a worker) and wait until it consumes the default queue."""
        self.start()

        def consuming() -> bool:
            assert self.running, f"the worker exited:\n{self.log_text()[-3000:]}"
            return queue_counts(broker_url, DEFAULT_QUEUE)[1] >= 1

        wait_for(consuming, timeout=30, interval=0.2, what="the worker to consume")
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig) if sig == signal.SIGKILL else self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; SIGKILL the whole group if it does not stop in time."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode or 0)

    def kill(self) -> None:
        """SIGKILL the process and every child (a crash, an OOM kill, a lost node)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @classmethod
    def stop_all(cls, *commands: str) -> None:
        """Stop the running processes of these commands (the fixtures that need one start it again)."""
        for proc in cls.made:
            if proc.command in commands and proc.running:
                proc.stop()


# --- Postgres --------------------------------------------------------------------------------------


@contextmanager
def pg(dsn: str) -> Iterator[psycopg2.extensions.cursor]:
    conn = psycopg2.connect(dsn, connect_timeout=3)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def wal_flushes(cur: psycopg2.extensions.cursor, work: Callable[[], object]) -> int:
    """How many times Postgres flushed its WAL to disk while ``work`` ran on ``cur``'s connection (an
    autocommit one): ``pg_stat_wal.wal_sync``, counted by every process of the server, so a quiet
    server is assumed. A synchronous commit flushes once; an asynchronous one leaves it to the WAL
    writer, a few times a second. Needs ``wal_sync_method`` fdatasync or fsync (Linux's default)."""

    def syncs() -> int:
        cur.execute("SELECT pg_stat_force_next_flush()")  # this session's counts, published when idle
        cur.execute("SELECT 1")
        cur.execute("SELECT wal_sync FROM pg_stat_wal")
        row = cur.fetchone()
        assert row is not None
        return int(row[0])

    before = syncs()
    work()
    return syncs() - before


@contextmanager
def scratch_database(settings: Any, label: str) -> Iterator[Any]:
    """A freshly migrated database of a test's own, ``conveyor_test_<label>_<run id>`` (a run that dies
    leaves it to the next run's clean-up), dropped afterwards; yields ``settings`` pointing at it."""
    import dataclasses

    from shared.store.migrate import drop_database, migrate

    base = settings.database_url.rsplit("/", 1)[0]
    name = f"conveyor_test_{label}_{RUN_ID}"
    with pg(base + "/postgres") as cur:
        drop_database(cur, name)
    fresh = dataclasses.replace(settings, database_url=f"{base}/{name}")
    migrate(fresh)
    try:
        yield fresh
    finally:
        with pg(base + "/postgres") as cur:
            drop_database(cur, name)


def written_rows(dsn: str) -> dict[str, int]:
    """What a refused request must leave as it was: the number of jobs and of idempotency keys, and the
    last outbox id handed out (not the number of outbox rows: the API deletes published rows in the
    background, so that count moves by itself)."""
    with pg(dsn) as cur:
        cur.execute(
            "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM idempotency_keys),"
            " COALESCE(pg_sequence_last_value(pg_get_serial_sequence('outbox', 'id')), 0)"
        )
        row = cur.fetchone()
        assert row is not None
        return dict(zip(("jobs", "idempotency_keys", "last_outbox_id"), map(int, row), strict=True))


def one_value(dsn: str, sql: str, *params: Any) -> Any:
    """The first column of the one row ``sql`` returns (the test fails if it returns none)."""
    with pg(dsn) as cur:
        cur.execute(sql, params)
        row = cur.fetchone()
        assert row is not None, sql
        return row[0]


def count_rows(dsn: str, table: str) -> int:
    return int(one_value(dsn, f"SELECT count(*) FROM {table}"))


def active_counts(dsn: str, tenant: str = "default") -> tuple[int, int]:
    """A tenant's active jobs: (the count the triggers keep, a recount of the rows)."""
    with pg(dsn) as cur:
        cur.execute("SELECT COALESCE(sum(jobs), 0) FROM tenant_active_jobs WHERE tenant = %s", (tenant,))
        kept = cur.fetchone()
        cur.execute(
            "SELECT count(*) FROM jobs JOIN job_statuses USING (status) WHERE tenant = %s AND is_active",
            (tenant,),
        )
        recount = cur.fetchone()
        assert kept is not None
        assert recount is not None
        return int(kept[0]), int(recount[0])


def insert_noops(settings: Any, count: int, *, keyed: bool = False, grace: float = 0.0) -> list[Any]:
    """``count`` queued ``noop`` jobs of tenant ``default`` (one attempt each) in one statement, each with
    an idempotency key if ``keyed``; their outbox rows held for ``grace`` seconds, as the API holds the
    rows it publishes itself. Returns their ``NewRow``s."""
    from shared.jobs import NewJob
    from shared.store import Database
    from shared.store import jobs as job_store

    noop = NewJob(
        type="noop", queue="default", payload={}, priority=5, max_attempts=1, timeout_seconds=60,
        run_at=None, delay_seconds=0.0, labels={},
    )  # fmt: skip

    def key() -> Any:
        return job_store.IdempotencyRecord(uuid.uuid4().hex, "f" * 64, 3600, 202) if keyed else None

    rows = [job_store.NewRow(uuid.uuid4(), noop, key()) for _ in range(count)]
    db = Database(settings)
    try:
        db.run(
            lambda cur: job_store.insert_jobs(
                cur, "default", rows, max_active_jobs=10**7, outbox_grace_seconds=grace
            )
        )
    finally:
        db.close()
    return rows


def executed_plans(
    dsn: str, work: Callable[[Any], object], *, first: Callable[[Any], object] | None = None
) -> list[str]:
    """Run ``work(cursor)`` on a connection of its own and return the plans (``auto_explain``, with their
    row counts) of every statement it executed, those of triggers and foreign keys' cascades included.
    ``first(cursor)`` runs before on the same connection, unlogged (PL/pgSQL saves its plans then)."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            if first is not None:
                first(cur)
            cur.execute("LOAD 'auto_explain'")
            cur.execute("SET auto_explain.log_min_duration = 0")
            cur.execute("SET auto_explain.log_analyze = on")
            cur.execute("SET auto_explain.log_nested_statements = on")
            cur.execute("SET client_min_messages = log")  # the plans come back as notices, one each
            conn.notices = collections.deque()  # every notice, not psycopg2's last 50
            work(cur)
            return list(conn.notices)
    finally:
        conn.close()


def largest_step(plans: list[str]) -> int:
    """The most rows any step of ``plans`` produced, or read and discarded (``Rows Removed by Filter``
    or ``by Join Filter``: a scan that reads a whole index to keep a few rows, a nested loop that
    compares every row of one side with every row of the other)."""
    text = "".join(plans)
    produced = [int(n) for n in re.findall(r"\(actual time=[\d.]+\.\.[\d.]+ rows=(\d+)", text)]
    assert produced, f"no plan was logged: {text!r}"
    discarded = [int(n) for n in re.findall(r"Rows Removed by (?:Join )?Filter: (\d+)", text)]
    return max(produced + discarded)


# --- RabbitMQ --------------------------------------------------------------------------------------


@contextmanager
def amqp_channel(url: str) -> Iterator[Any]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()


def queue_counts(url: str, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of a queue, or (0, 0) if it does not exist yet."""
    try:
        with amqp_channel(url) as channel:
            frame = channel.queue_declare(queue=queue, passive=True)
            return frame.method.message_count, frame.method.consumer_count
    except pika.exceptions.ChannelClosedByBroker:
        return 0, 0


def peek_message_ids(url: str, queue: str, limit: int = 10_000) -> list[str]:
    """message_ids of the messages in a queue, leaving them all in place (unacked, then requeued)."""
    ids = []
    with amqp_channel(url) as channel:
        for _ in range(limit):
            method, _props, body = channel.basic_get(queue=queue, auto_ack=False)
            if method is None:
                break
            ids.append(json.loads(body)["message_id"])
    return ids


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


# --- the API ---------------------------------------------------------------------------------------


class ApiClient:
    """Thin requests wrapper for the API under test."""

    def __init__(self, base_url: str, key: str | None = None) -> None:
        self.base_url = base_url
        self.session = requests.Session()
        if key is not None:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def submit(self, body: dict[str, Any], *, key: str | None = None, **kwargs: Any) -> requests.Response:
        headers = {"Idempotency-Key": key} if key else {}
        return self.session.post(f"{self.base_url}/v1/jobs", json=body, headers=headers, timeout=10, **kwargs)

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.session.get(f"{self.base_url}/v1/jobs/{job_id}", timeout=10)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def wait_status(self, job_id: str, *statuses: str, timeout: float = 20.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["status"] in statuses else None

        return wait_for(reached, timeout=timeout, interval=0.1, what=f"job {job_id} to be {statuses}")


def dead_letter_of(api: ApiClient, job_id: str) -> dict[str, Any] | None:
    """The dead letter of a job, as the API lists it (None if it has none)."""
    response = api.session.get(f"{api.base_url}/v1/dead-letters", params={"limit": 200}, timeout=10)
    assert response.status_code == 200, response.text
    return next((d for d in response.json()["items"] if d["job_id"] == job_id), None)


def new_key() -> str:
    return str(uuid.uuid4())
