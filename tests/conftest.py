"""Fixtures for the whole suite.

Each test run gets its own database (``conveyor_test_<pid>``) and its own queues (prefix
``conveyor_test_<pid>.``), so it never touches a Conveyor started with ``make run``, nor another run.
Timings are shortened (leases, retries, relay polling) so failure paths finish in seconds.

Unit tests (tests/unit) use none of the service fixtures and open no sockets.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from support import (
    QUEUE_PREFIX,
    ROOT,
    RUN_ID,
    START_POSTGRES,
    START_RABBITMQ,
    TEST_DATABASE,
    ApiClient,
    ServiceProcess,
    amqp_channel,
    free_port,
    pg,
    wait_for_http,
    written_rows,
)

#: The services started by this run keep their temporary files (Prometheus multiprocess directories,
#: gunicorn's worker files) here, removed at the end of the run.
RUN_TMP = ROOT / ".run" / f"tmp-{RUN_ID}"
RUN_TMP.mkdir(parents=True, exist_ok=True)

TEST_ENV = {
    "TMPDIR": str(RUN_TMP),
    "CONVEYOR_DATABASE_URL": os.environ.get(
        "CONVEYOR_TEST_DATABASE_URL", f"postgresql://postgres@127.0.0.1:5432/{TEST_DATABASE}"
    ),
    "CONVEYOR_BROKER_URL": os.environ.get(
        "CONVEYOR_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"
    ),
    "CONVEYOR_QUEUE_PREFIX": QUEUE_PREFIX,
    "CONVEYOR_AUTH": "keys",
    "CONVEYOR_METRICS_TOKEN": "test-metrics-token",
    "CONVEYOR_API_BIND": f"127.0.0.1:{free_port()}",
    "CONVEYOR_API_WORKERS": "1",
    "CONVEYOR_API_THREADS": "16",
    "CONVEYOR_WORKER_PROCESSES": "1",
    "CONVEYOR_WORKER_THREADS": "4",
    "CONVEYOR_WORKER_SHUTDOWN_TIMEOUT_SECONDS": "10",
    "CONVEYOR_JOB_LEASE_SECONDS": "3",
    "CONVEYOR_RETRY_BASE_SECONDS": "0.1",
    "CONVEYOR_RETRY_MAX_SECONDS": "0.5",
    "CONVEYOR_RELAY_POLL_SECONDS": "0.1",
    "CONVEYOR_OUTBOX_GRACE_SECONDS": "1",
    "CONVEYOR_PUBLISH_BACKOFF_SECONDS": "0.5",
    "CONVEYOR_DB_POOL_SIZE": "16",
    "CONVEYOR_WORKER_METRICS_BIND": f"127.0.0.1:{free_port()}",
    "CONVEYOR_RELAY_METRICS_BIND": f"127.0.0.1:{free_port()}",
    "CONVEYOR_QUEUE_STATS_REFRESH_SECONDS": "0.5",
    # The poison-message test submits demo.sleep jobs that SIGKILL their worker.
    "CONVEYOR_DEMO_CRASH_ENABLED": "true",
}
# Before anything imports shared.settings: the whole process (and its children) use the test setup.
os.environ.update(TEST_ENV)

from support import DEFAULT_QUEUE  # noqa: E402

from shared.broker import Publisher, create_broker  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.store import Database  # noqa: E402
from shared.store import tenants as tenant_store  # noqa: E402


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.from_env()


@pytest.fixture(scope="session")
def dsn(settings: Settings) -> str:
    return settings.database_url


@pytest.fixture(scope="session")
def broker_url(settings: Settings) -> str:
    return settings.broker_url


@pytest.fixture
def unchanged_database(dsn: str) -> Iterator[None]:
    """Assert the test leaves jobs, idempotency keys and the outbox exactly as it found them."""
    before = written_rows(dsn)
    yield
    assert written_rows(dsn) == before, "a refused request wrote something"


@pytest.fixture(scope="session")
def database(settings: Settings) -> Iterator[str]:
    """This run's freshly migrated database, dropped at the end; fails (never skips) if Postgres is
    unreachable. Databases left by runs that died (their process is gone) are dropped too."""
    from shared.store.migrate import drop_database, migrate

    base, name = settings.database_url.rsplit("/", 1)
    maintenance = base + "/postgres"
    try:
        with pg(maintenance) as cur:
            cur.execute("SELECT datname FROM pg_database WHERE datname LIKE 'conveyor\\_test\\_%%'")
            leftovers = [row[0] for row in cur.fetchall()]
            for stale in leftovers:
                if stale == name or not _process_alive(stale.rsplit("_", 1)[1]):
                    drop_database(cur, stale)
    except Exception as exc:
        pytest.fail(f"Postgres is not reachable ({exc}). Start it with: {START_POSTGRES}", pytrace=False)
    migrate(settings)
    yield settings.database_url
    with pg(maintenance) as cur:
        drop_database(cur, name)


@pytest.fixture(scope="module")
def db(settings: Settings, database: str) -> Iterator[Database]:
    """A connection pool to this run's database, for one test module (the store and worker tests)."""
    db = Database(settings)
    yield db
    db.close()


@pytest.fixture
def tenant(db: Database) -> str:
    """A tenant of the test's own, with the default limits (the test passes its own to the code)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    db.execute(lambda cur: tenant_store.create_tenant(cur, name))
    return name


@pytest.fixture
def publisher(settings: Settings) -> Iterator[Publisher]:
    """The API's publisher, on the test RabbitMQ (for submission code called in process)."""
    publisher = Publisher(create_broker(settings), settings.queue_prefix, settings.publish_backoff_seconds)
    yield publisher
    publisher.close()


def _process_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def rabbitmq(settings: Settings) -> Iterator[str]:
    """RabbitMQ, with this run's queues deleted at the end; fails (never skips) if it is unreachable."""
    try:
        with amqp_channel(settings.broker_url):
            pass
    except Exception as exc:
        pytest.fail(f"RabbitMQ is not reachable ({exc}). Start it with: {START_RABBITMQ}", pytrace=False)
    yield settings.broker_url
    with amqp_channel(settings.broker_url) as channel:
        for suffix in ("", ".DQ", ".XQ"):
            channel.queue_delete(queue=DEFAULT_QUEUE + suffix)


#: The tenant most tests act as, with limits high enough never to get in their way.
TEST_TENANT = "tests"


@dataclass(frozen=True)
class Keys:
    """API keys created for the run (through the same store code as `conveyor keys create`)."""

    writer: str  # tenant "tests": jobs:read + jobs:write
    reader: str  # tenant "tests": jobs:read
    admin: str  # tenant "ops": admin
    other_tenant: str  # tenant "others": jobs:read + jobs:write


@pytest.fixture(scope="session")
def keys(database: str, settings: Settings) -> Keys:
    from shared.api_keys import Scope, generate_key
    from shared.store import api_keys as key_store

    db = Database(settings)

    def make(tenant: str, *scopes: Scope) -> str:
        new = generate_key()

        def create(cur: Any) -> None:
            tenant_store.create_tenant(cur, tenant)
            key_store.insert_key(cur, new, tenant, frozenset(scopes), "test suite")

        db.run(create)
        return new.key

    keys = Keys(
        writer=make(TEST_TENANT, Scope.JOBS_READ, Scope.JOBS_WRITE),
        reader=make(TEST_TENANT, Scope.JOBS_READ),
        admin=make("ops", Scope.ADMIN),
        other_tenant=make("others", Scope.JOBS_READ, Scope.JOBS_WRITE),
    )
    for tenant in (TEST_TENANT, "others"):
        db.execute(
            lambda cur, t=tenant: tenant_store.set_limits(
                cur, t, max_active_jobs=1_000_000, submit_rate_per_second=100_000.0, submit_burst=100_000
            )
        )
    db.close()
    return keys


@pytest.fixture(scope="session")
def service_env(database: str, rabbitmq: str) -> dict[str, str]:
    return {**os.environ, **TEST_ENV}


@pytest.fixture(scope="session")
def api_process(service_env: dict[str, str], settings: Settings) -> Iterator[ServiceProcess]:
    proc = ServiceProcess("api", service_env).start()
    wait_for_http(proc, f"http://{settings.api_bind}/healthz", what="the API to answer /healthz")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def worker_process(service_env: dict[str, str], broker_url: str) -> Iterator[ServiceProcess]:
    proc = ServiceProcess("worker", service_env)
    proc.start_worker(broker_url)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def relay_process(service_env: dict[str, str]) -> Iterator[ServiceProcess]:
    proc = ServiceProcess("relay", service_env).start()
    yield proc
    proc.stop()


@pytest.fixture
def worker(worker_process: ServiceProcess, service_env: dict[str, str], broker_url: str) -> ServiceProcess:
    """The session's worker, restarted first if an earlier test stopped or killed it."""
    if not worker_process.running:
        worker_process.start_worker(broker_url)
    return worker_process


@pytest.fixture
def relay(relay_process: ServiceProcess) -> ServiceProcess:
    if not relay_process.running:
        relay_process.start()
    return relay_process


@pytest.fixture
def api(api_process: ServiceProcess, settings: Settings, keys: Keys) -> ApiClient:
    """The running API, called with tenant "tests"' read/write key."""
    return ApiClient(f"http://{settings.api_bind}", keys.writer)


@pytest.fixture
def conveyor(api: ApiClient, worker: ServiceProcess, relay: ServiceProcess) -> ApiClient:
    """The whole running system: API, worker and relay."""
    return api


@pytest.fixture(autouse=True)
def _no_consumers_in_integration_tests(request: pytest.FixtureRequest) -> None:
    """tests/integration call the store and the group commit in-process and look at the jobs and
    outbox rows they write, in the session's database. The session's worker and relay, if an earlier
    test (contract, e2e) started them, would take those rows; they are stopped, and the ``worker``
    and ``relay`` fixtures start them again for the tests that need them."""
    if "integration" in request.node.path.relative_to(ROOT).parts:
        ServiceProcess.stop_all("worker", "relay")


@pytest.fixture(scope="session", autouse=True)
def _remove_run_tmp() -> Iterator[None]:
    yield
    shutil.rmtree(RUN_TMP, ignore_errors=True)
