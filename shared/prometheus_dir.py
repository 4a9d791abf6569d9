"""The directory where prometheus_client's multiprocess mode keeps the samples of a forking server
(gunicorn's workers, dramatiq's worker processes)."""

from __future__ import annotations

import os
import re
import socket
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


def port_free(bind: str) -> bool:
    """Whether ``host:port`` can be listened on now (another server may hold it)."""
    host, _, port = bind.rpartition(":")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host or "0.0.0.0", int(port)))  # noqa: S104 - only probing
        except OSError:
            return False
    return True
