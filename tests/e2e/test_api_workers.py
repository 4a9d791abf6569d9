"""Each gunicorn worker of the API listens on a socket of its own (``reuse_port`` in
api_service/gunicorn_conf.py), so that the kernel spreads new connections over the workers.

On one socket shared by all workers, whichever woke first took a whole burst of connections: one of two
workers often held every keep-alive connection of a client while the other idled. A second API on the
same address is still refused (tests/e2e/test_metrics.py starts one).
"""

from __future__ import annotations

import os
from pathlib import Path

from support import ServiceProcess, free_port, wait_for, wait_for_http

#: /proc/net/tcp's state of a listening socket.
LISTEN = "0A"


def listening_sockets(port: int) -> set[int]:
    """The inodes of the TCP sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                found.add(inode)
    return found


def sockets_of(pid: int) -> set[int]:
    """The inodes of the sockets process ``pid`` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_each_api_worker_listens_on_a_socket_of_its_own(service_env: dict[str, str]) -> None:
    port = free_port()
    env = {**service_env, "CONVEYOR_API_WORKERS": "2", "CONVEYOR_API_BIND": f"127.0.0.1:{port}"}
    api = ServiceProcess("api", env).start()
    try:
        wait_for_http(api, f"http://127.0.0.1:{port}/healthz", what="the API to answer /healthz")
        assert api.proc is not None
        master = api.proc.pid  # `conveyor api` execs gunicorn
        wait_for(lambda: len(listening_sockets(port)) >= 2, timeout=10, what="both workers to listen")
        workers = children_of(master)
        listeners = listening_sockets(port)
        assert len(workers) == 2
        assert len(listeners) == 2, "one socket per worker, not one shared by all"
        held = [sockets_of(worker) & listeners for worker in workers]
        assert all(len(mine) == 1 for mine in held)
        assert held[0] != held[1]
        assert not sockets_of(master) & listeners, "the master accepts nothing"
    finally:
        api.stop()
