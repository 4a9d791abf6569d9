"""The log handler: one JSON line per record, written whole."""

from __future__ import annotations

import io
import json
import logging
import os
import select
from collections.abc import Iterator

import pytest

from shared.logs import JsonFormatter, LineHandler


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read, write = os.pipe()
    yield read, write
    os.close(read)
    os.close(write)


def emit(handler: LineHandler, message: str, **extra: object) -> None:
    logger = logging.getLogger("tests.logs")
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, message, (), None, extra=extra)
    handler.handle(record)


def test_a_line_that_fits_in_pipe_buf_is_one_write_to_the_descriptor(pipe: tuple[int, int]) -> None:
    read, write = pipe
    fallback = io.StringIO()
    handler = LineHandler(fd=write, long_lines=fallback)
    handler.setFormatter(JsonFormatter())
    emit(handler, "attempt started", job_id="0f", attempt=1)
    data = os.read(read, 65536)
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    entry = json.loads(data)
    assert entry["message"] == "attempt started"
    assert entry["job_id"] == "0f"
    assert entry["attempt"] == 1
    assert fallback.getvalue() == ""


def test_a_longer_line_goes_whole_to_the_stream(pipe: tuple[int, int]) -> None:
    """A pipe may split a write longer than PIPE_BUF between other processes' lines; such a line
    goes through the stream, which dramatiq's worker processes forward whole."""
    read, write = pipe
    fallback = io.StringIO()
    handler = LineHandler(fd=write, long_lines=fallback)
    handler.setFormatter(JsonFormatter())
    emit(handler, "x" * select.PIPE_BUF)
    os.set_blocking(read, False)
    with pytest.raises(BlockingIOError):
        os.read(read, 1)  # nothing was written to the descriptor
    assert fallback.getvalue().endswith("\n")
    assert json.loads(fallback.getvalue())["message"] == "x" * select.PIPE_BUF
