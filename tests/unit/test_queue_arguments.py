"""How Conveyor declares its RabbitMQ queues, classic or quorum (shared/broker.py)."""

from __future__ import annotations

import pytest

from shared.broker import MAX_PRIORITY, UNLIMITED_DELIVERIES, create_broker, queue_arguments
from shared.settings import Settings, SettingsError


def test_classic_queues_keep_dramatiqs_arguments_and_priorities() -> None:
    args = queue_arguments("conveyor.default", "classic", 20)
    expected = {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "conveyor.default.XQ",
        "x-max-priority": MAX_PRIORITY,
    }
    assert args.queue == expected
    assert args.delay_queue == expected


def test_classic_dead_letter_queue_has_no_ttl() -> None:
    assert queue_arguments("conveyor.default", "classic", 20).dead_letter_queue == {}


def test_quorum_queue_dead_letters_with_a_delivery_limit_and_no_priority() -> None:
    args = queue_arguments("conveyor.default", "quorum", 7)
    assert args.queue == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "conveyor.default.XQ",
        "x-delivery-limit": 7,
    }


def test_quorum_delay_queue_has_a_delivery_limit_never_reached() -> None:
    # -1 would mean "unlimited" on RabbitMQ 4 but dead-letters at the first return on 3.x.
    args = queue_arguments("conveyor.default", "quorum", 7)
    assert args.delay_queue["x-queue-type"] == "quorum"
    assert args.delay_queue["x-delivery-limit"] == UNLIMITED_DELIVERIES
    assert "x-max-priority" not in args.delay_queue


def test_quorum_dead_letter_queue_is_quorum_without_ttl_and_never_drops() -> None:
    assert queue_arguments("conveyor.default", "quorum", 7).dead_letter_queue == {
        "x-queue-type": "quorum",
        "x-delivery-limit": UNLIMITED_DELIVERIES,
    }


def test_unlimited_is_a_positive_32_bit_integer() -> None:
    assert 10**9 < UNLIMITED_DELIVERIES < 2**31


def test_unknown_queue_type_is_refused() -> None:
    with pytest.raises(ValueError, match="stream"):
        queue_arguments("conveyor.default", "stream", 7)


def test_queue_type_setting_accepts_only_classic_and_quorum() -> None:
    assert Settings.from_env({}).queue_type == "classic"
    assert Settings.from_env({"CONVEYOR_QUEUE_TYPE": "quorum"}).queue_type == "quorum"
    with pytest.raises(SettingsError, match="CONVEYOR_QUEUE_TYPE"):
        Settings.from_env({"CONVEYOR_QUEUE_TYPE": "mirrored"})


def test_delivery_limit_setting_must_be_positive() -> None:
    with pytest.raises(SettingsError, match="CONVEYOR_QUEUE_DELIVERY_LIMIT must be at least"):
        Settings.from_env({"CONVEYOR_QUEUE_DELIVERY_LIMIT": "0"})


def test_broker_takes_queue_type_and_limit_from_the_settings() -> None:
    # Building the broker opens no connection.
    settings = Settings.from_env({"CONVEYOR_QUEUE_TYPE": "quorum", "CONVEYOR_QUEUE_DELIVERY_LIMIT": "5"})
    broker = create_broker(settings)
    assert broker.queue_type == "quorum"
    assert broker.delivery_limit == 5
