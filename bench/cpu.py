"""Where the CPU goes: the CPU time of a subject's processes, of Postgres and of RabbitMQ, per job or
per request, read from the kernel's counters (``/proc``, through psutil) around a measurement.

Throughput ratios say how far apart two subjects are; these figures say why. On two cores a drain at
2 x 8 is bound by the sum of the three, so they also bound what any change can gain. They count work
rather than time, but a busier machine still moves them (cache misses, lock contention), by 10-25%
between rounds here.

A drain is counted between the first moment at least ``START`` of its jobs are done and the first
moment at least ``END`` are (the same share as the rate), so the worker's start-up and shutdown stay out.
A submission is counted over the whole wrk run. Postgres and RabbitMQ are every process of those
servers on the machine: nothing else should run during a benchmark.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import psutil

#: The three groups of processes, in the order the table shows them.
GROUPS = ("subject", "postgres", "rabbitmq")
START, END = 0.1, 0.9


def _seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def server_seconds() -> dict[str, float]:
    """CPU seconds used so far by the Postgres and the RabbitMQ processes (their servers' children
    included: each Postgres backend is a process)."""
    used = {"postgres": 0.0, "rabbitmq": 0.0}
    for proc in psutil.process_iter(["name"]):
        name = proc.info["name"] or ""
        group = "postgres" if name.startswith("postgres") else "rabbitmq" if name == "beam.smp" else None
        if group is not None:
            with contextlib.suppress(psutil.Error):
                used[group] += _seconds(proc)
    return used


def tree_seconds(pids: list[int]) -> float:
    """CPU seconds used so far by these processes and their live descendants."""
    used = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    used += _seconds(proc)
    return used


@dataclass(frozen=True)
class Reading:
    done: int
    seconds: dict[str, float]


def read(subject_pids: list[int], done: int) -> Reading:
    return Reading(done, {"subject": tree_seconds(subject_pids), **server_seconds()})


def per_unit(first: Reading, last: Reading) -> dict[str, float] | None:
    """Microseconds of CPU per unit of work (job or request) between two readings, by group; None if
    no work was done between them."""
    units = last.done - first.done
    if units <= 0:
        return None
    return {group: (last.seconds[group] - first.seconds[group]) / units * 1e6 for group in GROUPS}


class DrainWindow:
    """Readings at the first observation of at least ``START`` and of at least ``END`` of ``total``
    jobs done; ``observe`` is called from the loop that waits for the drain."""

    def __init__(self, subject_pids: list[int], total: int) -> None:
        self._pids = subject_pids
        self._total = total
        self.first: Reading | None = None
        self.last: Reading | None = None

    def observe(self, done: int) -> None:
        if self.last is not None:
            return
        if self.first is None and done >= START * self._total:
            self.first = read(self._pids, done)
        elif self.first is not None and done >= END * self._total:
            self.last = read(self._pids, done)

    def per_job(self) -> dict[str, float] | None:
        if self.first is None or self.last is None:
            return None
        return per_unit(self.first, self.last)
