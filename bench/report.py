"""The table, the targets of issue 8 as ratios of the same run, and docs/performance.md."""

from __future__ import annotations

import math
import os
import platform
import statistics
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bench import cpu
from bench.phases import Measurements
from bench.services import rabbitmq_version, scalar

#: (key, what, unit) of every row of the table, in order.
ROWS: list[tuple[str, str, str]] = [
    ("drain.dramatiq.1x8", "drain, raw dramatiq, 1 process x 8 threads", "jobs/s"),
    ("drain.celery.1x8", "drain, raw Celery (threads pool), 1 x 8", "jobs/s"),
    ("drain.conveyor.1x8", "drain, Conveyor, 1 x 8", "jobs/s"),
    ("drain.dramatiq.2x8", "drain, raw dramatiq, 2 x 8", "jobs/s"),
    ("drain.celery.2x8", "drain, raw Celery (threads pool), 2 x 8", "jobs/s"),
    ("drain.conveyor.2x8", "drain, Conveyor, 2 x 8", "jobs/s"),
    ("submit.single", "submit, Conveyor POST /v1/jobs (Idempotency-Key)", "jobs/s"),
    ("submit.batch", "submit, Conveyor POST /v1/jobs/batch ({batch} per request)", "jobs/s"),
    ("submit.batch.c1", "submit, Conveyor POST /v1/jobs/batch ({batch} per request), 1 connection", "jobs/s"),
    ("poll.single", "poll, Conveyor GET /v1/jobs/{{id}} (no target)", "requests/s"),
    ("submit.minimal", "submit, minimal Flask + one Postgres INSERT", "requests/s"),
    ("submit.flower", "submit, Flower POST /api/task/async-apply", "requests/s"),
    ("latency.conveyor.p50", "enqueue-to-start p50, Conveyor at {rate:.0f} jobs/s", "ms"),
    ("latency.conveyor.p99", "enqueue-to-start p99, Conveyor at {rate:.0f} jobs/s", "ms"),
    ("latency.dramatiq.p50", "enqueue-to-start p50, raw dramatiq at {rate:.0f} jobs/s", "ms"),
    ("latency.dramatiq.p99", "enqueue-to-start p99, raw dramatiq at {rate:.0f} jobs/s", "ms"),
    ("rss.api", "peak RSS of an API process (gunicorn)", "MB"),
    ("rss.worker", "peak RSS of a worker process (dramatiq)", "MB"),
    ("scale.submit.single", "with {scale:,} finished jobs: POST /v1/jobs", "jobs/s"),
    ("scale.submit.batch", "with {scale:,} finished jobs: POST /v1/jobs/batch", "jobs/s"),
    ("scale.submit.batch.c1", "with {scale:,} finished jobs: POST /v1/jobs/batch, 1 connection", "jobs/s"),
    ("scale.drain.conveyor.2x8", "with {scale:,} finished jobs: drain, Conveyor, 2 x 8", "jobs/s"),
]
SCALE_KEYS = {key for key, _, _ in ROWS if key.startswith("scale.")}

#: (measurement key, what, per what) of the CPU table (``bench/cpu.py``), in order.
CPU_ROWS: list[tuple[str, str, str]] = [
    ("drain.dramatiq.1x8", "drain 1 x 8, raw dramatiq", "job"),
    ("drain.celery.1x8", "drain 1 x 8, raw Celery", "job"),
    ("drain.conveyor.1x8", "drain 1 x 8, Conveyor", "job"),
    ("drain.dramatiq.2x8", "drain 2 x 8, raw dramatiq", "job"),
    ("drain.celery.2x8", "drain 2 x 8, raw Celery", "job"),
    ("drain.conveyor.2x8", "drain 2 x 8, Conveyor", "job"),
    ("scale.drain.conveyor.2x8", "drain 2 x 8, Conveyor, {scale:,} finished jobs", "job"),
    ("submit.single", "POST /v1/jobs, Conveyor", "request"),
    ("scale.submit.single", "POST /v1/jobs, Conveyor, {scale:,} finished jobs", "request"),
    ("submit.batch", "POST /v1/jobs/batch, Conveyor", "job"),
    ("scale.submit.batch", "POST /v1/jobs/batch, Conveyor, {scale:,} finished jobs", "job"),
    ("poll.single", "GET /v1/jobs/{{id}}, Conveyor", "request"),
    ("submit.minimal", "minimal Flask + one INSERT", "request"),
    ("submit.flower", "Flower async-apply", "request"),
]
#: The groups of ``bench/cpu.py`` and their sum (``phases.put_cpu`` records each).
CPU_COLUMNS = (*cpu.GROUPS, "all")


@dataclass(frozen=True)
class Target:
    what: str
    numerator: str
    denominator: str | None  # None: compare the figure itself
    bound: float
    at_least: bool  # True: figure >= bound; False: figure <= bound


TARGETS = [
    Target("worker drain 1x8 >= 0.5 x raw dramatiq", "drain.conveyor.1x8", "drain.dramatiq.1x8", 0.5, True),
    Target("worker drain 1x8 >= 1.2 x raw Celery", "drain.conveyor.1x8", "drain.celery.1x8", 1.2, True),
    Target("worker drain 2x8 >= 0.5 x raw dramatiq", "drain.conveyor.2x8", "drain.dramatiq.2x8", 0.5, True),
    Target("worker drain 2x8 >= 1.2 x raw Celery", "drain.conveyor.2x8", "drain.celery.2x8", 1.2, True),
    Target("single submit >= 0.6 x minimal Flask+Postgres", "submit.single", "submit.minimal", 0.6, True),
    Target("single submit >= 0.7 x Flower async-apply", "submit.single", "submit.flower", 0.7, True),
    Target("batch submit >= 5 x single submit", "submit.batch", "submit.single", 5.0, True),
    Target("batch submit, 1 connection >= 5 x single submit", "submit.batch.c1", "submit.single", 5.0, True),
    Target("enqueue-to-start p99 <= 25 ms at 200 jobs/s", "latency.conveyor.p99", None, 25.0, False),
    Target(
        "with 1M finished jobs: single submit >= 0.8 x empty",
        "scale.submit.single",
        "submit.single",
        0.8,
        True,
    ),
    Target(
        "with 1M finished jobs: batch submit >= 0.8 x empty", "scale.submit.batch", "submit.batch", 0.8, True
    ),
    Target(
        "with 1M finished jobs: batch submit, 1 connection >= 0.8 x empty",
        "scale.submit.batch.c1",
        "submit.batch.c1",
        0.8,
        True,
    ),
    Target(
        "with 1M finished jobs: drain 2x8 >= 0.8 x empty",
        "scale.drain.conveyor.2x8",
        "drain.conveyor.2x8",
        0.8,
        True,
    ),
    Target("peak RSS per worker process <= 150 MB", "rss.worker", None, 150.0, False),
    Target("peak RSS per API worker <= 120 MB", "rss.api", None, 120.0, False),
]

BEGIN, END = (
    "<!-- bench:begin (written by `make bench`; edit outside these markers) -->",
    "<!-- bench:end -->",
)


def _fmt(value: float | None) -> str:
    if value is None:
        return "not run"
    if math.isnan(value):
        return "error"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _ratio(m: Measurements, numerator: str, denominator: str) -> float | None:
    """The ratio of two figures: the median of the per-round ratios when both were measured in the same
    rounds (each pair ran minutes apart at most, so a machine that speeds up or slows down during the
    run moves both), else the ratio of their medians."""
    tops, bottoms = m.samples.get(numerator, []), m.samples.get(denominator, [])
    pairs = [(t, b) for t, b in zip(tops, bottoms, strict=False) if b and not math.isnan(t + b)]
    if len(tops) == len(bottoms) > 1 and pairs:
        return statistics.median(t / b for t, b in pairs)
    return None


def _spread(samples: list[float]) -> str:
    """ " (low-high of N)" for a figure measured in several rounds."""
    measured = [v for v in samples if not math.isnan(v)]
    if len(measured) < 2:
        return ""
    return f" ({_fmt(min(measured))}-{_fmt(max(measured))} in {len(measured)})"


def target_rows(m: Measurements) -> list[tuple[str, str, str]]:
    """(target, measured, met / not met / not run) for each target."""
    rows = []
    for target in TARGETS:
        top = m.values.get(target.numerator)
        bottom = m.values.get(target.denominator) if target.denominator else 1.0
        paired = _ratio(m, target.numerator, target.denominator) if target.denominator else None
        if paired is not None:
            met = paired >= target.bound if target.at_least else paired <= target.bound
            rows.append((target.what, f"{paired:.2f} x", "met" if met else "**not met**"))
            continue
        if top is None or bottom is None:
            rows.append((target.what, "not run", "not run"))
            continue
        if math.isnan(top) or math.isnan(bottom):
            rows.append((target.what, "error", "error"))
            continue
        if not bottom:
            rows.append((target.what, f"n/a ({target.denominator} is 0)", "n/a"))
            continue
        figure = top / bottom
        met = figure >= target.bound if target.at_least else figure <= target.bound
        shown = f"{figure:.2f} x" if target.denominator else _fmt(figure)
        rows.append((target.what, shown, "met" if met else "**not met**"))
    return rows


def table(m: Measurements, *, batch: int, rate: float, scale: int) -> str:
    lines = ["| measurement | value | unit |", "|---|---:|---|"]
    for key, what, unit in ROWS:
        label = what.format(batch=batch, rate=rate, scale=scale or 1_000_000)
        lines.append(f"| {label} | {_fmt(m.values.get(key))}{_spread(m.samples.get(key, []))} | {unit} |")
    lines += ["", "| target (issue 8) | this run | |", "|---|---:|---|"]
    lines += [f"| {what} | {shown} | {verdict} |" for what, shown, verdict in target_rows(m)]
    return "\n".join(lines)


def cpu_table(m: Measurements, *, scale: int) -> str:
    """CPU time per job (drains) or per request (submissions), in microseconds, of the subject's own
    processes, of Postgres and of RabbitMQ; only the measurements this run made."""
    lines = [
        "| CPU per job or request (us) | per | subject's processes | Postgres | RabbitMQ | all three |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for key, what, per in CPU_ROWS:
        cells = [m.values.get(f"cpu.{key}.{column}") for column in CPU_COLUMNS]
        if all(cell is None for cell in cells):
            continue
        label = what.format(scale=scale or 1_000_000)
        lines.append(f"| {label} | {per} | " + " | ".join(_fmt(cell) for cell in cells) + " |")
    if len(lines) == 2:
        return "No CPU figures were read in this run."
    return "\n".join(lines)


def machine(dsn: str) -> str:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    ram_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in ("dramatiq", "pika", "celery", "flower", "flask", "gunicorn", "psycopg2-binary")
    )
    return "\n".join(
        [
            f"- CPU: {os.cpu_count()} cores (nproc), {cpu}",
            f"- RAM: {ram_kb / 1024 / 1024:.1f} GiB",
            f"- Python {platform.python_version()} on {platform.platform()}",
            f"- Postgres {scalar(dsn, 'SHOW server_version')}, RabbitMQ {rabbitmq_version()}",
            f"- {versions}",
        ]
    )


def generated_section(body: str) -> str:
    return f"{BEGIN}\n{body.strip()}\n{END}"


def write_document(path: Path, body: str, template: str) -> None:
    """Replace the generated section of ``path``, or write ``template`` with it if there is none."""
    section = generated_section(body)
    if path.exists() and BEGIN in (text := path.read_text()) and END in text:
        head, rest = text.split(BEGIN, 1)
        path.write_text(head + section + rest.split(END, 1)[1])
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.replace("{generated}", section))
