"""The build context: the tar a client streams with a build (plain, gzip, bzip2 or xz), spooled
to one uncompressed file in the builder's scratch directory and indexed in memory. File data is
read from the spool when a COPY/ADD step needs it.

As in Docker, the context's owners mean nothing (copied files are root's unless `--chown` says
otherwise) and its modes and modification times are kept. Members with absolute names or `..`
are refused: a context is a tree of relative paths. The builder applies the context's
`.dockerignore` itself (`apply_dockerignore`), so what a client sent beyond it is never seen.
"""

from __future__ import annotations

import asyncio
import os
import tarfile
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from berth.dockerignore import Matcher, MatchInfo, ignore_file_names, ignore_matcher
from berth.errors import BerthClientError
from berthd.builder.errors import context_invalid, context_too_large
from berthd.common.errors import InvalidArgument, ResourceExhausted
from berthd.common.oci.digest import quoted

from .compression import decompressed, peek
from .fstree import Node, Tree, add_member, clean_parts, escapes, member_parts
from .sources import SourceMatch, match_sources, sources_digest
from .spool import SpoolSlice

__all__ = ["BuildContext", "SourceMatch", "sources_digest"]

_WHAT = "build context"
_CHUNK = 1024 * 1024
# Linux's limits: a member whose path is longer could never be made on a node.
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
DEFAULT_MAX_FILES = 1_000_000


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
        cls,
        chunks: AsyncIterator[bytes],
        scratch: Path,
        max_bytes: int,
        max_files: int = DEFAULT_MAX_FILES,
        received: Callable[[int], None] | None = None,
    ) -> BuildContext:
        """Spool the streamed context and index it; `received(total)` is told the bytes
        received so far after every chunk. ResourceExhausted (CONTEXT_TOO_LARGE) past
        `max_bytes` (of the stream, or of the tar once decompressed) or `max_files` members;
        InvalidArgument (CONTEXT_INVALID) for a malformed or hostile tar. No bytes at all is an
        empty context."""
        fd, name = tempfile.mkstemp(prefix="context-", suffix=".tar", dir=scratch)
        path = Path(name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise _too_large(max_bytes)
                    await asyncio.to_thread(out.write, chunk)
                    if received is not None:
                        received(size)
            return await asyncio.to_thread(cls.from_file, path, max_bytes, max_files)
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    @classmethod
    def from_file(
        cls, path: Path, max_bytes: int, max_files: int = DEFAULT_MAX_FILES
    ) -> BuildContext:
        """Index the context tar at `path`, which the context then owns (`close` deletes it).
        A compressed tar is replaced by its uncompressed form next to it."""
        try:
            plain = _decompress(path, max_bytes)
        except InvalidArgument as exc:
            path.unlink(missing_ok=True)
            raise context_invalid(str(exc)) from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        try:
            tree = _index(plain, max_files)
        except InvalidArgument as exc:
            plain.unlink(missing_ok=True)
            raise context_invalid(str(exc)) from None
        except BaseException:
            plain.unlink(missing_ok=True)
            raise
        return cls(tree, plain, plain.stat().st_size)

    def apply_dockerignore(self, dockerfile: str | None) -> int:
        """Drop what the context's ignore file excludes, with Docker's rules (berth.dockerignore):
        `<dockerfile>.dockerignore` if the context has one, else `.dockerignore`; the
        Dockerfile (its path in the context; None when it came as text) and the ignore file
        always stay. Returns how many entries went (a directory counts once)."""
        for name in ignore_file_names(dockerfile):
            try:
                text = self.read_text(name)
            except InvalidArgument as exc:
                raise context_invalid(str(exc)) from None
            if text is not None:
                try:
                    matcher = ignore_matcher(text, name, dockerfile)
                except BerthClientError as exc:
                    raise context_invalid(f"{name}: {exc.message}") from None
                return filter_tree(self.tree, matcher)
        return 0

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
    return context_too_large(
        f"the build context is larger than the limit of {max_bytes} bytes; "
        "leave files out with .dockerignore",
        limit_bytes=max_bytes,
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


def _index(plain: Path, max_files: int) -> Tree:
    tree = Tree()
    if plain.stat().st_size == 0:
        return tree
    members = 0
    try:
        with tarfile.open(plain, "r:") as tar:
            for info in tar:
                members += 1
                if members > max_files:
                    raise context_too_large(
                        f"the build context has more than {max_files} files; "
                        "leave files out with .dockerignore",
                        limit_files=max_files,
                    )
                _check_length(info.name)
                parts = member_parts(info.name, _WHAT)
                data = SpoolSlice(plain, info.offset_data, info.size) if info.isreg() else None
                add_member(tree, parts, info, data, _WHAT, preserve=False)
    except tarfile.TarError as e:
        raise InvalidArgument(f"the build context is not a valid tar archive: {e}") from e
    return tree


def _check_length(name: str) -> None:
    encoded = name.encode(errors="surrogateescape")
    if len(encoded) > MAX_PATH_BYTES:
        raise InvalidArgument(
            f"{_WHAT}: member {quoted(name[:64])}... has a path longer than {MAX_PATH_BYTES} bytes"
        )
    for part in encoded.split(b"/"):
        if len(part) > MAX_NAME_BYTES:
            raise InvalidArgument(
                f"{_WHAT}: member {quoted(name[:64])}... has a name longer than "
                f"{MAX_NAME_BYTES} bytes"
            )


def filter_tree(tree: Tree, matcher: Matcher) -> int:
    """Remove what `matcher` excludes from `tree`, as BuildKit's context walker leaves it out:
    an excluded directory goes with everything in it, unless an exception may re-include
    something inside it; then it stays only if something inside it does. Returns how many
    entries went. Iterative: a context may nest deeper than Python's recursion limit."""
    # Pre-order: each entry before its children, so reversed every child comes before its parent.
    visited: list[tuple[Node, str, Node, bool, bool]] = []
    stack: list[tuple[Node, str, MatchInfo | None]] = [(tree.root, "", None)]
    while stack:
        node, prefix, parent = stack.pop()
        assert node.children is not None
        for name, child in node.children.items():
            path = prefix + name
            excluded, info = matcher.match(path, parent)
            walk = child.children is not None and (not excluded or matcher.may_include_under(path))
            visited.append((node, name, child, excluded, walk))
            if walk:
                stack.append((child, path + "/", info))
    removed = 0
    for node, name, child, excluded, walked in reversed(visited):
        if excluded and (not walked or not child.children):
            assert node.children is not None
            del node.children[name]
            removed += 1
    return removed
