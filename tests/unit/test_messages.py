"""The message contract: queue names and job messages (shared/messages.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from dramatiq import Message
from dramatiq.brokers.stub import StubBroker

from shared.job_types import REGISTRY
from shared.messages import Dispatch, all_queue_names, build_message, queue_name

JOB_ID = uuid.UUID("6f1c2a8e-51d4-4c55-9a8e-0b6f7f1d2c3b")
DISPATCH = Dispatch(job_id=JOB_ID, job_type="demo.sleep", queue="default", priority=7)


@pytest.fixture
def stub_broker() -> Iterator[StubBroker]:
    broker = StubBroker(middleware=[])
    yield broker
    broker.close()


def test_queue_name_is_the_prefix_then_the_queue() -> None:
    assert queue_name("conveyor.", "default") == "conveyor.default"


def test_queue_name_without_prefix_is_the_queue() -> None:
    assert queue_name("", "default") == "default"


@pytest.mark.parametrize(
    ("prefix", "queue"),
    [
        ("conveyor ", "default"),  # space
        ("1conveyor.", "default"),  # starts with a digit
        (".conveyor", "default"),  # starts with a dot
        ("convéyor.", "default"),  # non-ASCII
        ("conveyor/", "default"),  # slash
        ("", ""),  # empty
    ],
)
def test_invalid_queue_name_is_refused_naming_the_prefix_setting(prefix: str, queue: str) -> None:
    with pytest.raises(ValueError, match="CONVEYOR_QUEUE_PREFIX"):
        queue_name(prefix, queue)


def test_all_queue_names_covers_every_registered_type_once() -> None:
    names = all_queue_names("p.")
    assert names == sorted(set(names))
    assert set(names) == {f"p.{t.queue}" for t in REGISTRY.values()}
    assert "p.default" in names


def test_message_id_is_the_job_id() -> None:
    assert build_message(DISPATCH, "conveyor.").message_id == str(JOB_ID)


def test_message_names_the_job_type_as_actor_and_the_prefixed_queue() -> None:
    message = build_message(DISPATCH, "conveyor.")
    assert message.actor_name == "demo.sleep"
    assert message.queue_name == "conveyor.default"


def test_message_carries_priority_and_no_arguments() -> None:
    message = build_message(DISPATCH, "conveyor.")
    assert message.options == {"broker_priority": 7, "request_id": None}
    assert tuple(message.args) == ()
    assert message.kwargs == {}


def test_message_with_a_bad_prefix_is_not_built() -> None:
    with pytest.raises(ValueError, match="not a valid queue name"):
        build_message(DISPATCH, "bad prefix.")


def test_message_survives_the_dramatiq_encoder() -> None:
    message = build_message(DISPATCH, "conveyor.")
    decoded = Message.decode(message.encode())
    assert decoded.message_id == str(JOB_ID)
    assert decoded.actor_name == "demo.sleep"
    assert decoded.queue_name == "conveyor.default"
    assert decoded.options == {"broker_priority": 7, "request_id": None}


def test_encoded_message_carries_no_payload() -> None:
    """Postgres holds the payload; the message only names the job."""
    encoded = json.loads(build_message(DISPATCH, "conveyor.").encode())
    assert set(encoded) == {
        "queue_name",
        "actor_name",
        "args",
        "kwargs",
        "options",
        "message_id",
        "message_timestamp",
    }
    assert encoded["args"] == []
    assert encoded["kwargs"] == {}


def test_every_copy_of_a_jobs_message_has_the_same_id() -> None:
    first = build_message(DISPATCH, "conveyor.")
    second = build_message(DISPATCH, "conveyor.")
    assert first.message_id == second.message_id


def test_enqueued_message_reaches_its_queue_with_the_job_id(stub_broker: StubBroker) -> None:
    message = build_message(DISPATCH, "conveyor.")
    stub_broker.declare_queue(message.queue_name)
    stub_broker.enqueue(message)
    delivered = Message.decode(stub_broker.queues["conveyor.default"].get_nowait())
    assert delivered.message_id == str(JOB_ID)
    assert delivered.actor_name == "demo.sleep"
