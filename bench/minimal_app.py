"""The baseline HTTP subject: a minimal Flask endpoint that inserts one Postgres row per request.

It runs under the same gunicorn settings as Conveyor's API (workers, gthread threads, keep-alive,
access log) and keeps one connection per thread, so what it costs is Flask + one INSERT + one COMMIT.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import psycopg2
from flask import Flask, request

app = Flask(__name__)
_local = threading.local()


def _connection() -> Any:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = psycopg2.connect(os.environ["BENCH_DATABASE_URL"])
    return conn


@app.post("/rows")
def insert_row() -> tuple[dict[str, Any], int]:
    conn = _connection()
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO bench_rows (body) VALUES (%s) RETURNING id", (json.dumps(request.get_json()),)
        )
        row = cur.fetchone()
    conn.commit()
    return {"id": row[0]}, 201
