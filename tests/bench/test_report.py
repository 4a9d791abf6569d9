"""The benchmark's arithmetic (no services): medians of repeated rounds and the ratios of issue 8."""

from __future__ import annotations

import math

import pytest

from bench import report
from bench.phases import Measurements
from bench.run import parse


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
