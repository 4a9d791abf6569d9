"""Worker heartbeat files and the freshness check behind `conveyor worker-alive` (shared/heartbeat.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared import heartbeat
from shared.cli import build_parser
from shared.settings import Settings

NOW = 1_800_000_000.0


def write(base: Path, pid: int, age: float) -> None:
    path = heartbeat.path_for(str(base), pid)
    path.touch()
    os.utime(path, (NOW - age, NOW - age))


def check(
    base: Path, *, max_age: float = 30, expected: int = 2, dead: frozenset[int] = frozenset()
) -> heartbeat.Verdict:
    return heartbeat.check(
        str(base), max_age=max_age, expected_processes=expected, now=NOW, exists=lambda pid: pid not in dead
    )


def test_fresh_files_of_every_process_pass(tmp_path: Path) -> None:
    base = tmp_path / "hb"
    write(base, 11, age=2)
    write(base, 12, age=9)
    verdict = check(base)
    assert verdict.alive
    assert "2 worker process(es) alive" in verdict.message


def test_one_stale_process_fails_even_if_another_is_fresh(tmp_path: Path) -> None:
    base = tmp_path / "hb"
    write(base, 11, age=2)
    write(base, 12, age=95)
    verdict = check(base)
    assert not verdict.alive
    assert "pid 12 95s ago" in verdict.message
    assert "pid 11" not in verdict.message


def test_no_heartbeat_file_fails(tmp_path: Path) -> None:
    verdict = check(tmp_path / "hb")
    assert not verdict.alive
    assert "0 of 2 worker processes" in verdict.message


def test_fewer_files_than_worker_processes_fails(tmp_path: Path) -> None:
    base = tmp_path / "hb"
    write(base, 11, age=1)
    verdict = check(base, expected=2)
    assert not verdict.alive
    assert "1 of 2" in verdict.message


def test_files_of_processes_that_no_longer_exist_are_ignored(tmp_path: Path) -> None:
    base = tmp_path / "hb"
    write(base, 11, age=1)
    write(base, 12, age=1)
    write(base, 99, age=5000)  # a process that exited without removing its file
    assert check(base, dead=frozenset({99})).alive


def test_unrelated_files_in_the_directory_are_ignored(tmp_path: Path) -> None:
    base = tmp_path / "hb"
    write(base, 11, age=1)
    (tmp_path / "hb.old").touch()
    (tmp_path / "hb.12.tmp").touch()
    (tmp_path / "other.13").touch()
    assert set(heartbeat.heartbeats(str(base))) == {11}


def test_beat_and_remove_manage_this_processs_file(tmp_path: Path) -> None:
    base = str(tmp_path / "hb")
    heartbeat.beat(base)
    assert set(heartbeat.heartbeats(base)) == {os.getpid()}
    heartbeat.remove(base)
    assert heartbeat.heartbeats(base) == {}


def test_clear_removes_every_heartbeat_file(tmp_path: Path) -> None:
    base = tmp_path / "hb"
    write(base, 11, age=1)
    write(base, 12, age=1)
    heartbeat.clear(str(base))
    assert heartbeat.heartbeats(str(base)) == {}


def test_a_missing_directory_means_no_heartbeat(tmp_path: Path) -> None:
    assert heartbeat.heartbeats(str(tmp_path / "nowhere" / "hb")) == {}


def test_this_process_exists_and_an_impossible_pid_does_not() -> None:
    assert heartbeat.process_exists(os.getpid())
    assert not heartbeat.process_exists(2**31 - 1)


def alive(settings: Settings, *argv: str) -> int:
    parser = build_parser()
    args = parser.parse_args(["worker-alive", *argv])
    return int(args.handler(settings, args))


def test_worker_alive_command_exits_0_when_fresh_and_1_when_stale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = str(tmp_path / "hb")
    settings = Settings(worker_heartbeat_file=base, worker_processes=1)
    heartbeat.beat(base)  # this test process stands in for the one worker process
    assert alive(settings, "--max-age", "30") == 0
    assert "1 worker process(es) alive" in capsys.readouterr().out
    path = heartbeat.path_for(base, os.getpid())
    old = path.stat().st_mtime - 120
    os.utime(path, (old, old))
    assert alive(settings, "--max-age", "30") == 1
    assert "stopped beating" in capsys.readouterr().err


def test_worker_alive_expects_every_configured_worker_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = str(tmp_path / "hb")
    heartbeat.beat(base)
    assert alive(Settings(worker_heartbeat_file=base, worker_processes=2), "--max-age", "30") == 1
    assert "1 of 2 worker processes" in capsys.readouterr().err
    assert (
        alive(Settings(worker_heartbeat_file=base, worker_processes=2), "--max-age", "30", "--processes", "1")
        == 0
    )


def test_worker_alive_command_fails_clearly_without_a_heartbeat_setting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert alive(Settings(worker_heartbeat_file=""), "--max-age", "30") == 1
    assert "CONVEYOR_WORKER_HEARTBEAT_FILE is not set" in capsys.readouterr().err


def test_worker_alive_refuses_a_max_age_of_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["worker-alive", "--max-age", "0"])
    assert exited.value.code == 2
    assert "must be a number of seconds above 0" in capsys.readouterr().err
