"""The benchmark's arithmetic and bookkeeping (no services): medians of repeated rounds, the ratios of
issue 8, the CPU per job or request, the raw tasks' stamps, and what a failed phase leaves behind."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import cpu, report, stamps
from bench.phases import Measurements, put_cpu
from bench.run import measure_phase, parse
from bench.services import BenchRun, Proc


def test_a_figure_measured_in_rounds_is_their_median_and_a_failed_round_is_left_out() -> None:
    m = Measurements()
    for value in (300.0, math.nan, 100.0, 200.0):
        m.put("submit.single", value)
    assert m.values["submit.single"] == 200.0
    assert m.samples["submit.single"][1] != m.samples["submit.single"][1], "the failed round is kept as NaN"
    m.put("submit.flower", math.nan)
    assert math.isnan(m.values["submit.flower"] or 0.0), "every round failed: an error"


def test_ratios_of_repeated_figures_pair_the_rounds() -> None:
    m = Measurements()
    # The machine slows down by half after the first round: the rounds' ratios are 0.5, 0.5 and 0.58,
    # while the medians of the figures (300 and 520) would give 0.58.
    for single, minimal in ((500.0, 1000.0), (250.0, 500.0), (300.0, 520.0)):
        m.put("submit.single", single)
        m.put("submit.minimal", minimal)
    assert (m.values["submit.single"], m.values["submit.minimal"]) == (300.0, 520.0)
    row = next(r for r in report.target_rows(m) if r[0].startswith("single submit >= 0.6 x minimal"))
    assert row == ("single submit >= 0.6 x minimal Flask+Postgres", "0.50 x", "**not met**")


def test_one_round_is_shown_as_before_and_several_with_their_spread() -> None:
    m = Measurements()
    m.put("drain.dramatiq.1x8", 2000.0)
    for value in (1000.0, 1200.0, 1100.0):
        m.put("drain.conveyor.1x8", value)
    table = report.table(m, batch=100, rate=200, scale=0)
    assert "| drain, raw dramatiq, 1 process x 8 threads | 2,000 | jobs/s |" in table
    assert "| drain, Conveyor, 1 x 8 | 1,100 (1,000-1,200 in 3) | jobs/s |" in table
    assert "| worker drain 1x8 >= 0.5 x raw dramatiq | 0.55 x | met |" in table


def test_repeat_must_be_at_least_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse(["--repeat", "3"]).repeat == 3
    with pytest.raises(SystemExit) as exit_:
        parse(["--repeat", "0"])
    assert exit_.value.code == 2
    assert "--repeat must be at least 1" in capsys.readouterr().err


def test_a_drain_window_counts_cpu_between_a_tenth_and_nine_tenths_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    used = {"subject": 1.0, "postgres": 10.0, "rabbitmq": 100.0}

    def fake_read(pids: list[int], done: int) -> cpu.Reading:
        # Every job costs 100 us in the subject, 200 us in Postgres and 50 us in RabbitMQ.
        return cpu.Reading(
            done,
            {
                "subject": used["subject"] + done * 100e-6,
                "postgres": used["postgres"] + done * 200e-6,
                "rabbitmq": used["rabbitmq"] + done * 50e-6,
            },
        )

    monkeypatch.setattr(cpu, "read", fake_read)
    window = cpu.DrainWindow([1], total=1000)
    for done in (0, 50, 120, 500, 950, 1000):  # first reading at 120, last at 950
        window.observe(done)
    assert (window.first and window.first.done, window.last and window.last.done) == (120, 950)
    assert window.per_job() == pytest.approx({"subject": 100.0, "postgres": 200.0, "rabbitmq": 50.0})


def test_a_drain_too_quick_to_window_has_no_cpu_figure_and_says_so() -> None:
    window = cpu.DrainWindow([], total=100)
    window.observe(100)  # seen only once it was over
    assert window.per_job() is None
    m = Measurements()
    put_cpu(m, "drain.dramatiq.2x8", window.per_job())
    assert not any(key.startswith("cpu.") for key in m.values)
    assert m.notes == ["drain.dramatiq.2x8: too quick to read its CPU between 10% and 90% done"]


def test_cpu_table_shows_the_measured_rows_with_their_sum() -> None:
    m = Measurements()
    put_cpu(m, "drain.conveyor.2x8", {"subject": 270.0, "postgres": 230.0, "rabbitmq": 110.0})
    put_cpu(m, "submit.single", {"subject": 1600.0, "postgres": 750.0, "rabbitmq": 350.0})
    table = report.cpu_table(m, scale=0)
    assert "| drain 2 x 8, Conveyor | job | 270 | 230 | 110 | 610 |" in table
    assert "| POST /v1/jobs, Conveyor | request | 1,600 | 750 | 350 | 2,700 |" in table
    assert "raw dramatiq" not in table, "rows that were not measured are left out"
    assert report.cpu_table(Measurements(), scale=0) == "No CPU figures were read in this run."


def test_a_stamp_line_still_being_written_is_not_read_yet(tmp_path: Path) -> None:
    """The harness reads the raw tasks' stamps while they write: a torn last line failed a whole
    drain (ValueError: not enough values to unpack)."""
    (tmp_path / "1.stamps").write_text("1764430000.100000 0.001000\n1764430000.200000 0.002000\n1764430000.3")
    assert stamps.read(tmp_path) == [(1764430000.1, 0.001), (1764430000.2, 0.002)]
    with (tmp_path / "1.stamps").open("a") as rest:
        rest.write("00000 0.003000\n")
    assert len(stamps.read(tmp_path)) == 3


def test_a_failed_phase_stops_the_processes_it_started_and_only_those(tmp_path: Path) -> None:
    run = BenchRun()
    run.dir = tmp_path
    earlier = run.start("earlier", ["sleep", "60"], {})
    started: list[Proc] = []

    def measure() -> tuple[float, ...]:
        started.append(run.start("worker", ["sleep", "60"], {}))
        raise TimeoutError("timed out waiting for 20 jobs to run")

    m = Measurements()
    try:
        assert measure_phase(run, m, ["latency.dramatiq.p50", "latency.dramatiq.p99"], measure) is True
        assert started[0].popen is not None
        assert started[0].popen.poll() is not None, "the failed phase's worker still runs"
        assert earlier.popen is not None
        assert earlier.popen.poll() is None, "a process of an earlier phase was stopped"
        assert run.procs == [earlier]
        assert math.isnan(m.values["latency.dramatiq.p99"] or 0.0)
        assert m.notes == ["latency.dramatiq.p50, latency.dramatiq.p99 failed: TimeoutError: timed out "
                           "waiting for 20 jobs to run"]  # fmt: skip
    finally:
        for proc in list(run.procs):
            run.stop(proc)
