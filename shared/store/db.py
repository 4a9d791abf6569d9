"""Postgres connections: a small blocking pool, transactions, and the mapping of failures to errors.

Connections run in autocommit mode, so a single-statement operation (claiming a job, recording its
outcome) costs exactly one round trip. Multi-statement work goes through ``Database.transaction``,
which sends BEGIN/COMMIT itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras

from shared.errors import IllegalTransition, StoreUnavailable
from shared.jobs import has_unpaired_surrogate, text_path
from shared.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")
Cursor = psycopg2.extensions.cursor

psycopg2.extras.register_uuid()  # type: ignore[no-untyped-call]

#: Errors that mean "the database is not usable right now" rather than "this statement is wrong".
_UNAVAILABLE = (psycopg2.OperationalError, psycopg2.InterfaceError)

#: How many times work that Postgres undid to break a deadlock is run again, and the longest pause
#: before each new run (a random part of it, so that two victims do not meet again in step).
DEADLOCK_RETRIES = 3
DEADLOCK_PAUSE_SECONDS = 0.05


class Database:
    """A thread-safe pool of at most ``pool_size`` connections to one Postgres database.

    Checkout blocks while every connection is in use (psycopg2's own pools raise instead). The pool
    notices a fork and starts afresh in the child, so it may be created before gunicorn or dramatiq
    fork their workers.
    """

    def __init__(self, settings: Settings, *, application_name: str = "conveyor") -> None:
        self._dsn = settings.database_url
        self._connect_kwargs: dict[str, Any] = {
            "connection_factory": _PreparingConnection if settings.db_prepared_statements else _Connection,
            "connect_timeout": settings.db_connect_timeout_seconds,
            "options": f"-c statement_timeout={settings.db_statement_timeout_ms}",
            "application_name": application_name,
        }
        self._size = settings.db_pool_size
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._idle: list[psycopg2.extensions.connection] = []
        self._slots = threading.BoundedSemaphore(self._size)
        self._lock = threading.Lock()

    def _connect(self) -> psycopg2.extensions.connection:
        try:
            conn: psycopg2.extensions.connection = psycopg2.connect(self._dsn, **self._connect_kwargs)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(_describe(exc)) from exc
        conn.autocommit = True
        return conn

    @contextmanager
    def _checkout(self) -> Iterator[tuple[psycopg2.extensions.connection, bool]]:
        if os.getpid() != self._pid:
            self._reset()
        self._slots.acquire()
        conn: psycopg2.extensions.connection | None = None
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            reused = conn is not None
            if conn is None:
                conn = self._connect()
            yield conn, reused
        finally:
            if conn is not None:
                if conn.closed or conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                    _close_quietly(conn)
                else:
                    with self._lock:
                        self._idle.append(conn)
            self._slots.release()

    def run(self, work: Callable[[Cursor], T], *, transaction: bool = True, read_only: bool = False) -> T:
        """Run ``work(cursor)``, by default inside one transaction, and return its result.

        If a connection taken from the pool turns out to be dead (Postgres restarted since it was
        last used), every idle connection is dropped with it, and the work is retried once on a fresh
        connection: nothing of it can have been committed. Pass ``transaction=False`` for a single
        statement that commits by itself; it is never retried (the statement may have run before the
        connection broke) unless it only reads (``read_only=True``, see ``read``).

        Work that Postgres chose to undo to break a deadlock (another transaction waited for rows it
        held while it waited for theirs) is run again, up to ``DEADLOCK_RETRIES`` times: Postgres
        rolled all of it back, and the other transaction goes on once it has. Only then does the
        deadlock become StoreUnavailable. ``work`` must therefore start from scratch on each call,
        as the retry on a dead connection already needs.
        """
        deadlocks = 0
        stale_retried = False
        while True:
            with self._checkout() as (conn, reused):
                try:
                    return _run_on(conn, work, transaction)
                except _Deadlock as deadlock:
                    deadlocks += 1
                    if deadlocks > DEADLOCK_RETRIES:
                        raise StoreUnavailable(_describe(deadlock.cause)) from deadlock.cause
                    logger.info("running again what Postgres undid to break a deadlock: %s", deadlock.cause)
                except _StaleConnection as stale:
                    # The server behind it restarted (or the network dropped it): the other idle
                    # connections are from before that too, so none of them is tried next.
                    self._discard_idle()
                    if (transaction or read_only) and reused and not stale_retried:
                        logger.info("discarding dead pooled connections: %s", stale.cause)
                        stale_retried = True
                        continue
                    raise StoreUnavailable(_describe(stale.cause)) from stale.cause
            time.sleep(random.uniform(0, DEADLOCK_PAUSE_SECONDS))  # after a deadlock, off the connection

    def read(self, work: Callable[[Cursor], T]) -> T:
        """Run statements that only read, without a transaction (retried once on a dead pooled connection)."""
        return self.run(work, transaction=False, read_only=True)

    def execute(self, work: Callable[[Cursor], T]) -> T:
        """Run one statement that commits by itself (one round trip)."""
        return self.run(work, transaction=False)

    def close(self) -> None:
        self._discard_idle()

    def _discard_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _close_quietly(conn)


class _Connection(psycopg2.extensions.connection):
    """A connection that runs ``Prepared`` statements as plain SQL (``CONVEYOR_DB_PREPARED_STATEMENTS``
    false: behind a pooler in transaction mode, the next statement may reach another server session,
    which never saw the PREPARE)."""

    prepares = False


class _PreparingConnection(_Connection):
    prepares = True


class _Ended(Exception):
    """The psycopg2 error that ended a run of the work, for ``Database.run`` to decide on."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _StaleConnection(_Ended):
    """The connection is dead, and nothing of the work was committed."""


class _Deadlock(_Ended):
    """Postgres undid the work to break a deadlock; the connection is fine."""


def _run_on(conn: psycopg2.extensions.connection, work: Callable[[Cursor], T], transaction: bool) -> T:
    committing = False
    try:
        with conn.cursor() as cur:
            if transaction:
                cur.execute("BEGIN")
            result = work(cur)
            if transaction:
                committing = True
                cur.execute("COMMIT")
            return result
    except psycopg2.errors.DeadlockDetected as exc:  # an OperationalError, but nothing is unavailable
        _rollback_quietly(conn)
        raise _Deadlock(exc) from exc
    except _UNAVAILABLE as exc:
        if conn.closed and not committing:
            raise _StaleConnection(exc) from exc
        _rollback_quietly(conn)
        raise StoreUnavailable(_describe(exc)) from exc
    except psycopg2.errors.CheckViolation as exc:
        _rollback_quietly(conn)
        if "illegal job status transition" in str(exc):
            raise IllegalTransition(str(exc).splitlines()[0]) from exc
        raise
    except BaseException:
        _rollback_quietly(conn)
        raise


def _rollback_quietly(conn: psycopg2.extensions.connection) -> None:
    if conn.closed:
        return
    try:
        if conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            with conn.cursor() as cur:
                cur.execute("ROLLBACK")
    except _UNAVAILABLE:
        _close_quietly(conn)


def _close_quietly(conn: psycopg2.extensions.connection) -> None:
    with contextlib.suppress(*_UNAVAILABLE):
        conn.close()


def _describe(exc: BaseException) -> str:
    """A one-line reason that never includes the DSN (and so no password)."""
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {first_line}"


class Prepared:
    """A statement prepared once per connection (PREPARE, then EXECUTE) and planned once, generically.

    For the hot statements (a submission, a batch, a worker's round): parsing and planning a long
    statement costs Postgres more than running it. ``sql`` uses ``%(name)s`` parameters; ``types``
    gives each its SQL type, in the order EXECUTE passes them. The first use on a connection prepares
    it (a prepared statement belongs to the session and outlives a ROLLBACK).
    """

    def __init__(self, name: str, sql: str, types: dict[str, str]) -> None:
        self.name = name
        self._order = list(types)
        positional = sql
        for number, param in enumerate(self._order, start=1):
            positional = positional.replace(f"%({param})s", f"${number}")
        if "%(" in positional:
            raise ValueError(f"{name}: a parameter has no type: {positional[positional.index('%(') :][:40]}")
        signature = ", ".join(types.values())
        self._prepare = f"PREPARE {name}({signature}) AS {positional.replace('%%', '%')}"
        self._plain = sql
        for param, kind in types.items():  # typed as PREPARE types them (an empty array has no type)
            self._plain = self._plain.replace(f"%({param})s", f"%({param})s::{kind}")
        placeholders = ", ".join(f"%s::{kind}" for kind in types.values())
        self._execute = f"EXECUTE {name}({placeholders})"
        self._prepared_on: weakref.WeakSet[psycopg2.extensions.connection] = weakref.WeakSet()

    def execute(self, cur: Cursor, params: dict[str, Any]) -> None:
        if not getattr(cur.connection, "prepares", True):
            cur.execute(self._plain, params)
            return
        if cur.connection not in self._prepared_on:
            # Generic plans: otherwise Postgres re-plans a prepared statement whenever it guesses that
            # a custom plan could be cheaper, which for these statements it never is.
            cur.execute("SET plan_cache_mode = force_generic_plan")
            cur.execute(self._prepare)
            self._prepared_on.add(cur.connection)
        cur.execute(self._execute, [params[name] for name in self._order])


#: SQL expression: the current transaction commits without waiting for its WAL to reach the disk;
#: ``SET LOCAL synchronous_commit = off`` usable inside a statement (``outbox.py`` sends that SET
#: before its queries instead: a SELECT of this would add a planned step to the relay's poll). Only
#: for writes whose loss to a Postgres crash costs little: a tenant's tokens (``jobs.take_tokens``: a
#: tenant may get a few more submissions than its rate right after a crash), the outbox rows of
#: published messages (published again, and the worker's claim ignores the copies). Never for a job,
#: which commits synchronously.
ASYNC_COMMIT = "set_config('synchronous_commit', 'off', true)"


def outside_transactions(cur: Cursor, what: str) -> None:
    """Raise RuntimeError unless ``cur``'s next statement commits by itself (``Database.execute``): for
    a statement that commits without waiting for the disk, which inside a transaction would make the
    whole transaction's COMMIT do so."""
    if cur.connection.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
        raise RuntimeError(f"{what} commits by itself: run it with Database.execute, outside a transaction")


def json_param(value: Any) -> psycopg2.extras.Json:
    return psycopg2.extras.Json(value)


def jsonb_text(value: Any) -> str:
    """``value`` as JSON text that Postgres' ``jsonb`` accepts; ValueError (or TypeError) if it has none.

    ``json.dumps`` also writes what ``jsonb`` refuses: NaN and Infinity, and strings holding a NUL
    character or an unpaired surrogate. Sent to Postgres, one such value fails its whole statement,
    and a worker's round carries the claims and successes of many jobs.
    """
    if text_path(value, lambda text: "\x00" in text) is not None:
        raise ValueError("a string holds a NUL character (\\u0000), which Postgres cannot store")
    unpaired: list[str] = []

    def note_unpaired(text: str) -> bool:
        if has_unpaired_surrogate(text):
            unpaired.append(text)
            return True
        return False

    if text_path(value, note_unpaired) is not None:
        surrogate = ascii(next(c for c in unpaired[0] if 0xD800 <= ord(c) <= 0xDFFF))
        raise ValueError(f"a string holds an unpaired surrogate ({surrogate}), which is not Unicode")
    return json.dumps(value, allow_nan=False)
