"""``describe``: the reason of a broker error, as the outbox's ``last_error`` and /readyz give it."""

from __future__ import annotations

import socket

import pika.exceptions
from pika.adapters.utils.connection_workflow import AMQPConnectionWorkflowFailed

from shared.confirms import describe


def test_an_error_that_prints_as_nothing_is_described_by_its_arguments() -> None:
    error = pika.exceptions.AMQPConnectionError(ConnectionRefusedError(111, "Connection refused"))
    assert describe(error) == "AMQPConnectionError: [Errno 111] Connection refused"


def test_a_failed_connection_workflow_is_described_by_the_errors_of_its_attempts() -> None:
    """pika keeps them in ``exceptions``: str() and args are empty (an unresolvable host said nothing)."""
    failed = AMQPConnectionWorkflowFailed([socket.gaierror(-2, "Name or service not known")])
    assert describe(failed) == "AMQPConnectionWorkflowFailed: gaierror: [Errno -2] Name or service not known"
