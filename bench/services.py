"""The run's isolation (database, queue prefix, ports, scratch directory) and its child processes.

Every process is started in its own session, so stopping it stops its children (gunicorn workers,
dramatiq worker processes); ``BenchRun.close`` stops whatever is still running, drops the database and
deletes the queues, also when a phase failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pika
import psutil
import psycopg2
import requests
from psycopg2 import sql

from shared.store.migrate import drop_database

ROOT = Path(__file__).resolve().parent.parent
PG_BASE = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
BROKER_URL = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
MANAGEMENT_URL = os.environ.get("BENCH_RABBITMQ_MANAGEMENT_URL", "http://127.0.0.1:15672")
#: Every benchmark database and queue starts with this, then the harness's pid.
NAME_PREFIX = "conveyor_bench_"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


@contextmanager
def pg(dsn: str) -> Iterator[Any]:
    conn = psycopg2.connect(dsn, connect_timeout=3)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def scalar(dsn: str, query: str, args: tuple[Any, ...] = ()) -> Any:
    with pg(dsn) as cur:
        cur.execute(query, args)
        row = cur.fetchone()
        return None if row is None else row[0]


@contextmanager
def amqp_channel() -> Iterator[Any]:
    for attempt in range(3):  # a test run elsewhere may be restarting RabbitMQ for a few seconds
        try:
            connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
            break
        except pika.exceptions.AMQPConnectionError:
            if attempt == 2:
                raise
            time.sleep(2)
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()


def queue_ready(queue: str) -> int:
    """Messages ready in a queue (0 if it does not exist)."""
    try:
        with amqp_channel() as channel:
            return int(channel.queue_declare(queue=queue, passive=True).method.message_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0


def queue_consumers(queue: str) -> int:
    try:
        with amqp_channel() as channel:
            return int(channel.queue_declare(queue=queue, passive=True).method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0


def purge(*queues: str) -> None:
    with amqp_channel() as channel:
        for queue in queues:
            with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                channel.queue_purge(queue)


def _management(path: str) -> Any:
    user = urllib.parse.urlparse(BROKER_URL)
    auth = (urllib.parse.unquote(user.username or "guest"), urllib.parse.unquote(user.password or "guest"))
    response = requests.get(MANAGEMENT_URL + path, auth=auth, timeout=5)
    response.raise_for_status()
    return response.json()


def rabbitmq_version() -> str:
    try:
        return str(_management("/api/overview")["rabbitmq_version"])
    except (requests.RequestException, KeyError):
        return "unknown (management API unreachable)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Proc:
    """One child process in its own session; its output goes to a log file in the run's directory."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_running(self) -> None:
        if not self.running:
            raise RuntimeError(f"{self.name} exited; the end of {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def peak_rss_mb(self) -> dict[int, float]:
        """Peak resident memory (VmHWM) of this process and of each of its descendants, in MB."""
        peaks: dict[int, float] = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(OSError):
                    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            peaks[proc.pid] = int(line.split()[1]) / 1024
        return peaks

    def stop(self, timeout: float = 20.0, sig: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM (the services drain), then SIGKILL the whole session if it does not stop in time."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # leftovers of the session, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


class BenchRun:
    """The run's names, its processes and its cleanup."""

    def __init__(self) -> None:
        self.run_id = f"{NAME_PREFIX}{os.getpid()}"
        self.database = self.run_id
        self.dsn = f"{PG_BASE}/{self.database}"
        self.queue_prefix = self.run_id + "."
        self.dir = ROOT / ".run" / "bench" / self.run_id
        self.procs: list[Proc] = []
        self.queues: set[str] = set()
        self.exchanges: set[str] = set()
        #: The prefilled database (``prefilled``) that scale measurements copy, once it is built.
        self.template: str | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def open(self) -> BenchRun:
        for old in self.dir.parent.glob(NAME_PREFIX + "*"):  # the logs of runs that are over
            pid = old.name.rsplit("_", 1)[1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self._drop_stale_databases()
        return self

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)
        self.procs.clear()
        with contextlib.suppress(Exception), pg(f"{PG_BASE}/postgres") as cur:
            drop_database(cur, self.database)
            if self.template is not None:
                drop_database(cur, self.template)
        with contextlib.suppress(Exception), amqp_channel() as channel:
            for queue in sorted(self.queues):
                for suffix in ("", ".DQ", ".XQ"):
                    with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                        channel.queue_delete(queue=queue + suffix)
            for exchange in sorted(self.exchanges):
                with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                    channel.exchange_delete(exchange=exchange)
        shutil.rmtree(self.dir / "stamps", ignore_errors=True)

    def _drop_stale_databases(self) -> None:
        """Drop this run's name if it exists and the databases of benchmark runs whose process is gone."""
        with pg(f"{PG_BASE}/postgres") as cur:
            cur.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (NAME_PREFIX + "%",))
            for (name,) in cur.fetchall():
                pid = name.rsplit("_", 1)[1]
                if name == self.database or (pid.isdigit() and not _pid_alive(int(pid))):
                    drop_database(cur, name)

    # --- processes -----------------------------------------------------------------------------

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(name, argv, env, self.dir).start()
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, sig: signal.Signals = signal.SIGTERM) -> None:
        proc.stop(sig=sig)
        if proc in self.procs:
            self.procs.remove(proc)

    # --- the Conveyor database -----------------------------------------------------------------

    def conveyor_env(self, **overrides: str) -> dict[str, str]:
        # Conveyor's defaults, not whatever CONVEYOR_* the caller (a test run, a shell) has set.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        env |= {
            "CONVEYOR_DATABASE_URL": self.dsn,
            "CONVEYOR_BROKER_URL": BROKER_URL,
            "CONVEYOR_QUEUE_PREFIX": self.queue_prefix,
            # No API keys: every request acts as tenant "default", whose limits fresh_database raises.
            "CONVEYOR_AUTH": "none",
            "CONVEYOR_LOG_LEVEL": "WARNING",
            "CONVEYOR_WORKER_METRICS_BIND": f"127.0.0.1:{free_port()}",
            "CONVEYOR_RELAY_METRICS_BIND": f"127.0.0.1:{free_port()}",
            "PROMETHEUS_MULTIPROC_DIR": str(self.dir / f"metrics-{free_port()}"),
        }
        env.update(overrides)
        return env

    def fresh_database(self, template: str | None = None) -> None:
        """(Re)create the run's database: migrated, with tenant "default"'s limits out of the way; or, with
        ``template``, as a copy of that database (``prefilled``)."""
        with pg(f"{PG_BASE}/postgres") as cur:
            drop_database(cur, self.database)
            if template is not None:
                # FILE_COPY copies the files (after a checkpoint) instead of WAL-logging every page.
                cur.execute(
                    sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY = FILE_COPY").format(
                        sql.Identifier(self.database), sql.Identifier(template)
                    )
                )
                return
        self._migrate(self.dsn)

    def prefilled(self, fill: Callable[[str], None]) -> str:
        """The name of a migrated database that ``fill(dsn)`` filled, built on first use and kept for the
        run, so each scale measurement starts from a copy of the same state (``fresh_database``)."""
        if self.template is None:
            name = f"{NAME_PREFIX}scale_{os.getpid()}"  # ends in the pid: stale ones are dropped
            with pg(f"{PG_BASE}/postgres") as cur:
                drop_database(cur, name)
            self._migrate(f"{PG_BASE}/{name}")
            fill(f"{PG_BASE}/{name}")
            self.template = name
        return self.template

    def _migrate(self, dsn: str) -> None:
        env = self.conveyor_env(CONVEYOR_DATABASE_URL=dsn)
        conveyor = [sys.executable, "-m", "shared.cli"]
        subprocess.run([*conveyor, "migrate"], env=env, cwd=ROOT, check=True, capture_output=True)
        limits = ["--max-active-jobs", "100000000", "--submit-rate", "1000000", "--submit-burst", "1000000"]
        subprocess.run(
            [*conveyor, "tenants", "set", "default", *limits],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
