"""The broker adapter: the only module that knows AMQP URLs, queue arguments and pika.

Every Conveyor process builds its dramatiq broker here, so the API, the relay and the worker declare
queues with identical arguments (RabbitMQ refuses a queue re-declared with different ones).
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Any

import dramatiq
import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.common import xq_name
from dramatiq.errors import DramatiqError

from shared.errors import BrokerUnavailable
from shared.job_types import PRIORITY_RANGE
from shared.messages import Dispatch, build_message
from shared.settings import Settings

logger = logging.getLogger(__name__)

#: Queue priority levels: job priorities 0-9 map one to one onto RabbitMQ's x-max-priority.
MAX_PRIORITY = PRIORITY_RANGE[1]

#: pika settings Conveyor adds to the broker URL unless it sets them itself:
#: - heartbeat 30 s: idle publisher connections are noticed dead within a minute;
#: - blocked_connection_timeout 30 s: during a RabbitMQ memory or disk alarm a publish fails instead
#:   of hanging forever (pika's default is no timeout);
#: - socket_timeout 3 s / connection_attempts 1: a dead broker fails fast, so the API can leave the
#:   message to the relay and still answer quickly.
URL_DEFAULTS = {
    "heartbeat": "30",
    "blocked_connection_timeout": "30",
    "socket_timeout": "3",
    "connection_attempts": "1",
}


def url_with_defaults(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    for key, value in URL_DEFAULTS.items():
        query.setdefault(key, value)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


class ConveyorBroker(RabbitmqBroker):
    """dramatiq's RabbitMQ broker with Conveyor's queue arguments.

    The one difference from dramatiq: dead-letter queues (``Q.XQ``) are declared without dramatiq's
    7-day ``x-message-ttl``, so RabbitMQ never drops a dead letter on its own; the relay files each
    one in Postgres (see ``worker_service/dead_letters.py``) and only an operator removes it.
    """

    def _declare_xq_queue(self, queue_name: str) -> Any:
        return self.channel.queue_declare(queue=xq_name(queue_name), durable=True)


def create_broker(settings: Settings, middleware: Sequence[dramatiq.Middleware] = ()) -> RabbitmqBroker:
    """A dramatiq broker with publisher confirms and Conveyor's queue arguments.

    ``middleware`` replaces dramatiq's defaults entirely: Conveyor does retries, time limits and
    dead-lettering itself, against Postgres.
    """
    return ConveyorBroker(
        url=url_with_defaults(settings.broker_url),
        confirm_delivery=True,
        max_priority=MAX_PRIORITY,
        middleware=list(middleware),
    )


class Publisher:
    """Publishes job messages with publisher confirms.

    After a failure it stops trying for ``backoff_seconds`` (``try_publish`` returns False at once), so
    a dead broker costs one slow request, not every request: the outbox relay delivers what was
    skipped.
    """

    def __init__(self, broker: RabbitmqBroker, queue_prefix: str, backoff_seconds: float) -> None:
        self._broker = broker
        self._prefix = queue_prefix
        self._backoff = backoff_seconds
        self._lock = threading.Lock()
        self._closed_until = 0.0

    def publish(self, dispatch: Dispatch) -> None:
        """Publish one message; returns once RabbitMQ confirmed it. Raises BrokerUnavailable."""
        try:
            self._broker.enqueue(build_message(dispatch, self._prefix))
        except (DramatiqError, pika.exceptions.AMQPError, OSError) as exc:
            raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def publish_all(self, dispatches: Iterable[Dispatch]) -> list[Dispatch]:
        """Publish in order until one fails; returns those RabbitMQ confirmed."""
        published: list[Dispatch] = []
        for dispatch in dispatches:
            try:
                self.publish(dispatch)
            except BrokerUnavailable as exc:
                logger.warning("publish failed, will retry later: %s", exc)
                break
            published.append(dispatch)
        return published

    def try_publish(self, dispatch: Dispatch) -> bool:
        """Publish unless the broker failed recently; never raises for broker trouble."""
        if time.monotonic() < self._closed_until:
            return False
        try:
            self.publish(dispatch)
        except BrokerUnavailable as exc:
            with self._lock:
                self._closed_until = time.monotonic() + self._backoff
            logger.warning(
                "publish of job %s failed (%s); the relay will deliver it, inline publishing paused %.0fs",
                dispatch.job_id,
                exc,
                self._backoff,
            )
            return False
        return True

    def close(self) -> None:
        self._broker.close()


def check_broker(settings: Settings) -> None:
    """Open and close one AMQP connection; raises BrokerUnavailable if that fails."""
    params = pika.URLParameters(url_with_defaults(settings.broker_url))
    try:
        connection = pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc
    connection.close()
