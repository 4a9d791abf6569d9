"""Publishing with confirms awaited together: part of the broker adapter (``shared/broker.py``).

dramatiq publishes through a blocking pika channel that waits for each message's confirm before it
sends the next one. That costs a round trip, and a wait for RabbitMQ's disk, per message: a batch of
100 jobs waited for 100 confirms one after the other, and every API thread kept its own connection.

Here each process has one AMQP connection, driven by its own I/O thread (pika's asynchronous
``SelectConnection``). Any thread hands it a list of messages; the I/O thread publishes them at once,
with ``mandatory`` set, and the calling thread waits until RabbitMQ has confirmed (or refused) every
one of them. Confirms of concurrent publishes arrive together (RabbitMQ acks with ``multiple``), so a
batch costs about one confirm wait, whatever its size.

A message counts as published only when RabbitMQ acked it and did not return it as unroutable (a queue
deleted since it was declared). Everything else (a nack, a return, the connection lost, no confirm
within ``confirm_timeout``) is reported as not published, and its outbox row stays for the relay. The
connection is opened on first use, again after it was lost, and afresh in a forked child.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutgoingMessage:
    queue: str
    body: bytes
    #: The job id: RabbitMQ's returns carry no delivery tag, so a returned message is known by this.
    message_id: str
    priority: int | None = None


@dataclass
class _Batch:
    """The messages of one call, and what became of each (None while unsettled)."""

    messages: Sequence[OutgoingMessage]
    outcome: list[bool | None] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    #: Messages not settled yet (counted, not searched for: a batch may hold hundreds).
    unsettled: int = 0

    def __post_init__(self) -> None:
        self.unsettled = sum(o is None for o in self.outcome)

    def settle(self, index: int, ok: bool) -> None:
        if self.outcome[index] is None:
            self.outcome[index] = ok
            self.unsettled -= 1
        if not self.unsettled:
            self.done.set()

    def fail_unsettled(self) -> None:
        self.outcome = [bool(o) for o in self.outcome]
        self.done.set()


class ConfirmingPublisher:
    def __init__(
        self,
        parameters: pika.connection.Parameters,
        *,
        connect_timeout: float = 5.0,
        confirm_timeout: float = 5.0,
    ) -> None:
        self._parameters = parameters
        self._connect_timeout = connect_timeout
        self._confirm_timeout = confirm_timeout
        self._lock = threading.Lock()
        self._pid = 0
        self._connection: pika.SelectConnection | None = None
        self._channel: pika.channel.Channel | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        #: Set once the current connection attempt is over, whether it worked (``_ready``) or not.
        self._attempt_over = threading.Event()
        # Owned by the I/O thread once the channel is open:
        self._next_tag = 1
        self._unsettled: dict[int, tuple[_Batch, int]] = {}
        self._returned: set[str] = set()

    def publish(self, messages: Sequence[OutgoingMessage]) -> list[bool]:
        """Publish ``messages``; for each, whether RabbitMQ confirmed it. Never raises for broker trouble."""
        if not messages:
            return []
        connection = self._connected()
        if connection is None:
            return [False] * len(messages)
        batch = _Batch(messages, [None] * len(messages))
        connection.ioloop.add_callback_threadsafe(lambda: self._send(batch))
        if not batch.done.wait(self._confirm_timeout):
            logger.warning("no confirm within %.0fs for %d messages", self._confirm_timeout, len(messages))
            connection.ioloop.add_callback_threadsafe(lambda: self._forget(batch))
            batch.done.wait(1.0)
        return [bool(o) for o in batch.outcome]

    def close(self) -> None:
        """Close the connection and wait (briefly) for its I/O thread to finish."""
        with self._lock:
            connection, self._connection = self._connection, None
            thread, self._thread = self._thread, None
        if connection is not None and thread is not None and thread.is_alive():
            connection.ioloop.add_callback_threadsafe(lambda: connection.is_open and connection.close())
            thread.join(timeout=5)

    # --- the connection (opened by the first caller that needs it) ----------------------------------

    def _connected(self) -> pika.SelectConnection | None:
        with self._lock:
            if self._pid != os.getpid() or self._connection is None:
                self._pid = os.getpid()
                self._ready.clear()
                self._attempt_over.clear()
                self._connection = self._open()
            connection = self._connection
        self._attempt_over.wait(self._connect_timeout)
        if not self._ready.is_set():
            logger.warning("RabbitMQ publisher connection could not be opened")
            self._drop(connection)
            return None
        return connection if self._connection is connection else None

    def _open(self) -> pika.SelectConnection:
        connection = pika.SelectConnection(
            self._parameters,
            on_open_callback=lambda conn: conn.channel(on_open_callback=self._on_channel_open),
            on_open_error_callback=lambda conn, exc: self._on_closed(conn, exc),
            on_close_callback=self._on_closed,
        )
        self._thread = threading.Thread(
            target=self._run_ioloop, args=(connection,), name="conveyor-publisher-io", daemon=True
        )
        self._thread.start()
        return connection

    @staticmethod
    def _run_ioloop(connection: pika.SelectConnection) -> None:
        connection.ioloop.start()  # until the connection closes (see _on_closed)
        connection.ioloop.close()

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        self._channel = channel
        self._next_tag = 1
        channel.add_on_return_callback(self._on_return)
        channel.add_on_close_callback(lambda ch, exc: self._on_channel_closed(exc))
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _: self._opened())

    def _opened(self) -> None:
        self._ready.set()
        self._attempt_over.set()

    def _on_channel_closed(self, exc: BaseException) -> None:
        connection = self._connection
        logger.warning("RabbitMQ publisher channel closed: %s", exc)
        self._fail_all()
        if connection is not None and connection.is_open:
            connection.close()

    def _on_closed(self, connection: pika.SelectConnection, exc: BaseException) -> None:
        closed_by_us = isinstance(exc, pika.exceptions.ConnectionClosedByClient)
        logger.log(
            logging.INFO if closed_by_us else logging.WARNING, "RabbitMQ publisher connection closed: %s", exc
        )
        self._drop(connection)
        self._attempt_over.set()
        self._fail_all()
        connection.ioloop.stop()

    def _drop(self, connection: pika.SelectConnection | None) -> None:
        with self._lock:
            if self._connection is connection:
                self._connection = None
                self._ready.clear()

    # --- on the I/O thread ---------------------------------------------------------------------------

    def _send(self, batch: _Batch) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            batch.fail_unsettled()
            return
        for index, message in enumerate(batch.messages):
            properties = pika.BasicProperties(
                delivery_mode=2, priority=message.priority, message_id=message.message_id
            )
            channel.basic_publish("", message.queue, message.body, properties, mandatory=True)
            self._unsettled[self._next_tag] = (batch, index)
            self._next_tag += 1

    def _on_return(
        self, _channel: Any, _method: Any, properties: pika.spec.BasicProperties, _body: bytes
    ) -> None:
        # A return comes before the ack of the same message: remember it until then.
        if properties.message_id:
            self._returned.add(properties.message_id)

    def _on_confirm(self, frame: pika.frame.Method[Any]) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        # Tags are added in increasing order, so the dict's order is theirs: stop at the first one past.
        tags = (
            list(itertools.takewhile(lambda t: t <= method.delivery_tag, self._unsettled))
            if method.multiple
            else [method.delivery_tag]
        )
        for tag in tags:
            entry = self._unsettled.pop(tag, None)
            if entry is None:
                continue
            batch, index = entry
            message_id = batch.messages[index].message_id
            returned = message_id in self._returned
            self._returned.discard(message_id)
            if returned or not acked:
                logger.warning("RabbitMQ %s message %s", "returned" if returned else "nacked", message_id)
            batch.settle(index, acked and not returned)

    def _forget(self, batch: _Batch) -> None:
        for tag, (owner, _) in list(self._unsettled.items()):
            if owner is batch:
                del self._unsettled[tag]
        batch.fail_unsettled()

    def _fail_all(self) -> None:
        batches = {id(b): b for b, _ in self._unsettled.values()}
        self._unsettled.clear()
        self._returned.clear()
        self._channel = None
        for batch in batches.values():
            batch.fail_unsettled()
