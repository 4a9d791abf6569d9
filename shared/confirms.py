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
within ``confirm_timeout``) is reported as not published, with the reason, and its outbox row stays for
the relay, which records that reason. A reason is short and never holds the broker URL, so never its
password: it names what happened and, for a broken connection, pika's exception (``describe``). The
connection is opened on first use, again after it was lost, and afresh in a forked child. Each
connection keeps its own channel and confirms (``_Link``), so one given up on while it was still
opening cannot disturb the one that replaced it.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable, Sequence
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


def describe(exc: BaseException) -> str:
    """``Type: reason`` of a broker error. pika's connection errors keep their reason in ``args`` and
    print as nothing (``AMQPConnectionError: ``, which told an operator nothing)."""
    reason = str(exc) or ", ".join(str(arg) or repr(arg) for arg in exc.args)
    if not reason:  # AMQPConnectionWorkflowFailed keeps the attempts' errors in ``exceptions`` only
        reason = "; ".join(describe(inner) for inner in getattr(exc, "exceptions", ()) or ()) or repr(exc)
    return f"{type(exc).__name__}: {reason}"


#: Why a message was not published, for the ones RabbitMQ answered (the others are described where
#: they fail: a connection that did not open, or closed, before the confirm came).
NACKED = "nacked by RabbitMQ"
RETURNED = "returned unroutable by RabbitMQ (its queue does not exist)"


@dataclass
class _Batch:
    """The messages of one call, and what became of each: ``outcome`` is None while unsettled, then
    whether RabbitMQ confirmed it; ``failures`` says why one was not."""

    messages: Sequence[OutgoingMessage]
    outcome: list[bool | None] = field(default_factory=list)
    failures: list[str | None] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    #: Messages not settled yet (counted, not searched for: a batch may hold hundreds).
    unsettled: int = 0

    def __post_init__(self) -> None:
        self.unsettled = sum(o is None for o in self.outcome)
        self.failures = [None] * len(self.outcome)

    def settle(self, index: int, failure: str | None) -> None:
        """Message ``index`` is confirmed (``failure`` None) or refused for the reason given."""
        if self.outcome[index] is None:
            self.failures[index] = failure
            self.outcome[index] = failure is None
            self.unsettled -= 1
        if not self.unsettled:
            self.done.set()

    def fail_unsettled(self, reason: str) -> None:
        for index, outcome in enumerate(self.outcome):
            if outcome is None:
                self.failures[index] = reason
        self.outcome = [bool(o) for o in self.outcome]
        self.done.set()

    def results(self, fallback: str) -> list[str | None]:
        """None for each message RabbitMQ confirmed, else why not (``fallback`` if still unsettled)."""
        return [None if ok else (failure or fallback)
                for ok, failure in zip(self.outcome, self.failures, strict=True)]  # fmt: skip


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
        self._link: _Link | None = None

    def publish(self, messages: Sequence[OutgoingMessage]) -> list[str | None]:
        """Publish ``messages``; for each, None if RabbitMQ confirmed it, else why it is not published.
        Never raises for broker trouble."""
        if not messages:
            return []
        link, failure = self._connected()
        if link is None:
            return [failure] * len(messages)
        batch = _Batch(messages, [None] * len(messages))
        link.call(lambda: link.send(batch))
        timed_out = f"not confirmed by RabbitMQ within {self._confirm_timeout:g}s"
        if not batch.done.wait(self._confirm_timeout):
            logger.warning("no confirm within %.0fs for %d messages", self._confirm_timeout, len(messages))
            link.call(lambda: link.forget(batch, timed_out))
            batch.done.wait(1.0)
        return batch.results(fallback=timed_out)

    def close(self) -> None:
        """Close the connection and wait (briefly) for its I/O thread to finish."""
        with self._lock:
            link, self._link = self._link, None
        if link is not None:
            link.close(wait=5.0)

    @property
    def _connection(self) -> pika.SelectConnection | None:
        """The current connection (tests break it on purpose)."""
        link = self._link
        return link.connection if link is not None else None

    def _connected(self) -> tuple[_Link | None, str]:
        """The open link, opened by the first caller that needs it; None and why if it could not be
        opened."""
        with self._lock:
            if self._pid != os.getpid() or self._link is None:
                self._pid = os.getpid()  # a forked child never uses its parent's connection
                self._link = _Link(self._parameters, on_closed=self._drop)
            link = self._link
        link.attempt_over.wait(self._connect_timeout)
        if not link.ready.is_set():
            logger.warning("RabbitMQ publisher connection could not be opened")
            self._drop(link)
            link.close(wait=0)  # closed once it opens, if it ever does; its callbacks touch only itself
            why = link.error or f"not open within {self._connect_timeout:g}s"
            return None, f"cannot connect to RabbitMQ: {why}"
        if self._link is not link:
            return None, "the connection to RabbitMQ closed as it opened"
        return link, ""

    def _drop(self, link: _Link) -> None:
        with self._lock:
            if self._link is link:
                self._link = None


class _Link:
    """One connection to RabbitMQ with its I/O thread, its channel and the confirms it awaits.

    Each connection's callbacks touch only its own link. A connection given up on (it took longer than
    ``connect_timeout`` to open) may still open or fail later, on its own thread; it can then neither
    take over nor close the channel of the connection that replaced it, nor settle that one's messages.
    """

    def __init__(self, parameters: pika.connection.Parameters, on_closed: Callable[[_Link], None]) -> None:
        self._on_link_closed = on_closed
        self.ready = threading.Event()
        #: Set once the connection attempt is over, whether it worked (``ready``) or not.
        self.attempt_over = threading.Event()
        self._abandoned = False
        #: Why the connection closed or failed to open (``describe``), once it has.
        self.error = ""
        # Owned by the I/O thread:
        self._channel: pika.channel.Channel | None = None
        self._next_tag = 1
        self._unsettled: dict[int, tuple[_Batch, int]] = {}
        self._returned: set[str] = set()
        self.connection = pika.SelectConnection(
            parameters,
            on_open_callback=lambda conn: conn.channel(on_open_callback=self._on_channel_open),
            on_open_error_callback=self._on_closed,
            on_close_callback=self._on_closed,
        )
        self._thread = threading.Thread(target=self._run_ioloop, name="conveyor-publisher-io", daemon=True)
        self._thread.start()

    def call(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the I/O thread."""
        self.connection.ioloop.add_callback_threadsafe(callback)

    def close(self, wait: float) -> None:
        """Close the connection; wait up to ``wait`` s for its I/O thread to finish.

        pika cannot close a connection in the middle of its handshake (its own callbacks then fail), so
        one still opening is left to fail on its own timeouts, or is closed as soon as it opens.
        """

        def close() -> None:
            self._abandoned = True
            if self.connection.is_open:
                self.connection.close()

        if self._thread.is_alive():
            self.call(close)
            self._thread.join(timeout=wait)

    def _run_ioloop(self) -> None:
        self.connection.ioloop.start()  # until the connection closes (see _on_closed)
        self.connection.ioloop.close()

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        if self._abandoned:
            self.connection.close()
            return
        self._channel = channel
        channel.add_on_return_callback(self._on_return)
        channel.add_on_close_callback(lambda ch, exc: self._on_channel_closed(exc))
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _: self._opened())

    def _opened(self) -> None:
        self.ready.set()
        self.attempt_over.set()

    def _on_channel_closed(self, exc: BaseException) -> None:
        # 200 is a normal close (ours, at shutdown): news only when RabbitMQ or the network closed it.
        normal = isinstance(exc, pika.exceptions.ChannelClosed) and exc.reply_code == 200
        logger.log(logging.INFO if normal else logging.WARNING, "RabbitMQ publisher channel closed: %s", exc)
        self._fail_all(f"the publisher channel closed before the confirm: {describe(exc)}")
        if self.connection.is_open:
            self.connection.close()

    def _on_closed(self, connection: pika.SelectConnection, exc: BaseException) -> None:
        closed_by_us = isinstance(exc, pika.exceptions.ConnectionClosedByClient) or self._abandoned
        logger.log(
            logging.INFO if closed_by_us else logging.WARNING, "RabbitMQ publisher connection closed: %s", exc
        )
        self.error = describe(exc)
        self.ready.clear()
        self._on_link_closed(self)
        self.attempt_over.set()
        self._fail_all(f"the connection to RabbitMQ closed before the confirm: {self.error}")
        connection.ioloop.stop()

    def send(self, batch: _Batch) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            batch.fail_unsettled("no open channel to RabbitMQ")
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
            batch.settle(index, RETURNED if returned else None if acked else NACKED)

    def forget(self, batch: _Batch, reason: str) -> None:
        for tag, (owner, _) in list(self._unsettled.items()):
            if owner is batch:
                del self._unsettled[tag]
        batch.fail_unsettled(reason)

    def _fail_all(self, reason: str) -> None:
        batches = {id(b): b for b, _ in self._unsettled.values()}
        self._unsettled.clear()
        self._returned.clear()
        self._channel = None
        for batch in batches.values():
            batch.fail_unsettled(reason)
