"""File data kept in files rather than memory: slices of a spooled tar (the build context) or of
an append-only spool of copied data (archives and image layers, which cannot be read at random).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol

from berthd.common.errors import InvalidArgument

_COPY_CHUNK = 1024 * 1024


class Data(Protocol):
    """A regular file's content."""

    @property
    def size(self) -> int: ...

    def open(self) -> BinaryIO:
        """A fresh reader positioned at the first byte; the caller closes it."""
        ...

    def digest(self) -> str:
        """sha256 digest of the content."""
        ...


class SpoolSlice:
    """`size` bytes at `offset` of a file: a member's data in a tar, or data copied to a spool."""

    __slots__ = ("_digest", "offset", "path", "size")

    def __init__(self, path: Path, offset: int, size: int, digest: str | None = None) -> None:
        self.path = path
        self.offset = offset
        self.size = size
        self._digest = digest

    def open(self) -> BinaryIO:
        f = open(self.path, "rb")  # noqa: SIM115 - the returned reader closes it
        f.seek(self.offset)
        return _Bounded(f, self.size)  # type: ignore[return-value]

    def digest(self) -> str:
        if self._digest is None:
            h = hashlib.sha256()
            with self.open() as f:
                while chunk := f.read(_COPY_CHUNK):
                    h.update(chunk)
            self._digest = f"sha256:{h.hexdigest()}"
        return self._digest


class _Bounded(io.RawIOBase):
    """Reads at most `size` bytes of `file` from where it is positioned."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        self._file = file
        self._start = file.tell()
        self._size = size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._file.tell() - self._start

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.tell(), os.SEEK_END: self._size}[whence]
        position = min(max(base + offset, 0), self._size)
        self._file.seek(self._start + position)
        return position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer)[: max(self._size - self.tell(), 0)]
        return self._file.readinto(view) if len(view) else 0

    def close(self) -> None:
        self._file.close()
        super().close()


class Spool:
    """An append-only temporary file holding copies of file data (from archives or layers,
    which cannot be read at random); `close` deletes it."""

    def __init__(self, scratch: Path | None, prefix: str) -> None:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=scratch)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._end = 0

    def add(self, stream: BinaryIO, size: int, what: str) -> SpoolSlice:
        """Copy `size` bytes of `stream`; a shorter stream is InvalidArgument naming `what`."""
        h = hashlib.sha256()
        left = size
        while left:
            chunk = stream.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise InvalidArgument(f"{what}: unexpected end of data")
            h.update(chunk)
            self._file.write(chunk)
            left -= len(chunk)
        self._file.flush()  # readers open the path on their own
        data = SpoolSlice(self.path, self._end, size, f"sha256:{h.hexdigest()}")
        self._end += size
        return data

    def close(self) -> None:
        # Closing flushes, which raises again on a full disk: moot for a file deleted next
        # (the fd is closed either way), and it must not keep the other cleanups from running.
        with contextlib.suppress(OSError):
            self._file.close()
        self.path.unlink(missing_ok=True)
