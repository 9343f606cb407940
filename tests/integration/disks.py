"""Small real disks for the full-disk tests: a size-limited tmpfs mounted for one test."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def small_tmpfs(prefix: str, options: str) -> Iterator[Path]:
    """A tmpfs mounted with `options` ("size=16m", "size=16m,nr_inodes=400") on a new
    directory, unmounted and removed afterwards."""
    mount = Path(tempfile.mkdtemp(prefix=prefix))
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        mount.rmdir()
