"""Versioned SQL migrations, applied by one idempotent command: ``conveyor migrate``.

Each ``migrations/NNNN_name.sql`` file runs once, in its own transaction, and is recorded in
``schema_migrations``. An advisory lock serialises concurrent runs (several pods starting at once).
Every run also copies the job state machine from ``shared.jobs`` into ``job_status_transitions`` and
``job_statuses``, the tables the database triggers read.

Migrations run while the previous release serves traffic. A migration that alters ``jobs`` needs a
lock that conflicts with every open transaction on it, and while it waits for that lock, every new
statement on the table (a submission, a worker's round) queues behind it. So a migration waits at
most ``LOCK_TIMEOUT_MS`` for its locks, then rolls back, lets the queue drain and tries again, up to
``LOCK_ATTEMPTS`` times; a transaction that keeps a table locked longer than that makes ``conveyor
migrate`` fail with a message that says so, rather than stall the service behind it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from shared.errors import MigrationBlocked, StoreUnavailable
from shared.jobs import status_rows, transition_rows
from shared.settings import Settings

logger = logging.getLogger(__name__)

#: Arbitrary constant naming Conveyor's migration lock among the database's advisory locks.
_MIGRATION_LOCK = 0x436F6E7665796F72  # "Conveyor"
#: How long one attempt of a migration waits for a lock, and how many attempts it makes, a second apart.
LOCK_TIMEOUT_MS = 3_000
LOCK_ATTEMPTS = 10
LOCK_RETRY_SECONDS = 1.0
FIND_BLOCKERS = (
    "Find the transactions open for more than a minute with: SELECT pid, state, xact_start, query"
    " FROM pg_stat_activity WHERE xact_start < now() - interval '1 minute'; then run conveyor migrate"
    " again."
)


def migration_files() -> list[tuple[str, str]]:
    """(version, SQL) for every migration, in order."""
    folder = resources.files("shared.store") / "migrations"
    files = sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
    return [(p.name.removesuffix(".sql"), p.read_text(encoding="utf-8")) for p in files]


def migrate(
    settings: Settings,
    *,
    migrations: Sequence[tuple[str, str]] | None = None,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    lock_attempts: int = LOCK_ATTEMPTS,
) -> list[str]:
    """Create the database if needed, apply pending migrations (``migration_files()`` unless given);
    returns the versions applied. Raises MigrationBlocked if one could not take its locks."""
    _ensure_database(settings)
    conn = _connect(settings.database_url, settings)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
            try:
                files = migration_files() if migrations is None else migrations
                return _apply(conn, files, lock_timeout_ms, lock_attempts)
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    finally:
        conn.close()


def _apply(
    conn: psycopg2.extensions.connection,
    files: Sequence[tuple[str, str]],
    lock_timeout_ms: int,
    lock_attempts: int,
) -> list[str]:
    with conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur.execute("SELECT version FROM schema_migrations")
        done = {row[0] for row in cur.fetchall()}
    applied = []
    for version, text in files:
        if version in done:
            continue
        _apply_one(conn, version, text, lock_timeout_ms, lock_attempts)
        applied.append(version)
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("DELETE FROM job_status_transitions")
        cur.executemany(
            "INSERT INTO job_status_transitions (from_status, to_status) VALUES (%s, %s)",
            list(transition_rows()),
        )
        cur.execute("DELETE FROM job_statuses")
        cur.executemany("INSERT INTO job_statuses (status, is_active) VALUES (%s, %s)", status_rows())
        cur.execute("COMMIT")
    return applied


def _apply_one(
    conn: psycopg2.extensions.connection, version: str, text: str, lock_timeout_ms: int, attempts: int
) -> None:
    """Run one migration and record it, in one transaction; retried while its locks are taken."""
    for attempt in range(1, attempts + 1):
        logger.info("applying migration %s", version)
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            try:
                cur.execute("SET LOCAL lock_timeout = %s", (f"{lock_timeout_ms}ms",))
                cur.execute(text)
                cur.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            except psycopg2.errors.LockNotAvailable:
                cur.execute("ROLLBACK")
                if attempt == attempts:
                    break
                logger.warning(
                    "migration %s could not take a lock within %d ms (another transaction holds it);"
                    " trying again in %.0f s (attempt %d of %d)",
                    version, lock_timeout_ms, LOCK_RETRY_SECONDS, attempt + 1, attempts,
                )  # fmt: skip
                time.sleep(LOCK_RETRY_SECONDS)
                continue
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
            return
    raise MigrationBlocked(
        f"migration {version} could not lock its tables in {attempts} attempts of {lock_timeout_ms} ms:"
        f" another transaction holds them. {FIND_BLOCKERS}"
    )


def _connect(dsn: str, settings: Settings) -> psycopg2.extensions.connection:
    try:
        conn = psycopg2.connect(dsn, connect_timeout=settings.db_connect_timeout_seconds)
    except psycopg2.OperationalError as exc:
        raise StoreUnavailable(str(exc).strip().splitlines()[0]) from exc
    conn.autocommit = True
    return conn


def _ensure_database(settings: Settings) -> None:
    """Create the target database through the ``postgres`` maintenance database if it is missing."""
    try:
        _connect(settings.database_url, settings).close()
        return
    except StoreUnavailable as exc:
        if "does not exist" not in str(exc):
            raise
    parts = urlsplit(settings.database_url)
    name = parts.path.lstrip("/")
    maintenance = urlunsplit(parts._replace(path="/postgres"))
    conn = _connect(maintenance, settings)
    try:
        with conn.cursor() as cur:
            logger.info("creating database %s", name)
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg2.errors.DuplicateDatabase:
        pass  # created concurrently by another migrate run
    finally:
        conn.close()


def drop_database(cur: psycopg2.extensions.cursor, name: str) -> None:
    """Disconnect everyone from database ``name`` and drop it (tests and benchmarks clean up with it).

    ``cur`` is an autocommit cursor on another database of the same server (``postgres``).
    """
    cur.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        (name,),
    )
    cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
