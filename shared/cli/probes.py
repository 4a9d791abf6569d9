"""``conveyor worker-alive`` and ``conveyor relay-alive``: liveness probes (see ``shared/heartbeat.py``)."""

from __future__ import annotations

import argparse
import math
import sys

from shared import heartbeat
from shared.settings import Settings


def worker_alive(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.worker_heartbeat_file:
        message = "CONVEYOR_WORKER_HEARTBEAT_FILE is not set, so the worker writes no heartbeat"
        print(f"conveyor worker-alive: {message}", file=sys.stderr)
        return 1
    expected = settings.worker_processes if args.processes is None else args.processes
    verdict = heartbeat.check(
        settings.worker_heartbeat_file, max_age=args.max_age, expected_processes=expected
    )
    print(f"conveyor worker-alive: {verdict.message}", file=sys.stdout if verdict.alive else sys.stderr)
    return 0 if verdict.alive else 1


def relay_alive(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.relay_heartbeat_file:
        print("conveyor relay-alive: CONVEYOR_RELAY_HEARTBEAT_FILE is not set, so the relay writes no "
              "heartbeat", file=sys.stderr)  # fmt: skip
        return 1
    verdict = heartbeat.check(
        settings.relay_heartbeat_file, max_age=args.max_age, expected_processes=1, what="relay"
    )
    print(f"conveyor relay-alive: {verdict.message}", file=sys.stdout if verdict.alive else sys.stderr)
    return 0 if verdict.alive else 1


def seconds(raw: str) -> float:
    """A number of seconds above 0 (argparse names the type after this function in its errors)."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {raw!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {raw!r}")
    return value


def add_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    alive = commands.add_parser(
        "worker-alive",
        help="exit 0 if every worker process beat recently, 1 otherwise (liveness probe)",
        description="Checks the heartbeat files <CONVEYOR_WORKER_HEARTBEAT_FILE>.<pid> of the worker "
        "processes on this host or container.",
    )
    alive.add_argument(
        "--max-age",
        type=seconds,
        required=True,
        metavar="SECONDS",
        help="oldest acceptable heartbeat; well above CONVEYOR_JOB_LEASE_SECONDS / 3",
    )
    alive.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="worker processes expected (default: CONVEYOR_WORKER_PROCESSES)",
    )
    alive.set_defaults(handler=worker_alive)
    relay = commands.add_parser(
        "relay-alive",
        help="exit 0 if the relay finished a round recently, 1 otherwise (liveness probe)",
        description="Checks the heartbeat file <CONVEYOR_RELAY_HEARTBEAT_FILE>.<pid> the relay touches "
        "after every round.",
    )
    relay.add_argument(
        "--max-age",
        type=seconds,
        required=True,
        metavar="SECONDS",
        help="oldest acceptable heartbeat; a round takes CONVEYOR_RELAY_POLL_SECONDS when idle",
    )
    relay.set_defaults(handler=relay_alive)
