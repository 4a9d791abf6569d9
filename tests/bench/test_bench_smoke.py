"""A smoke run of the benchmark harness (``make bench``) with tiny sizes, so it cannot rot.

It runs every phase against the real Postgres and RabbitMQ, in the harness's own database and queues,
and checks that the table is complete. It asserts nothing about speed: speed is measured by
``make bench``, never asserted in tests.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

#: What the harness needs besides Conveyor: wrk from the system, the rest from the `bench` extra.
TOOLS = {"wrk": "apt-get install -y wrk"}
MODULES = {"celery": "pip install -e '.[bench]'", "flower": "pip install -e '.[bench]'",
           "psutil": "pip install -e '.[bench]'"}  # fmt: skip
TINY = ["--jobs", "100", "--seconds", "1", "--batch", "10", "--rate", "50", "--latency-seconds", "1"]
#: The scale rows with a tiny prefill: the copied template database and the checkpoints run as in a full run.
SCALE = ["--scale", "300"]


def _require_tools() -> None:
    missing = [f"{tool} ({how})" for tool, how in TOOLS.items() if shutil.which(tool) is None]
    missing += [f"{mod} ({how})" for mod, how in MODULES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        message = "the benchmark needs: " + ", ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def test_tiny_benchmark_run_produces_a_complete_table(tmp_path: Path) -> None:
    _require_tools()
    output, figures = tmp_path / "performance.md", tmp_path / "figures.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    run = subprocess.run(
        [sys.executable, "-m", "bench", *TINY, *SCALE, "--output", str(output), "--json", str(figures)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-5000:]}"

    result = json.loads(figures.read_text())
    missing = [key for key in result["rows"] if not _is_number(result["values"].get(key))]
    assert not missing, f"figures missing or failed: {missing}; notes: {result['notes']}"
    # CPU per request is read over each whole wrk run, so it is there even at this size (a 100-job
    # drain may be over before its 10%-90% window can be read).
    measured = ("submit.single", "submit.batch", "poll.single", "submit.minimal", "submit.flower")
    cpu_keys = [f"cpu.{m}.{g}" for m in measured for g in ("subject", "postgres", "rabbitmq", "all")]
    assert all(_is_number(result["values"].get(key)) for key in cpu_keys), result["values"]
    assert result["values"]["cpu.submit.single.subject"] > 0
    assert result["values"]["cpu.submit.batch.postgres"] > 0

    document = output.read_text()
    assert "| measurement | value | unit |" in document
    assert "| target (issue 8) | this run | |" in document
    assert "error" not in document.split("| measurement |", 1)[1].split("Notes of the run", 1)[0]
    assert "nproc" in document
    assert "| CPU per job or request (us) |" in document
    assert "| POST /v1/jobs, Conveyor | request |" in document


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not math.isnan(value)
