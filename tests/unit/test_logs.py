"""The k8s-file log reader: partial lines, tail, since, lines still being written, following."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from berthd.common.timestamps import parse_rfc3339
from berthd.node.logs import LogRecord, follow_logs, read_logs

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def stamp(seconds: float) -> str:
    """conmon's format: nanoseconds and a numeric offset."""
    when = T0 + timedelta(seconds=seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123+00:00"


def line(seconds: float, stream: str, tag: str, text: str) -> bytes:
    return f"{stamp(seconds)} {stream} {tag} {text}\n".encode()


def write(path: Path, *lines: bytes) -> None:
    with open(path, "ab") as f:
        f.write(b"".join(lines))


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_parse_rfc3339_keeps_microseconds_of_nanoseconds() -> None:
    assert parse_rfc3339("2026-01-02T03:04:05.123456789+00:00") == T0.replace(microsecond=123456)
    assert parse_rfc3339("2026-01-02T03:04:05.5Z") == T0.replace(microsecond=500000)
    in_paris = parse_rfc3339("2026-01-02T05:04:05+02:00")
    assert in_paris == T0 and in_paris.tzinfo == UTC


def test_lines_keep_stream_and_get_their_newline_back(tmp_path: Path) -> None:
    log = tmp_path / "log"
    write(log, line(0, "stdout", "F", "hello"), line(1, "stderr", "F", "err"))
    write(log, line(2, "stdout", "F", ""), line(3, "stdout", "F", "two  spaces "))
    assert read_logs(log) == [
        LogRecord(at(0), "stdout", b"hello\n"),
        LogRecord(at(1), "stderr", b"err\n"),
        LogRecord(at(2), "stdout", b"\n"),
        LogRecord(at(3), "stdout", b"two  spaces \n"),
    ]


def test_partials_join_per_stream_with_the_first_time(tmp_path: Path) -> None:
    log = tmp_path / "log"
    write(
        log,
        line(0, "stdout", "P", "abc"),
        line(1, "stderr", "F", "interleaved"),  # another stream does not end stdout's line
        line(2, "stdout", "P", "def"),
        line(3, "stdout", "F", "ghi"),
    )
    assert read_logs(log) == [
        LogRecord(at(1), "stderr", b"interleaved\n"),
        LogRecord(at(0), "stdout", b"abcdefghi\n"),
    ]


def test_output_without_final_newline_is_kept(tmp_path: Path) -> None:
    log = tmp_path / "log"
    write(log, line(0, "stdout", "F", "done"), line(1, "stdout", "P", "no newline"))
    assert [r.data for r in read_logs(log)] == [b"done\n", b"no newline"]


def test_incomplete_trailing_line_is_not_read(tmp_path: Path) -> None:
    log = tmp_path / "log"
    write(log, line(0, "stdout", "F", "whole"), line(1, "stdout", "F", "half")[:-6])
    assert [r.data for r in read_logs(log)] == [b"whole\n"]


def test_tail_and_since(tmp_path: Path) -> None:
    log = tmp_path / "log"
    write(log, *(line(i, "stdout", "F", f"n{i}") for i in range(10)))
    assert [r.data for r in read_logs(log, tail=3)] == [b"n7\n", b"n8\n", b"n9\n"]
    assert [r.data for r in read_logs(log, since=at(8))] == [b"n8\n", b"n9\n"]  # inclusive
    naive = at(6).replace(tzinfo=None)  # naive means UTC
    assert [r.data for r in read_logs(log, tail=2, since=naive)] == [b"n8\n", b"n9\n"]
    assert len(read_logs(log, since=at(3), tail=0)) == 7


def test_missing_file_and_junk_lines(tmp_path: Path) -> None:
    assert read_logs(tmp_path / "absent") == []
    log = tmp_path / "log"
    write(log, b"garbage\n", b"not-a-time stdout F x\n", line(0, "stdin", "F", "?"))
    write(log, line(1, "stdout", "F", "ok"))
    assert [r.data for r in read_logs(log)] == [b"ok\n"]


async def collect(path: Path, stop, **kwargs) -> list[bytes]:
    return [r.data async for r in follow_logs(path, stop=stop, interval=0.01, **kwargs)]


async def test_follow_delivers_backlog_then_new_lines_until_stopped(tmp_path: Path) -> None:
    log = tmp_path / "log"  # created only after the follow starts
    done = False
    task = asyncio.create_task(collect(log, lambda: done))
    await asyncio.sleep(0.05)
    write(log, line(0, "stdout", "F", "first"), line(1, "stdout", "P", "par"))
    await asyncio.sleep(0.05)
    write(log, line(2, "stdout", "F", "tial"), line(3, "stderr", "F", "half")[:10])
    await asyncio.sleep(0.05)
    write(log, line(3, "stderr", "F", "half")[10:], line(4, "stdout", "F", "last"))
    done = True
    assert await asyncio.wait_for(task, 5) == [b"first\n", b"partial\n", b"half\n", b"last\n"]


async def test_follow_with_tail_and_since(tmp_path: Path) -> None:
    log = tmp_path / "log"
    write(log, *(line(i, "stdout", "F", f"n{i}") for i in range(5)))
    assert await collect(log, lambda: True, tail=2) == [b"n3\n", b"n4\n"]
    assert await collect(log, lambda: True, since=at(3)) == [b"n3\n", b"n4\n"]


async def test_follow_survives_rotation(tmp_path: Path) -> None:
    """conmon's --log-size-max renames a fresh file over the log."""
    log = tmp_path / "log"
    write(log, line(0, "stdout", "F", "old"))
    done = False
    task = asyncio.create_task(collect(log, lambda: done))
    await asyncio.sleep(0.05)
    fresh = tmp_path / "log.tmp"
    write(fresh, line(1, "stdout", "F", "new"))
    fresh.rename(log)
    await asyncio.sleep(0.05)
    done = True
    assert await asyncio.wait_for(task, 5) == [b"old\n", b"new\n"]
