"""The relay's dead-letter filing (``worker_service/dead_letters.py``) when Postgres fails mid-round,
against the real RabbitMQ and Postgres."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from support import RUN_ID, amqp_channel, pg, queue_counts

from shared.broker import DeadLetterReader, create_broker
from shared.errors import StoreUnavailable
from shared.settings import Settings
from shared.store import Database
from worker_service.dead_letters import DeadLetterFiler

T = TypeVar("T")


class FailsOnce:
    """A Database whose ``execute`` fails once, on its ``fail_at``-th call (a restart, a failover)."""

    def __init__(self, db: Database, fail_at: int) -> None:
        self._db = db
        self._calls = 0
        self._fail_at = fail_at

    def execute(self, work: Callable[[Any], T]) -> T:
        self._calls += 1
        if self._calls == self._fail_at:
            raise StoreUnavailable("OperationalError: server closed the connection unexpectedly")
        return self._db.execute(work)


@pytest.fixture
def isolated(settings: Settings, database: str, broker_url: str) -> Iterator[Settings]:
    """Settings with a queue prefix of their own; its queues and dead letters are removed afterwards."""
    prefix = f"conveyor_test_{RUN_ID}.filing-{uuid.uuid4().hex[:8]}."
    yield dataclasses.replace(settings, queue_prefix=prefix)
    with amqp_channel(broker_url) as channel:
        for suffix in ("", ".DQ", ".XQ"):
            channel.queue_delete(queue=prefix + "default" + suffix)
    with pg(settings.database_url) as cur:
        cur.execute("DELETE FROM dead_letters WHERE message LIKE %s", (f"garbage {prefix}%",))


def test_messages_of_a_round_that_postgres_interrupted_are_filed_later(
    isolated: Settings, broker_url: str
) -> None:
    xq = isolated.queue_prefix + "default.XQ"
    db = Database(isolated)
    broker = create_broker(isolated)
    try:
        flaky = FailsOnce(db, fail_at=2)  # the first message is filed, the second one fails
        filer = DeadLetterFiler(isolated, flaky, DeadLetterReader(broker))  # type: ignore[arg-type]
        broker.declare_queue(isolated.queue_prefix + "default", ensure=True)
        bodies = [f"garbage {isolated.queue_prefix}{n}".encode() for n in range(4)]
        with amqp_channel(broker_url) as channel:
            for body in bodies[:3]:
                channel.basic_publish("", xq, body)
        with pytest.raises(StoreUnavailable):
            filer.file_round()
        with amqp_channel(broker_url) as channel:
            channel.basic_publish("", xq, bodies[3])

        assert filer.file_round() == 3, "the three not filed yet (the first one was, and is not twice)"
        with pg(isolated.database_url) as cur:
            cur.execute(
                "SELECT message FROM dead_letters WHERE message LIKE %s ORDER BY message",
                (f"garbage {isolated.queue_prefix}%",),
            )
            assert [row[0].encode() for row in cur.fetchall()] == bodies
        assert queue_counts(broker_url, xq)[0] == 0
    finally:
        broker.close()
        db.close()
