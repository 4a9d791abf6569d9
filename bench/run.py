"""One benchmark run: every phase in order on the same Postgres and RabbitMQ, then the document.

    python -m bench [--jobs N] [--seconds S] [--scale ROWS] [--profile] [--output docs/performance.md]

A phase that fails records its figures as errors (and its reason in the notes); the run goes on, and
the exit status is 1. Whatever happens, the run's processes, database and queues are removed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import phases, profile, report
from bench.load import wrk_path
from bench.phases import Measurements, Subjects
from bench.services import ROOT, BenchRun

#: The groups of measurements ``--only`` selects from.
GROUPS = ("drain", "submit", "latency")


@dataclass(frozen=True)
class Options:
    jobs: int
    seconds: float
    batch: int
    rate: float
    latency_seconds: float
    scale: int
    profile: bool
    output: Path
    json: Path | None
    only: frozenset[str]
    repeat: int = 1


def parse(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="no-op jobs per drain measurement")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each HTTP measurement")
    parser.add_argument("--batch", type=int, default=100, help="jobs per POST /v1/jobs/batch request")
    parser.add_argument("--rate", type=float, default=200.0, help="jobs/s of the latency measurement")
    parser.add_argument("--latency-seconds", type=float, default=10.0, help="duration of each latency run")
    parser.add_argument(
        "--scale",
        type=int,
        default=0,
        help="also measure with this many finished jobs in the tables (1000000 for issue 8)",
    )
    parser.add_argument("--profile", action="store_true", help="profile the worker and the API with py-spy")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure the drain, submit and latency groups (with their scale rows) this many times, in"
        " rounds, and report the medians (ratios: the median of each round's ratio); profiles run once",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=GROUPS,
        help="run only this group of measurements (repeatable); the others are left out of the table",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    return Options(
        args.jobs,
        args.seconds,
        args.batch,
        args.rate,
        args.latency_seconds,
        args.scale,
        args.profile,
        args.output,
        args.json,
        frozenset(args.only or GROUPS),
        args.repeat,
    )


def main(argv: list[str]) -> int:
    options = parse(argv)
    wrk_path()  # fail at once, not after minutes, when a tool is missing
    run = BenchRun().open()
    m = Measurements()
    profiles: list[str] = []
    started = datetime.datetime.now(datetime.UTC)
    clock = time.monotonic()
    failed = False
    try:
        subjects = Subjects(run)
        failed = _phases(subjects, options, m, profiles)
        machine = report.machine(run.dsn)
    finally:
        run.close()
    minutes = (time.monotonic() - clock) / 60
    table = report.table(m, batch=options.batch, rate=options.rate, scale=options.scale)
    print(table)
    for note in m.notes:
        print(f"note: {note}", file=sys.stderr)
    body = _generated(options, argv, table, machine, started, minutes, m, profiles)
    report.write_document(options.output, body, TEMPLATE)
    if options.json:
        options.json.write_text(
            json.dumps(
                {
                    "rows": [key for key, _, _ in report.ROWS],
                    "values": m.values,
                    "samples": m.samples,
                    "notes": m.notes,
                },
                indent=2,
            )
        )
    print(f"written to {options.output}")
    return 1 if failed else 0


def measure_phase(
    run: BenchRun, m: Measurements, keys: list[str], measure: Callable[[], tuple[float, ...]]
) -> bool:
    """Measure one phase into ``m``; True if it failed. A failed phase's figures are errors (NaN) with
    a note, and the processes it started are stopped: left running, a worker takes the next phase's
    messages from its own queue (a raw dramatiq latency phase then waited in vain for its warm-up
    jobs)."""
    print(f"measuring {', '.join(keys)}", file=sys.stderr, flush=True)
    began = time.monotonic()
    running_before = list(run.procs)
    failed = False
    try:
        values = measure()
    except Exception as exc:
        failed = True
        m.notes.append(f"{', '.join(keys)} failed: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        values = tuple(math.nan for _ in keys)
        for proc in [p for p in run.procs if p not in running_before]:
            run.stop(proc)
    for key, value in zip(keys, values, strict=True):
        m.put(key, value)
    print(f"  {time.monotonic() - began:.1f}s", file=sys.stderr, flush=True)
    return failed


def _phases(subjects: Subjects, o: Options, m: Measurements, profiles: list[str]) -> bool:
    """Run every phase; a failed phase marks its figures as errors. Returns True if any failed."""
    failed = False

    def phase(keys: list[str], measure: Callable[[], tuple[float, ...]]) -> None:
        nonlocal failed
        failed = measure_phase(subjects.run, m, keys, measure) or failed

    for round_ in range(1, o.repeat + 1):
        if o.repeat > 1:
            print(f"round {round_} of {o.repeat}", file=sys.stderr, flush=True)
        _groups(subjects, o, m, phase)
    if o.only & {"submit", "latency"}:
        m.put("rss.api", m.peak_rss_mb.get("api", math.nan))
    if o.only & {"drain", "latency"}:
        m.put("rss.worker", m.peak_rss_mb.get("worker", math.nan))
    if o.profile:
        try:
            profiles.extend(profile.profile_conveyor(subjects, o.jobs, o.seconds))
        except Exception as exc:
            failed = True
            m.notes.append(f"profiling failed: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    return failed


Phase = Callable[[list[str], Callable[[], tuple[float, ...]]], None]


def _groups(subjects: Subjects, o: Options, m: Measurements, phase: Phase) -> None:
    """One round of the selected groups, each subject right after the one it is compared with."""

    def drain(measure: Callable[..., float], procs: int, threads: int) -> Callable[[], tuple[float, ...]]:
        return lambda: (measure(subjects, o.jobs, procs, threads, m),)

    for procs, threads in ((1, 8), (2, 8)) if "drain" in o.only else ():
        shape = f"{procs}x{threads}"
        phase([f"drain.dramatiq.{shape}"], drain(phases.drain_dramatiq, procs, threads))
        phase([f"drain.celery.{shape}"], drain(phases.drain_celery, procs, threads))
        phase([f"drain.conveyor.{shape}"], drain(phases.drain_conveyor, procs, threads))
    if "drain" in o.only and o.scale:
        phase(
            ["scale.drain.conveyor.2x8"],
            lambda: (phases.drain_conveyor(subjects, o.jobs, 2, 8, m, prefill=o.scale),),
        )
    if "submit" in o.only:
        phase(
            ["submit.single", "submit.batch", "submit.batch.c1"],
            lambda: phases.submit_conveyor(subjects, o.seconds, o.batch, m),
        )
        if o.scale:
            phase(
                ["scale.submit.single", "scale.submit.batch", "scale.submit.batch.c1"],
                lambda: phases.submit_conveyor(subjects, o.seconds, o.batch, m, prefill=o.scale),
            )
        phase(["poll.single"], lambda: (phases.poll_conveyor(subjects, o.seconds, m),))
        phase(["submit.minimal"], lambda: (phases.submit_minimal(subjects, o.seconds, m),))
        phase(["submit.flower"], lambda: (phases.submit_flower(subjects, o.seconds, m),))
    if "latency" in o.only:
        phase(
            ["latency.conveyor.p50", "latency.conveyor.p99"],
            lambda: phases.latency_conveyor(subjects, o.rate, o.latency_seconds, m),
        )
        phase(
            ["latency.dramatiq.p50", "latency.dramatiq.p99"],
            lambda: phases.latency_dramatiq(subjects, o.rate, o.latency_seconds, m),
        )


def _generated(
    o: Options,
    argv: list[str],
    table: str,
    machine: str,
    started: datetime.datetime,
    minutes: float,
    m: Measurements,
    profiles: list[str],
) -> str:
    command = "python -m bench " + shlex.join(argv) if argv else "python -m bench"
    notes = "\n".join(f"- {note}" for note in m.notes) or "- none"
    scale = "" if o.scale else "\nThe scale rows were not run (run them with `make bench SCALE=1`).\n"
    cpu_table = report.cpu_table(m, scale=o.scale)
    profile_text = "\n\n".join(profiles) if profiles else "Not profiled in this run (`make bench PROFILE=1`)."
    return f"""
## Results of the last run

- Date: {started:%Y-%m-%d %H:%M} UTC, {minutes:.1f} minutes
- Command: `{command}` ({o.jobs:,} jobs per drain, {o.seconds:g} s per HTTP measurement, batches of
  {o.batch}, latency at {o.rate:g} jobs/s for {o.latency_seconds:g} s)
{machine}

{table}
{scale}
### Where the CPU goes

CPU time per job or per request of the subject's own processes, of Postgres and of RabbitMQ, read
from the kernel between 10% and 90% of each drain and over each whole wrk run (`bench/cpu.py`). On
two cores, the sum bounds the rate at 2 x 8.

{cpu_table}

Notes of the run:
{notes}

### Profile of the run

{profile_text}
"""


TEMPLATE = """# Performance

How fast Conveyor submits and runs jobs, measured side by side with raw dramatiq, raw Celery (and
Flower) and a minimal Flask + Postgres endpoint, in one run on the same Postgres and RabbitMQ. The
targets are the ratios of [issue 8](https://example.invalid/issues/8); absolute figures drift on shared
machines, ratios from one run do not.

{generated}
"""
