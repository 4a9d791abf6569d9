"""Publishing with confirms awaited together, against the real RabbitMQ."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator

import pika
import pytest
from prometheus_client import REGISTRY
from support import RUN_ID, amqp_channel, queue_counts, wait_for

from shared.broker import Publisher, create_broker, url_with_defaults
from shared.confirms import RETURNED, ConfirmingPublisher, OutgoingMessage
from shared.messages import Dispatch
from shared.settings import Settings


@pytest.fixture
def queue(broker_url: str) -> Iterator[str]:
    name = f"conveyor_test_{RUN_ID}.confirms-{uuid.uuid4().hex[:8]}"
    with amqp_channel(broker_url) as channel:
        channel.queue_declare(queue=name, durable=True)
    yield name
    with amqp_channel(broker_url) as channel:
        channel.queue_delete(queue=name)


@pytest.fixture
def publisher(settings: Settings) -> Iterator[ConfirmingPublisher]:
    publisher = ConfirmingPublisher(pika.URLParameters(url_with_defaults(settings.broker_url)))
    yield publisher
    publisher.close()


def messages(queue: str, count: int) -> list[OutgoingMessage]:
    return [OutgoingMessage(queue, b"{}", str(uuid.uuid4()), priority=None) for _ in range(count)]


def test_a_batch_is_confirmed_and_lands_in_its_queue(
    publisher: ConfirmingPublisher, queue: str, broker_url: str
) -> None:
    assert publisher.publish(messages(queue, 500)) == [None] * 500
    wait_for(lambda: queue_counts(broker_url, queue)[0] == 500, timeout=10, what="500 messages in the queue")


def test_an_unroutable_message_is_not_confirmed_and_the_rest_are(
    publisher: ConfirmingPublisher, queue: str
) -> None:
    batch = messages(queue, 2) + messages(f"conveyor_test_{RUN_ID}.no-such-queue", 1) + messages(queue, 2)
    assert publisher.publish(batch) == [None, None, RETURNED, None, None]


def test_closing_the_publisher_is_not_a_warning(
    settings: Settings, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every Ctrl-C of `conveyor run` logged "publisher channel closed: (200, 'Normal shutdown')" as a
    warning; a warning is for a channel that RabbitMQ or the network closed."""
    publisher = ConfirmingPublisher(pika.URLParameters(url_with_defaults(settings.broker_url)))
    assert publisher.publish(messages(queue, 1)) == [None]
    with caplog.at_level("INFO", logger="shared.confirms"):
        publisher.close()
    closed = [r for r in caplog.records if "publisher channel closed" in r.getMessage()]
    assert closed, "the close is still logged"
    assert all(r.levelname == "INFO" for r in closed), [(r.levelname, r.getMessage()) for r in closed]


def test_a_dead_broker_fails_fast_and_publishes_nothing() -> None:
    dead = ConfirmingPublisher(pika.URLParameters(url_with_defaults("amqp://guest:s3cret@127.0.0.1:1/%2F")))
    began = time.monotonic()
    try:
        failures = dead.publish(messages("anything", 3))
    finally:
        dead.close()
    assert time.monotonic() - began < 4, "refused at once, not after the connect timeout"
    [failure] = set(failures)
    assert len(failures) == 3
    assert failure is not None
    assert failure.startswith("cannot connect to RabbitMQ: AMQPConnectionError"), failure
    assert "Connection refused" in failure, "the reason names what pika saw"
    assert "s3cret" not in failure


def test_a_lost_connection_is_reopened_on_the_next_publish(
    publisher: ConfirmingPublisher, queue: str, broker_url: str
) -> None:
    assert publisher.publish(messages(queue, 1)) == [None]
    connection = publisher._connection  # the test reaches in only to break it
    assert connection is not None
    connection.ioloop.add_callback_threadsafe(connection.close)
    wait_for(lambda: publisher._connection is None, timeout=5, what="the publisher to notice")
    assert publisher.publish(messages(queue, 3)) == [None] * 3
    wait_for(lambda: queue_counts(broker_url, queue)[0] == 4, timeout=10, what="4 messages in the queue")


class StallingProxy:
    """A TCP proxy to RabbitMQ whose first connection is accepted and then never answered (a broker too
    slow to finish the handshake); later ones are passed through."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.stalled: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.stalled:
                self.stalled.append(client)
                continue
            server = socket.create_connection(self._upstream)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()


def test_a_connection_given_up_on_while_opening_cannot_disturb_the_next_one(
    queue: str, broker_url: str
) -> None:
    url = urllib.parse.urlsplit(broker_url)
    proxy = StallingProxy((url.hostname or "127.0.0.1", url.port or 5672))
    parameters = pika.URLParameters(url_with_defaults(broker_url))
    parameters.port = proxy.port
    publisher = ConfirmingPublisher(parameters, connect_timeout=1.0)
    try:
        never_opens = publisher.publish(messages(queue, 1))
        assert never_opens == ["cannot connect to RabbitMQ: not open within 1s"], "the first connection"
        assert publisher.publish(messages(queue, 1)) == [None]
        proxy.stalled[0].close()  # the first attempt, given up on, fails now, on its own thread
        time.sleep(0.5)
        assert [publisher.publish(messages(queue, 2)) for _ in range(3)] == [[None, None]] * 3
        wait_for(lambda: queue_counts(broker_url, queue)[0] == 7, timeout=10, what="7 messages in the queue")
    finally:
        publisher.close()
        proxy.close()


def test_a_queue_deleted_behind_the_publishers_back_is_declared_again(settings: Settings) -> None:
    prefix = f"conveyor_test_{RUN_ID}.redeclare-{uuid.uuid4().hex[:8]}."
    isolated = dataclasses.replace(settings, queue_prefix=prefix)
    publisher = Publisher(create_broker(isolated), prefix, backoff_seconds=0)
    queue = prefix + "default"

    def dispatch() -> Dispatch:
        return Dispatch(uuid.uuid4(), "noop", "default", 5)

    try:
        assert len(publisher.publish_all([dispatch()]).confirmed) == 1
        with amqp_channel(settings.broker_url) as channel:
            channel.queue_delete(queue=queue)
        failures = publish_failures()
        returned = publisher.publish_all([dispatch(), dispatch()])
        assert returned.confirmed == [], "returned: its queue is gone"
        assert [reason for _, reason in returned.failed] == [RETURNED, RETURNED]
        assert publish_failures() - failures == 2, "the counter counts messages, not calls"
        assert len(publisher.publish_all([dispatch()]).confirmed) == 1, "the queue is declared again"
        assert queue_counts(settings.broker_url, queue)[0] == 1
    finally:
        publisher.close()
        with amqp_channel(settings.broker_url) as channel:
            for suffix in ("", ".DQ", ".XQ"):
                channel.queue_delete(queue=queue + suffix)


def publish_failures() -> float:
    return REGISTRY.get_sample_value("conveyor_outbox_publish_failures_total") or 0.0


def test_declaring_a_queue_leaves_no_idle_connection_behind(settings: Settings) -> None:
    """dramatiq declares queues on a connection of the calling thread and keeps it. A thread that only
    declares (an API request thread before its publish, a worker's consumer thread) left it idle, and
    with heartbeats on RabbitMQ dropped it after two missed beats; closing it at shutdown logged pika
    errors. A thread that had a connection already keeps it (the relay reads dead letters on it)."""
    prefix = f"conveyor_test_{RUN_ID}.idle-{uuid.uuid4().hex[:8]}."
    broker = create_broker(dataclasses.replace(settings, queue_prefix=prefix))
    declared: list[int] = []

    def declare(name: str, keep: bool) -> None:
        if keep:
            assert broker.channel.is_open  # this thread's connection, opened before
        broker.declare_queue(prefix + name, ensure=True)
        declared.append(len(broker.connections))

    try:
        for name, keep in (("a", False), ("b", True)):
            thread = threading.Thread(target=declare, args=(name, keep))
            thread.start()
            thread.join()
        assert declared == [0, 1], "no connection left by a thread that only declared; a used one kept"
    finally:
        broker.close()
        with amqp_channel(settings.broker_url) as channel:
            for name in ("a", "b"):
                for suffix in ("", ".DQ", ".XQ"):
                    channel.queue_delete(queue=prefix + name + suffix)
