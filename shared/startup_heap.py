"""Keeping the objects a process made at start-up out of Python's garbage collector.

A Conveyor process imports Flask, flask-smorest, marshmallow, dramatiq and pika and builds its app or
broker before it serves anything: tens of thousands of objects that live as long as the process. Python's
collector visits every one of them in each full (generation 2) collection, with the GIL held, so every
thread of the process stops for as long: 22-28 ms for a freshly started API process (65,000 objects)
and 7-11 ms for a worker process (32,000) on the benchmark machine. Under batch submissions an API
process ran such a collection every second or two, each stopping its requests for 19-88 ms
(docs/performance.md, session 12).

``freeze_startup_heap`` moves what exists at that point into the collector's permanent generation
(``gc.freeze``), which full collections skip: the same collection then takes microseconds, and later
ones visit only what the process made since. Garbage is collected first, so that none of it is kept for
good. Frozen objects are still freed by reference counting; only cycles among them would stay, and
start-up objects live as long as the process anyway.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect, then freeze every object the process holds now; returns how many are frozen in all."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
