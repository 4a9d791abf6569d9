"""The directory where prometheus_client's multiprocess mode keeps the samples of a forking server
(gunicorn's workers, dramatiq's worker processes)."""

from __future__ import annotations

import os
import re
import tempfile

ENV = "PROMETHEUS_MULTIPROC_DIR"


def default_dir(kind: str, bind: str) -> str:
    """One directory per server and address, so two servers on one host never mix their samples."""
    return os.path.join(
        tempfile.gettempdir(), f"conveyor-{kind}-metrics-{re.sub(r'[^A-Za-z0-9.]', '-', bind)}"
    )


def prepare(path: str) -> None:
    """Create the directory and remove prometheus_client's files from it (nothing else), so no sample
    of a process from a previous run survives."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))
