"""The broker adapter: the only module that knows AMQP URLs, queue arguments and pika.

Every Conveyor process builds its dramatiq broker here, so the API, the relay and the worker declare
queues with identical arguments (RabbitMQ refuses a queue re-declared with different ones).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dramatiq
import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker, _RabbitmqConsumer
from dramatiq.common import dq_name, xq_name
from dramatiq.errors import DramatiqError
from prometheus_client import Counter

from shared import no_redirects
from shared.confirms import ConfirmingPublisher, OutgoingMessage, describe
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


#: The delivery limit of quorum queues that must never dead-letter or drop a message (Q.DQ, Q.XQ).
#: "Unlimited" has no spelling that works on every RabbitMQ: 4.x reads -1 as unlimited and applies
#: 20 when the argument is absent, while 3.x dead-letters a message at its first return when it is -1
#: (seen on 3.10.8). A limit no message reaches means the same on both, and never changes, which
#: matters: RabbitMQ refuses to redeclare a queue whose x-delivery-limit differs (406).
UNLIMITED_DELIVERIES = 2**31 - 1


@dataclass(frozen=True)
class QueueArguments:
    """The ``x-`` arguments of the three RabbitMQ queues behind one Conveyor queue ``Q``."""

    queue: dict[str, Any]  # Q: the jobs
    delay_queue: dict[str, Any]  # Q.DQ: dramatiq's delay queue, which Conveyor never publishes to
    dead_letter_queue: dict[str, Any]  # Q.XQ: the dead letters


def queue_arguments(queue_name: str, queue_type: str, delivery_limit: int) -> QueueArguments:
    """How Conveyor declares ``queue_name`` for ``CONVEYOR_QUEUE_TYPE`` (classic or quorum).

    Classic: dramatiq's arguments (dead-lettering to Q.XQ, priorities 0-9), except that Q.XQ has no
    ``x-message-ttl``. Quorum: no ``x-max-priority`` (RabbitMQ refuses it on a quorum queue), the
    configured delivery limit on Q, and none that is ever reached on Q.DQ and Q.XQ.
    """
    dead_letter = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": xq_name(queue_name)}
    if queue_type == "classic":
        classic = {**dead_letter, "x-max-priority": MAX_PRIORITY}
        return QueueArguments(queue=classic, delay_queue=dict(classic), dead_letter_queue={})
    if queue_type != "quorum":
        raise ValueError(f"unknown queue type {queue_type!r}")
    quorum = {"x-queue-type": "quorum"}
    return QueueArguments(
        queue={**quorum, **dead_letter, "x-delivery-limit": delivery_limit},
        delay_queue={**quorum, **dead_letter, "x-delivery-limit": UNLIMITED_DELIVERIES},
        dead_letter_queue={**quorum, "x-delivery-limit": UNLIMITED_DELIVERIES},
    )


class _Consumer(_RabbitmqConsumer):
    """dramatiq's consumer, refusing a message that names another queue than the one it came from.

    dramatiq ran such a message, then handed it back to the consumer of the queue it names; with no
    such consumer (a hand-made message, a publisher with another queue prefix) the worker thread died
    with a KeyError, and the message stayed unacknowledged until the worker stopped, then came back
    to kill a thread again. Refused here, before it runs, it is dead-lettered like any message a
    worker cannot take, and the relay files it (or publishes its job again if that is waiting).
    """

    def __next__(self) -> Any:
        message = super().__next__()  # type: ignore[no-untyped-call]
        if message is not None and message.queue_name != self.queue_name:
            logger.error(
                "dead-lettering message %s: it names queue %r but came from %r",
                message.message_id, message.queue_name, self.queue_name,
            )  # fmt: skip
            self.known_tags.discard(message._tag)
            self._nack(message._tag)  # type: ignore[no-untyped-call]
            return None
        return message


class ConveyorBroker(RabbitmqBroker):
    """dramatiq's RabbitMQ broker, declaring its queues with ``queue_arguments``.

    Four differences from dramatiq: a message that names another queue than its own is refused
    (``_Consumer``); dead-letter queues (``Q.XQ``) are declared without dramatiq's 7-day
    ``x-message-ttl``, so RabbitMQ never drops a dead letter on its own; the relay files each one in
    Postgres (see ``worker_service/dead_letters.py``) and only an operator removes it. The queues
    can be quorum queues (``CONVEYOR_QUEUE_TYPE``), which dramatiq itself cannot declare. And a thread
    that only declares queues keeps no connection (``_ensure_queue``).
    """

    def __init__(self, *, queue_type: str, delivery_limit: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.queue_type = queue_type
        self.delivery_limit = delivery_limit

    @property
    def consumer_class(self) -> type[_RabbitmqConsumer]:
        return _Consumer

    def _ensure_queue(self, canonical_queue_name: str) -> None:
        """dramatiq's, then closing the thread's connection if this call opened it.

        dramatiq declares queues on a connection of the calling thread, and keeps it. The threads that
        only ever declare (a worker's consumer threads, which consume on connections of their own; the
        API's request threads, which publish through ``shared/confirms.py``) left it idle for good:
        nothing serviced its heartbeats, RabbitMQ dropped it after two missed beats ("missed heartbeats
        from client" in its log), and closing it at shutdown logged eight pika errors per worker
        process ("Connection reset by peer"), which the runbook's error queries then showed.
        """
        had_one = getattr(self.state, "connection", None) is not None
        try:
            super()._ensure_queue(canonical_queue_name)  # type: ignore[no-untyped-call]
        finally:
            # Usually nothing was pending, and no connection opened: every API publish comes here.
            if not had_one and getattr(self.state, "connection", None) is not None:
                del self.connection

    def _arguments(self, queue_name: str) -> QueueArguments:
        return queue_arguments(queue_name, self.queue_type, self.delivery_limit)

    def _declare_queue(self, queue_name: str) -> Any:
        arguments = self._arguments(queue_name).queue
        return self.channel.queue_declare(queue=queue_name, durable=True, arguments=arguments)

    def _declare_dq_queue(self, queue_name: str) -> Any:
        arguments = self._arguments(queue_name).delay_queue
        return self.channel.queue_declare(queue=dq_name(queue_name), durable=True, arguments=arguments)

    def _declare_xq_queue(self, queue_name: str) -> Any:
        arguments = self._arguments(queue_name).dead_letter_queue
        return self.channel.queue_declare(queue=xq_name(queue_name), durable=True, arguments=arguments)


def create_broker(settings: Settings, middleware: Sequence[dramatiq.Middleware] = ()) -> RabbitmqBroker:
    """A dramatiq broker with publisher confirms and Conveyor's queue arguments.

    ``middleware`` replaces dramatiq's defaults entirely: Conveyor does retries, time limits and
    dead-lettering itself, against Postgres.
    """
    return ConveyorBroker(
        url=url_with_defaults(settings.broker_url),
        confirm_delivery=True,
        queue_type=settings.queue_type,
        delivery_limit=settings.queue_delivery_limit,
        middleware=list(middleware),
    )


#: One counter for every process that publishes job messages: the API (its publishes after COMMIT) and
#: the relay (its outbox rounds) each export it, and ``sum by (job)`` tells them apart (docs/metrics.md).
#: It counts messages, not calls: a batch of 100 that RabbitMQ did not confirm adds 100.
PUBLISH_FAILURES = Counter(
    "conveyor_outbox_publish_failures_total",
    "Messages that RabbitMQ refused or did not confirm; their jobs stay in the outbox for the relay.",
)


@dataclass(frozen=True)
class Published:
    """What became of the dispatches of one ``publish_all``."""

    confirmed: list[Dispatch]
    #: The others, each with why RabbitMQ did not confirm it (short; never the broker URL).
    failed: list[tuple[Dispatch, str]]


class Publisher:
    """Publishes job messages with publisher confirms, many at a time (``shared/confirms.py``).

    After a failure it stops trying for ``backoff_seconds`` (``try_publish_all`` publishes nothing), so
    a dead broker costs one slow request, not every request: the outbox relay delivers what was
    skipped.
    """

    def __init__(
        self,
        broker: RabbitmqBroker,
        queue_prefix: str,
        backoff_seconds: float,
    ) -> None:
        self._broker = broker
        self._prefix = queue_prefix
        self._backoff = backoff_seconds
        parameters = broker.parameters  # dramatiq keeps a list when the URL names several brokers
        self._confirming = ConfirmingPublisher(parameters[0] if isinstance(parameters, list) else parameters)
        self._lock = threading.Lock()
        self._closed_until = 0.0

    def publish_all(self, dispatches: Sequence[Dispatch]) -> Published:
        """Publish all at once; those RabbitMQ did not confirm stay for the relay, with the reason."""
        messages = [build_message(dispatch, self._prefix) for dispatch in dispatches]
        try:
            for queue in {message.queue_name for message in messages}:
                # dramatiq declares the queue (and its .DQ and .XQ) once per process, with our arguments.
                self._broker.declare_queue(queue, ensure=True)
        except (DramatiqError, pika.exceptions.AMQPError, OSError) as exc:
            logger.warning("cannot declare queues, nothing published: %s", describe(exc))
            PUBLISH_FAILURES.inc(len(dispatches))
            reason = f"cannot declare queues: {describe(exc)}"
            return Published([], [(dispatch, reason) for dispatch in dispatches])
        outgoing = [
            OutgoingMessage(message.queue_name, message.encode(), message.message_id, dispatch.priority)
            for message, dispatch in zip(messages, dispatches, strict=True)
        ]
        failures = self._confirming.publish(outgoing)
        confirmed: list[Dispatch] = []
        failed: list[tuple[Dispatch, str]] = []
        for message, dispatch, failure in zip(messages, dispatches, failures, strict=True):
            if failure is None:
                confirmed.append(dispatch)
            else:
                failed.append((dispatch, failure))
                # Perhaps returned: its queue was deleted since this process declared it. Declared
                # again before the next publish (also the relay's, and its reads of dead letters).
                self._broker.queues_pending.add(message.queue_name)
        PUBLISH_FAILURES.inc(len(failed))
        return Published(confirmed, failed)

    def publish(self, dispatch: Dispatch) -> None:
        """Publish one message; returns once RabbitMQ confirmed it. Raises BrokerUnavailable."""
        for _, reason in self.publish_all([dispatch]).failed:
            raise BrokerUnavailable(f"the message of job {dispatch.job_id} is not published: {reason}")

    def try_publish_all(self, dispatches: Sequence[Dispatch]) -> list[Dispatch]:
        """``publish_all`` unless the broker failed recently; the dispatches RabbitMQ confirmed."""
        if not dispatches or time.monotonic() < self._closed_until:
            return []
        published = self.publish_all(dispatches).confirmed
        if len(published) < len(dispatches):
            with self._lock:
                self._closed_until = time.monotonic() + self._backoff
            logger.warning(
                "%d of %d messages not confirmed; the relay will deliver them, inline publishing paused "
                "%.0fs", len(dispatches) - len(published), len(dispatches), self._backoff,
            )  # fmt: skip
        return published

    def close(self) -> None:
        self._confirming.close()
        self._broker.close()


def check_broker(settings: Settings) -> None:
    """Open and close one AMQP connection; raises BrokerUnavailable if that fails."""
    params = pika.URLParameters(url_with_defaults(settings.broker_url))
    try:
        connection = pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerUnavailable(describe(exc)) from exc
    connection.close()


@dataclass(frozen=True)
class DeadMessage:
    """A message taken (not yet acknowledged) from a dead-letter queue."""

    body: bytes
    #: Why RabbitMQ dead-lettered it (``rejected``, ``delivery_limit``, ``expired``...), from x-death.
    death_reason: str
    delivery_tag: int


class DeadLetterReader:
    """Takes messages from the queues' ``.XQ`` so the relay can file them in Postgres, then acks them.

    Messages taken but not acked (the relay died, Postgres was down) go back to the queue when the
    channel closes, so filing is at-least-once; the store deduplicates.
    """

    def __init__(self, broker: RabbitmqBroker) -> None:
        self._broker = broker

    def take(self, queue_name: str, limit: int) -> list[DeadMessage]:
        """Up to ``limit`` messages from ``queue_name``'s dead-letter queue (declared if missing)."""
        try:
            channel = self._broker.channel  # first: declaring on a thread with no connection closes it
            self._broker.declare_queue(queue_name, ensure=True)
            taken = []
            for _ in range(limit):
                method, properties, body = channel.basic_get(queue=xq_name(queue_name), auto_ack=False)
                if method is None:
                    break
                deaths = (properties.headers or {}).get("x-death") or [{}]
                reason = str(deaths[0].get("reason", "unknown"))
                taken.append(DeadMessage(body, reason, method.delivery_tag))
            return taken
        except (DramatiqError, pika.exceptions.AMQPError, OSError) as exc:
            del self._broker.connection  # start afresh next time; unacked messages are requeued
            raise BrokerUnavailable(describe(exc)) from exc

    def ack(self, messages: Sequence[DeadMessage]) -> None:
        """Acknowledge exactly these messages (never with ``multiple``: that would also ack messages
        taken earlier on the channel and released without being filed)."""
        self._settle(messages, lambda channel, tag: channel.basic_ack(delivery_tag=tag))

    def release(self, messages: Sequence[DeadMessage]) -> None:
        """Give these messages back to their queue, unfiled, for a later round."""
        self._settle(messages, lambda channel, tag: channel.basic_nack(delivery_tag=tag, requeue=True))

    def _settle(self, messages: Sequence[DeadMessage], settle: Callable[[Any, int], None]) -> None:
        if not messages:
            return
        try:
            channel = self._broker.channel
            for message in messages:
                settle(channel, message.delivery_tag)
        except (DramatiqError, pika.exceptions.AMQPError, OSError) as exc:
            del self._broker.connection  # closing the channel requeues whatever it had not acked
            raise BrokerUnavailable(describe(exc)) from exc


@dataclass(frozen=True)
class QueueDepth:
    ready: int | None
    #: Delivered to a consumer and not yet acknowledged; only the management API knows (else None).
    unacknowledged: int | None
    consumers: int | None
    source: str


def queue_depth(settings: Settings, queue_name: str) -> QueueDepth:
    """Depth of one queue: from the management API when configured and reachable, else over AMQP
    (a passive declare, which knows ready messages and consumers but not unacknowledged ones)."""
    if settings.rabbitmq_management_url:
        try:
            return _depth_from_management(settings, queue_name)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning(
                "RabbitMQ management API unavailable (%s); falling back to AMQP", type(exc).__name__
            )
    return _depth_from_amqp(settings, queue_name)


def _depth_from_management(settings: Settings, queue_name: str) -> QueueDepth:
    amqp = urllib.parse.urlsplit(settings.broker_url)
    vhost = urllib.parse.unquote(amqp.path.lstrip("/")) or "/"
    url = (
        settings.rabbitmq_management_url.rstrip("/")
        + f"/api/queues/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(queue_name, safe='')}"
    )
    request = urllib.request.Request(url)  # noqa: S310 - an operator-configured http(s) URL
    credentials = (
        f"{urllib.parse.unquote(amqp.username or 'guest')}:{urllib.parse.unquote(amqp.password or 'guest')}"
    )
    request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        # No redirects: the request carries RabbitMQ's password, which must not follow one elsewhere.
        with no_redirects.opener().open(request, timeout=2) as response:
            data = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return QueueDepth(0, 0, 0, "management")
        raise
    return QueueDepth(
        ready=data.get("messages_ready"),
        unacknowledged=data.get("messages_unacknowledged"),
        consumers=data.get("consumers"),
        source="management",
    )


def _depth_from_amqp(settings: Settings, queue_name: str) -> QueueDepth:
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url_with_defaults(settings.broker_url)))
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerUnavailable(describe(exc)) from exc
    try:
        frame = connection.channel().queue_declare(queue=queue_name, passive=True)
        return QueueDepth(frame.method.message_count, None, frame.method.consumer_count, "amqp")
    except pika.exceptions.ChannelClosedByBroker:
        return QueueDepth(0, None, 0, "amqp")  # not declared yet: nothing was ever sent to it
    finally:
        if connection.is_open:
            connection.close()
