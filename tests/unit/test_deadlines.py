"""Per-attempt timeouts raised into the handler's thread (worker_service/deadlines.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from worker_service.deadlines import CHECK_INTERVAL_SECONDS, DeadlineMonitor
from worker_service.errors import JobTimeout

#: Scheduling slack on a loaded machine, on top of the monitor's own check interval.
SLACK_SECONDS = 0.5


@pytest.fixture
def monitor() -> Iterator[DeadlineMonitor]:
    monitor = DeadlineMonitor()
    monitor.start()
    yield monitor
    monitor.stop()


def busy_for(seconds: float) -> None:
    """A handler that sleeps in short steps, so an async exception can land between them."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)


def test_block_past_its_deadline_is_interrupted_shortly_after_it(monitor: DeadlineMonitor) -> None:
    started = time.monotonic()
    deadline = started + 0.2
    with pytest.raises(JobTimeout), monitor.limit(deadline):
        busy_for(5)
    interrupted_at = time.monotonic()
    assert interrupted_at >= deadline
    assert interrupted_at - deadline < CHECK_INTERVAL_SECONDS + SLACK_SECONDS


def test_handler_catching_exception_cannot_swallow_the_timeout(monitor: DeadlineMonitor) -> None:
    swallowed: list[Exception] = []

    def careless_handler() -> None:
        end = time.monotonic() + 5
        while time.monotonic() < end:
            try:
                time.sleep(0.01)
            except Exception as exc:
                swallowed.append(exc)

    with pytest.raises(JobTimeout), monitor.limit(time.monotonic() + 0.2):
        careless_handler()
    assert swallowed == []


def test_block_finishing_before_its_deadline_is_not_interrupted(monitor: DeadlineMonitor) -> None:
    deadline = time.monotonic() + 0.3
    with monitor.limit(deadline):
        busy_for(0.05)
    # Nothing may arrive after leaving the block, not even once the old deadline has passed.
    busy_for(deadline - time.monotonic() + 3 * CHECK_INTERVAL_SECONDS)
    assert time.monotonic() > deadline


def test_deadline_applies_again_to_a_later_block(monitor: DeadlineMonitor) -> None:
    with monitor.limit(time.monotonic() + 5):
        busy_for(0.05)
    with pytest.raises(JobTimeout), monitor.limit(time.monotonic() + 0.1):
        busy_for(5)
