"""A migration never stalls the service behind a lock it waits for.

Migrations run while the previous release serves traffic. A migration that alters ``jobs`` while an
old transaction still reads it waits for that transaction, and every statement on ``jobs`` after it
waits for the migration: submissions and worker rounds stop. ``conveyor migrate`` therefore waits a
short while per attempt, gives the queue back between attempts, and fails with a clear message if the
table stays locked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg2
import pytest
from support import pg, scratch_database

from shared.cli import processes
from shared.errors import MigrationBlocked
from shared.settings import Settings
from shared.store import migrate as migrate_module
from shared.store.migrate import migrate, migration_files

PROBE = ("9999_probe_column", "ALTER TABLE jobs ADD COLUMN probe integer")


@pytest.fixture
def scratch(settings: Settings, database: str) -> Iterator[Settings]:
    """A freshly migrated database of its own (this test adds a column to ``jobs``)."""
    with scratch_database(settings, "locks") as fresh:
        yield fresh


def applied(dsn: str) -> set[str]:
    with pg(dsn) as cur:
        cur.execute("SELECT version FROM schema_migrations")
        return {row[0] for row in cur.fetchall()}


def test_a_blocked_migration_gives_way_to_traffic_then_fails_clearly(
    scratch: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(migrate_module, "LOCK_RETRY_SECONDS", 0.2)
    dsn = scratch.database_url
    blocker = psycopg2.connect(dsn)  # an old transaction that read jobs and is still open
    blocker.cursor().execute("SELECT count(*) FROM jobs")
    outcome: list[BaseException | list[str]] = []

    def run() -> None:
        try:
            outcome.append(
                migrate(scratch, migrations=[*migration_files(), PROBE], lock_timeout_ms=300, lock_attempts=3)
            )
        except BaseException as exc:  # reported to the test below
            outcome.append(exc)

    migration = threading.Thread(target=run)
    try:
        migration.start()
        # Traffic while the migration tries: no statement waits longer than one attempt's timeout
        # (without it, each would wait behind the migration until the old transaction ends).
        traffic = psycopg2.connect(dsn, options="-c statement_timeout=2000")
        traffic.autocommit = True
        waits = []
        with traffic.cursor() as cur:
            while migration.is_alive():
                started = time.monotonic()
                cur.execute("SELECT count(*) FROM jobs")
                waits.append(time.monotonic() - started)
                time.sleep(0.02)
        traffic.close()
        migration.join()
    finally:
        blocker.rollback()
        blocker.close()
    assert len(outcome) == 1
    assert isinstance(outcome[0], MigrationBlocked), outcome
    assert "9999_probe_column" in str(outcome[0])
    assert "pg_stat_activity" in str(outcome[0]), "the message says how to find the blocker"
    assert len(waits) >= 3
    assert max(waits) < 1.0, f"a statement waited {max(waits):.2f} s behind the migration"
    assert PROBE[0] not in applied(dsn)

    # Once the old transaction is gone, the same migration goes through.
    assert migrate(scratch, migrations=[*migration_files(), PROBE]) == [PROBE[0]]
    assert PROBE[0] in applied(dsn)


def test_conveyor_migrate_exits_1_with_the_message(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def blocked(_: Settings) -> list[str]:
        raise MigrationBlocked("migration 0099_x could not lock its tables")

    monkeypatch.setattr(migrate_module, "migrate", blocked)
    assert processes.cmd_migrate(settings, []) == 1
    assert "conveyor migrate: migration 0099_x could not lock its tables" in capsys.readouterr().err
