"""Reading container logs that conmon writes in the CRI "k8s-file" format.

Each record is one line: `<RFC3339Nano time> <stdout|stderr> <F|P> <text>\\n`. conmon splits
output at newlines and at its buffer size; a `P` (partial) record continues in the next record
of the same stream, `F` ends a line. The newline the container wrote is not in the file: we put
it back, so `LogRecord.data` is exactly what the container wrote (a trailing record without a
newline is output that did not end with one).

The file is appended to while we read it: only complete lines (ending in `\\n`) are parsed.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from berthd.common.timestamps import parse_rfc3339

POLL_INTERVAL = 0.1
_READ_CHUNK = 1 << 20
STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class LogRecord:
    time: datetime  # when conmon read the (first part of the) line, UTC, microsecond precision
    stream: str  # "stdout" or "stderr"
    data: bytes  # the line with its "\n", or output that did not end with a newline


class _Parser:
    """Turns appended bytes into records: keeps an incomplete line and joins partials."""

    def __init__(self, since: datetime | None) -> None:
        self._since = _aware(since)
        self._rest = b""
        # Partials per stream: stdout and stderr lines can interleave mid-line.
        self._pending: dict[str, tuple[datetime, list[bytes]]] = {}

    def feed(self, chunk: bytes) -> list[LogRecord]:
        lines = (self._rest + chunk).split(b"\n")
        self._rest = lines.pop()  # b"" after a complete line, else a line still being written
        out: list[LogRecord] = []
        for line in lines:
            record = self._line(line)
            if record is not None and self._wanted(record):
                out.append(record)
        return out

    def flush(self) -> list[LogRecord]:
        """Partial lines nobody will complete (the container stopped mid-line)."""
        out = [LogRecord(t, s, b"".join(parts)) for s, (t, parts) in self._pending.items()]
        self._pending.clear()
        return [r for r in out if self._wanted(r)]

    def drop_incomplete(self) -> None:
        self._rest = b""

    def _line(self, line: bytes) -> LogRecord | None:
        fields = line.split(b" ", 3)
        if len(fields) < 3:
            return None  # not a k8s-file record: skip rather than fail the whole read
        stamp, stream_b, tag = fields[:3]
        text = fields[3] if len(fields) == 4 else b""
        stream = stream_b.decode("ascii", "replace")
        try:
            time = parse_rfc3339(stamp.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None
        if stream not in STREAMS:
            return None
        first_time, parts = self._pending.pop(stream, (time, []))
        parts.append(text)
        if tag.startswith(b"P"):
            self._pending[stream] = (first_time, parts)
            return None
        return LogRecord(first_time, stream, b"".join(parts) + b"\n")

    def _wanted(self, record: LogRecord) -> bool:
        return self._since is None or record.time >= self._since


def _aware(when: datetime | None) -> datetime | None:
    if when is not None and when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    return when


class _Reader:
    """Reads a log file as conmon appends to it, following conmon's rotation."""

    def __init__(self, path: Path, since: datetime | None) -> None:
        self._path = path
        self._parser = _Parser(since)
        self._file: BinaryIO | None = None

    def read_chunk(self) -> list[LogRecord] | None:
        """Records from the next chunk; [] when more may follow at once; None when at the end."""
        if self._file is None:
            try:
                self._file = open(self._path, "rb")  # noqa: SIM115 - kept open across calls
            except FileNotFoundError:
                return None  # conmon has not created it yet
        chunk = self._file.read(_READ_CHUNK)
        if chunk:
            return self._parser.feed(chunk)
        try:
            current = os.stat(self._path)
        except FileNotFoundError:
            return None
        opened = os.fstat(self._file.fileno())
        if (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
            # conmon's --log-size-max rotation renames a fresh file over the path.
            self.close()
            self._parser.drop_incomplete()
            return []
        if current.st_size < self._file.tell():  # truncated in place
            self._file.seek(0)
            self._parser.drop_incomplete()
            return []
        return None

    def flush(self) -> list[LogRecord]:
        return self._parser.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_logs(path: Path, tail: int = 0, since: datetime | None = None) -> list[LogRecord]:
    """Records of a k8s-file log, oldest first.

    `tail` > 0 keeps the last `tail` records (0: all); `since` keeps records at or after that
    time (naive datetimes are UTC). A missing file is an empty log (nothing written yet).
    """
    reader = _Reader(path, since)
    records: deque[LogRecord] = deque(maxlen=tail if tail > 0 else None)
    try:
        while (chunk := reader.read_chunk()) is not None:
            records.extend(chunk)
    finally:
        reader.close()
    records.extend(reader.flush())
    return list(records)


async def follow_logs(
    path: Path,
    since: datetime | None = None,
    stop: Callable[[], bool] = lambda: False,
    *,
    tail: int = 0,
    interval: float = POLL_INTERVAL,
) -> AsyncIterator[LogRecord]:
    """Existing records (at or after `since`, the last `tail` if > 0), then new ones as written.

    Polls every `interval` seconds. Once `stop()` returns true (e.g. the container's exit file
    exists), whatever is in the file by then is still delivered before the iterator ends, so a
    caller that stops when the container has exited misses nothing. File reads run in a thread:
    a long backlog does not stall the event loop.
    """
    reader = _Reader(path, since)
    try:
        if tail > 0:
            backlog: deque[LogRecord] = deque(maxlen=tail)
            while (chunk := await asyncio.to_thread(reader.read_chunk)) is not None:
                backlog.extend(chunk)
            for record in backlog:
                yield record
        while True:
            # Ask before reading: a stop seen now means all output is already in the file.
            stopping = stop()
            while (chunk := await asyncio.to_thread(reader.read_chunk)) is not None:
                for record in chunk:
                    yield record
            if stopping:
                for record in reader.flush():
                    yield record
                return
            await asyncio.sleep(interval)
    finally:
        reader.close()
