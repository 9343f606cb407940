"""The files of an image, read from its layer blobs without unpacking them: for
`COPY --from=<stage or image>`, and for the directories and accounts a COPY into the image
needs to know (`copy_layer(base=...)`, `resolve_chown`).

Layers are applied bottom to top as an OCI runtime would: `.wh.NAME` deletes NAME from the
layers below, `.wh..wh..opq` hides everything the layers below put in its directory (both only
affect lower layers, never entries of their own layer). Only headers are kept in memory. Layer
blobs are gzip streams that cannot be read at random, so the data of the files a COPY matched
is copied into a spool file, one pass over each layer that holds some of it.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from berthd.common.errors import InvalidArgument

from .compression import decompressed
from .fstree import Entry, Parts, Tree, add_member, clean_parts, member_parts
from .sources import SourceMatch, match_sources
from .spool import Spool, SpoolSlice

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_META_PREFIX = ".wh..wh."  # aufs bookkeeping; only the opaque marker means something


class _InLayer:
    """Where a regular file's data lies: (layer index, offset in its uncompressed tar)."""

    __slots__ = ("key", "size")

    def __init__(self, layer: int, offset: int, size: int) -> None:
        self.key = (layer, offset)
        self.size = size

    def open(self) -> BinaryIO:
        raise RuntimeError("layer data is read through LayerFiles.match or read_file")

    def digest(self) -> str:
        raise RuntimeError("layer data is read through LayerFiles.match or read_file")


class LayerFiles:
    """Files of an image's filesystem, from its layer blobs (bottom to top)."""

    def __init__(
        self, layer_paths: Sequence[Path], scratch: Path | None = None, where: str = "image"
    ) -> None:
        """Index the layers (reading each once); `where` names the image in errors ("stage
        build"). Blocking: run it in a thread from async code."""
        self.tree = Tree()
        self._where = where
        self._scratch = scratch
        self._layers: list[Path] = []
        self._spool: Spool | None = None
        self._spooled: dict[tuple[int, int], SpoolSlice] = {}
        for path in layer_paths:
            self.add_layer(path)

    def add_layer(self, path: Path) -> None:
        """Apply one more layer on top (e.g. the one a build step just made)."""
        index = len(self._layers)
        self._layers.append(path)
        what = f"layer {path.name}"
        opaque: list[Parts] = []
        deleted: list[Parts] = []
        members: list[tuple[Parts, tarfile.TarInfo]] = []
        with _reading(path) as tar:
            for info in tar:
                parts = member_parts(info.name, what)
                name = parts[-1] if parts else ""
                if name == OPAQUE_MARKER:
                    opaque.append(parts[:-1])
                elif name.startswith(_META_PREFIX):
                    continue
                elif name.startswith(WHITEOUT_PREFIX):
                    deleted.append((*parts[:-1], name[len(WHITEOUT_PREFIX) :]))
                else:
                    members.append((parts, info))
        # Whiteouts first: they apply to the layers below, not to entries of this one.
        for parts in opaque:
            self.tree.clear(parts)
        for parts in deleted:
            self.tree.remove(parts)
        for parts, info in members:
            data = _InLayer(index, info.offset_data, info.size) if info.isreg() else None
            add_member(self.tree, parts, info, data, what, preserve=True)

    def match(self, sources: list[str], line: int, instruction: str = "COPY") -> list[SourceMatch]:
        """What COPY --from `sources` name in the image (paths relative to its root), with
        their data ready to read; same rules and errors as BuildContext.match."""
        matches = match_sources(self.tree, sources, line, instruction, self._where)
        self._load(e for m in matches for _, e in m.entries)
        return [
            replace(m, entries=tuple((rel, self._loaded(e)) for rel, e in m.entries))
            for m in matches
        ]

    def read_file(self, path: str) -> bytes | None:
        """The content of the regular file at `path` (symlinks followed), None if there is
        none: e.g. /etc/passwd for `--chown=name`."""
        try:
            _, node = self.tree.resolve(clean_parts(path))
        except NotADirectoryError:
            return None
        if node is None or not node.entry.is_regular:
            return None
        self._load([node.entry])
        data = self._loaded(node.entry).data
        assert data is not None
        with data.open() as f:
            return f.read()

    def close(self) -> None:
        """Delete the spooled data."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self._spooled.clear()

    def __enter__(self) -> LayerFiles:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _load(self, entries: Iterable[Entry]) -> None:
        """Copy the data of `entries` that is still in layers into the spool."""
        wanted: dict[int, set[int]] = {}
        for entry in entries:
            if isinstance(entry.data, _InLayer) and entry.data.key not in self._spooled:
                layer, offset = entry.data.key
                wanted.setdefault(layer, set()).add(offset)
        for layer, offsets in sorted(wanted.items()):
            if self._spool is None:
                self._spool = Spool(self._scratch, "layerfiles-")
            path = self._layers[layer]
            with _reading(path) as tar:
                for info in tar:
                    if info.offset_data in offsets and info.isreg():
                        source = tar.extractfile(info)
                        assert source is not None
                        what = f"layer {path.name}: {info.name}"
                        data = self._spool.add(source, info.size, what)
                        self._spooled[(layer, info.offset_data)] = data

    def _loaded(self, entry: Entry) -> Entry:
        if isinstance(entry.data, _InLayer):
            return replace(entry, data=self._spooled[entry.data.key])
        return entry


@contextmanager
def _reading(path: Path) -> Iterator[tarfile.TarFile]:
    """The layer blob at `path` as a streamed tar; tar errors become InvalidArgument."""
    what = f"layer {path.name}"
    try:
        with (
            decompressed(open(path, "rb"), what) as stream,
            tarfile.open(fileobj=stream, mode="r|") as tar,
        ):
            yield tar
    except tarfile.TarError as e:
        raise InvalidArgument(f"{what} is not a valid tar archive: {e}") from e
