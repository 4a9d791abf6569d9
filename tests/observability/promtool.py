"""Running ``promtool``, Prometheus' own checker, from the tests.

CI installs it (``.ci/run``: ``apt-get install prometheus``) and these tests fail there without it; on a
developer's machine without it they skip and say how to get it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CI = os.environ.get("CI") == "true"
INSTALL_HINT = "apt-get install prometheus (Debian; .ci/run does it in CI)"


def promtool(*args: str, stdin: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``promtool <args>``, output captured; fails under CI=true (skips otherwise) if it is missing."""
    path = shutil.which("promtool")
    if path is None:
        if CI:
            pytest.fail(f"promtool is not installed: {INSTALL_HINT}", pytrace=False)
        pytest.skip(f"promtool is not installed: {INSTALL_HINT}")
    return subprocess.run(
        [path, *args], input=stdin, capture_output=True, text=True, cwd=cwd, timeout=60, check=False
    )


def promtool_version() -> str:
    return promtool("--version").stdout.splitlines()[0]
