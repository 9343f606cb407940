"""Crash-safe file writes, shared by the CLI (OCI layouts, downloads) and every service."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make a rename or link in `path` durable: fsync the directory itself."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file that appears at `path` only once complete, even after a crash: written beside it
    under a temporary name, fsynced, renamed, the directory fsynced. On any failure the
    temporary file goes and `path` keeps what it had (a broken save leaves no half archive)."""
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    try:
        out = open(tmp, "xb")  # noqa: SIM115 (closed below, before the rename)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None  # name the caller's file
    try:
        with out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes) -> None:
    """Write data to path so that readers see the old file or the whole new one."""
    with atomic_file(path) as out:
        out.write(data)
