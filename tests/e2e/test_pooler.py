"""Conveyor behind PgBouncer in transaction mode, as docs/deploy.md suggests for many replicas.

In transaction mode each transaction may reach another server session, so nothing a session keeps
(a prepared statement) can be relied on: ``CONVEYOR_DB_PREPARED_STATEMENTS=false`` is the setting for
it. CI installs PgBouncer (``.ci/run``: ``apt-get install pgbouncer``) and these tests fail there
without it; elsewhere they skip and say how to get it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from conftest import Keys
from support import ApiClient, ServiceProcess, free_port, wait_for, wait_for_http

from shared.errors import StoreUnavailable
from shared.settings import Settings
from shared.store import Database
from shared.store import jobs as job_store

pytestmark = pytest.mark.e2e

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@pytest.fixture(scope="module")
def pooled_dsn(database: str, settings: Settings) -> Iterator[str]:
    """The run's database through a PgBouncer of its own, in transaction mode."""
    name = settings.database_url.rsplit("/", 1)[1]
    if not os.path.exists(PGBOUNCER):
        message = "pgbouncer is not installed: apt-get install pgbouncer (.ci/run does it in CI)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="conveyor-pgbouncer-") as scratch:
        directory = Path(scratch)
        directory.chmod(0o777)  # PgBouncer refuses to run as root: it runs as postgres there
        ini = directory / "pgbouncer.ini"
        ini.write_text(
            f"[databases]\n{name} = host=127.0.0.1 port=5432 dbname={name} user=postgres\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            "auth_type = any\npool_mode = transaction\ndefault_pool_size = 4\nmax_client_conn = 200\n"
            # Conveyor sends statement_timeout in `options`, which PgBouncer refuses unless told to
            # ignore it (docs/deploy.md says to set it on the role instead).
            "ignore_startup_parameters = options\n"
            f"logfile = {directory}/pgbouncer.log\npidfile = {directory}/pgbouncer.pid\n"
        )
        ini.chmod(0o644)
        command = [PGBOUNCER, *(["-u", "postgres"] if os.geteuid() == 0 else []), str(ini)]
        with (directory / "pgbouncer.out").open("wb") as output:
            proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)

        def listening() -> bool:
            assert proc.poll() is None, (directory / "pgbouncer.out").read_text(errors="replace")[-2000:]
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, timeout=15, interval=0.1, what="PgBouncer to listen")
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/{name}"
        finally:
            proc.terminate()
            proc.wait(10)


def _poll_twice_while_another_session_holds_the_server(db: Database, dsn: str) -> None:
    """Read a job, then read it again while another client holds the server session the first read
    used: the second read reaches another one (PgBouncer hands out its last-used idle server first)."""
    job_id = uuid.uuid4()
    assert db.read(lambda cur: job_store.get_job(cur, job_id)) is None
    other = psycopg2.connect(dsn)
    try:
        with other.cursor() as cur:
            cur.execute("SELECT 1")  # a transaction begins and keeps its server session
            assert db.read(lambda cur: job_store.get_job(cur, job_id)) is None
    finally:
        other.close()


def test_prepared_statements_do_not_survive_transaction_pooling(settings: Settings, pooled_dsn: str) -> None:
    """Why the setting exists: with it on, a statement prepared on one server session is executed on
    another (psycopg2 reports it as an OperationalError, so the API would answer 503)."""
    db = Database(dataclasses.replace(settings, database_url=pooled_dsn, db_pool_size=1))
    try:
        with pytest.raises(StoreUnavailable, match=r"prepared statement .* does not exist"):
            _poll_twice_while_another_session_holds_the_server(db, pooled_dsn)
    finally:
        db.close()


def test_with_prepared_statements_off_the_same_reads_work(settings: Settings, pooled_dsn: str) -> None:
    db = Database(
        dataclasses.replace(settings, database_url=pooled_dsn, db_pool_size=1, db_prepared_statements=False)
    )
    try:
        _poll_twice_while_another_session_holds_the_server(db, pooled_dsn)
    finally:
        db.close()


@pytest.fixture
def pooled_services(
    service_env: dict[str, str], pooled_dsn: str, broker_url: str, keys: Keys
) -> Iterator[ApiClient]:
    """An API and a worker that reach Postgres only through PgBouncer (the session's worker stopped,
    so that this one runs the jobs)."""
    ServiceProcess.stop_all("worker")
    port = free_port()
    env = {**service_env, "CONVEYOR_DATABASE_URL": pooled_dsn, "CONVEYOR_DB_PREPARED_STATEMENTS": "false",
           "CONVEYOR_API_BIND": f"127.0.0.1:{port}",
           "CONVEYOR_WORKER_METRICS_BIND": f"127.0.0.1:{free_port()}"}  # fmt: skip
    api, worker = ServiceProcess("api", env), ServiceProcess("worker", env)
    api.log_path = api.log_path.with_name("api-pooled.log")
    worker.log_path = worker.log_path.with_name("worker-pooled.log")
    api.start()
    worker.start_worker(broker_url)
    client = ApiClient(f"http://127.0.0.1:{port}", keys.writer)
    wait_for_http(api, f"{client.base_url}/readyz", what="the pooled API")
    try:
        yield client
    finally:
        api.stop()
        worker.stop()


def test_api_and_worker_run_jobs_through_pgbouncer_in_transaction_mode(pooled_services: ApiClient) -> None:
    client = pooled_services
    single = [client.submit({"type": "noop"}, key=str(uuid.uuid4())).json()["id"] for _ in range(10)]
    batch = client.session.post(
        f"{client.base_url}/v1/jobs/batch", json={"jobs": [{"type": "noop"} for _ in range(20)]}, timeout=10
    )
    assert batch.status_code == 200, batch.text
    ids = single + [result["job"]["id"] for result in batch.json()["results"]]
    for job_id in ids:
        job = client.wait_status(job_id, "succeeded", timeout=30)
        assert job["attempts"] == 1
    listed = client.session.get(f"{client.base_url}/v1/jobs?status=succeeded&limit=50", timeout=10)
    assert listed.status_code == 200
    assert set(ids) <= {job["id"] for job in listed.json()["items"]}
