"""The build context: the tar a client streams with a build (plain, gzip, bzip2 or xz), spooled
to one uncompressed file in the builder's scratch directory and indexed in memory. File data is
read from the spool when a COPY/ADD step needs it.

As in Docker, the context's owners mean nothing (copied files are root's unless `--chown` says
otherwise) and its modes and modification times are kept. Members with absolute names or `..`
are refused: a context is a tree of relative paths.
"""

from __future__ import annotations

import asyncio
import os
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from berthd.common.errors import InvalidArgument, ResourceExhausted
from berthd.common.oci.digest import quoted
from berthd.common.streaming import spool_upload

from .compression import decompressed, peek
from .fstree import Tree, add_member, clean_parts, escapes, member_parts
from .sources import SourceMatch, match_sources, sources_digest
from .spool import SpoolSlice

__all__ = ["BuildContext", "SourceMatch", "sources_digest"]

_WHAT = "build context"
_CHUNK = 1024 * 1024


class BuildContext:
    """The context tar the client streamed, spooled to a file and indexed."""

    def __init__(self, tree: Tree, spool: Path, size: int) -> None:
        self.tree = tree
        self.size = size  # bytes of the uncompressed tar
        self._spool = spool

    @property
    def files(self) -> int:
        """Entries in the context (directories included)."""
        return self.tree.count

    @classmethod
    async def receive(
        cls, chunks: AsyncIterator[bytes], scratch: Path, max_bytes: int
    ) -> BuildContext:
        """Spool the streamed context and index it. ResourceExhausted past `max_bytes` (of the
        stream, or of the tar once decompressed); InvalidArgument for a malformed or hostile
        tar. No bytes at all is an empty context."""
        fd, name = tempfile.mkstemp(prefix="context-", suffix=".tar", dir=scratch)
        os.close(fd)
        path = Path(name)
        try:
            await spool_upload(chunks, path, max_bytes, str(_too_large(max_bytes)))
            return await asyncio.to_thread(cls.from_file, path, max_bytes)
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    @classmethod
    def from_file(cls, path: Path, max_bytes: int) -> BuildContext:
        """Index the context tar at `path`, which the context then owns (`close` deletes it).
        A compressed tar is replaced by its uncompressed form next to it."""
        try:
            plain = _decompress(path, max_bytes)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        try:
            tree = _index(plain)
        except BaseException:
            plain.unlink(missing_ok=True)
            raise
        return cls(tree, plain, plain.stat().st_size)

    def read_text(self, path: str) -> str | None:
        """The text of the regular file at `path` (e.g. the Dockerfile), None if there is none."""
        if escapes(path.lstrip("/")):
            return None
        try:
            _, node = self.tree.resolve(clean_parts(path))
        except NotADirectoryError:
            return None
        if node is None or node.entry.data is None:
            return None
        with node.entry.data.open() as f:
            content = f.read()
        try:
            return content.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidArgument(
                f"{quoted(path)} in the build context is not UTF-8 text (byte {e.start})"
            ) from None

    def match(self, sources: list[str], line: int, instruction: str = "COPY") -> list[SourceMatch]:
        """What COPY/ADD `sources` name in the context; see berthd.builder.sources."""
        return match_sources(self.tree, sources, line, instruction, _WHAT)

    def close(self) -> None:
        """Delete the spooled tar."""
        self._spool.unlink(missing_ok=True)

    def __enter__(self) -> BuildContext:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _too_large(max_bytes: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"the build context is larger than the limit of {max_bytes} bytes; "
        "leave files out with .dockerignore"
    )


def _decompress(path: Path, max_bytes: int) -> Path:
    """The uncompressed tar of the context at `path`: `path` itself if it is not compressed."""
    with open(path, "rb") as f:
        if peek(f) == "none":
            return path
    plain = path.with_name(path.name + ".plain")
    with decompressed(open(path, "rb"), _WHAT) as source:
        try:
            size = 0
            with open(plain, "wb") as out:
                while chunk := source.read(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise _too_large(max_bytes)
                    out.write(chunk)
        except BaseException:
            plain.unlink(missing_ok=True)
            raise
    path.unlink()
    return plain


def _index(plain: Path) -> Tree:
    tree = Tree()
    if plain.stat().st_size == 0:
        return tree
    try:
        with tarfile.open(plain, "r:") as tar:
            for info in tar:
                parts = member_parts(info.name, _WHAT)
                data = SpoolSlice(plain, info.offset_data, info.size) if info.isreg() else None
                add_member(tree, parts, info, data, _WHAT, preserve=False)
    except tarfile.TarError as e:
        raise InvalidArgument(f"the build context is not a valid tar archive: {e}") from e
    return tree
