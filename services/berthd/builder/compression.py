"""Recognise compressed streams by their first bytes and decompress them, as Docker does for
build contexts, `ADD` archives and layers: gzip, bzip2 and xz (zstd is recognised, to be
refused with a clear message). Corrupt data surfaces as InvalidArgument naming what was read.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable
from typing import BinaryIO, cast

from isal import igzip, igzip_lib

from berthd.common.errors import InvalidArgument

# Enough to tell every format apart (xz's magic is the longest).
MAGIC_BYTES = 6
_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}
_OPENERS: dict[str, Callable[[BinaryIO], BinaryIO]] = {
    # ISA-L inflates gzip several times faster than zlib (see HOST-NOTES).
    "gzip": lambda f: cast(BinaryIO, igzip.IGzipFile(fileobj=f, mode="rb")),
    "bzip2": lambda f: cast(BinaryIO, bz2.BZ2File(f, mode="rb")),
    "xz": lambda f: cast(BinaryIO, lzma.LZMAFile(f, mode="rb")),  # noqa: SIM115 - returned
}
# Compressions `decompressed` reads ("none" included).
READABLE = frozenset({"none", *_OPENERS})
_ERRORS = (
    EOFError,
    OSError,  # BadGzipFile and bz2's "Invalid data stream" are OSErrors
    igzip_lib.IsalError,
    lzma.LZMAError,
    zlib.error,
)


def sniff(head: bytes) -> str:
    """The compression of a stream starting with `head`: gzip, bzip2, xz, zstd or "none"."""
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return name
    return "none"


def peek(source: BinaryIO) -> str:
    """The compression of a seekable stream from where it is positioned (which is kept)."""
    head = source.read(MAGIC_BYTES)
    source.seek(-len(head), 1)
    return sniff(head)


def decompressed(source: BinaryIO, what: str) -> BinaryIO:
    """`source` (seekable) read through its decompressor, if any; `what` names it in errors.

    The returned stream owns `source`: closing it closes both.
    """
    kind = peek(source)
    if kind == "none":
        return source
    if kind not in _OPENERS:
        source.close()
        raise InvalidArgument(f"{what} is {kind}-compressed, which is not supported")
    return cast(BinaryIO, _Decompressed(_OPENERS[kind](source), source, what, kind))


class _Decompressed:
    """A decompressing reader that reports corrupt input as InvalidArgument."""

    def __init__(self, stream: BinaryIO, source: BinaryIO, what: str, kind: str) -> None:
        self._stream = stream
        self._source = source
        self._what = what
        self._kind = kind

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except _ERRORS as e:
            raise InvalidArgument(f"{self._what} is not valid {self._kind} data: {e}") from e

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._source.close()

    def __enter__(self) -> _Decompressed:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
