"""New images from a container's changes (`docker commit`) and from a tarball (`docker import`).

Commit: the node that runs the container packs its overlay upper dir as a layer and pushes it
to the registry itself, so the layer never passes through this service; this service then
writes the config (the parent's, with the new diff_id, a history step and the `--change`
instructions applied) and the manifest. Import: the uploaded tarball (plain, gzip, bzip2 or
xz) is checked entry by entry, hashed (diff_id) and gzipped in one pass, and becomes a
single-layer image.
"""

from __future__ import annotations

import asyncio
import bz2
import copy
import lzma
import os
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from isal import igzip, igzip_lib

from berth.client.cluster import ClusterContainer, NodeInfo
from berthd.common.changes import apply_changes, parse_changes
from berthd.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from berthd.common.images import ResolvedImage
from berthd.common.oci import mediatypes
from berthd.common.oci.digest import Digester, quoted
from berthd.common.oci.manifest import Descriptor, as_oci_layer
from berthd.common.oci.platform import host_platform
from berthd.common.oci.reference import parse_reference
from berthd.common.rpc.cluster import ClusterApi
from berthd.common.rpc.node import NodeApi
from berthd.common.streaming import spool_upload
from berthd.common.tarsafe import (
    OPAQUE_MARKER,
    WHITEOUT_PREFIX,
    HashingReader,
    UnsafeLayer,
    split_path,
)
from berthd.image import metrics
from berthd.image.catalog import Catalog, catalog_name
from berthd.image.model import (
    ORIGIN_COMMIT,
    ORIGIN_IMPORT,
    Event,
    ImageDetail,
    Report,
    State,
    Unit,
    ignore,
)

# Where the blobs of an import without a name go (an untagged commit stays in its parent's
# repository, which already holds the parent's layers).
IMPORT_REPOSITORY = "imported"
DEFAULT_IMPORT_LIMIT = 8 << 30  # bytes, compressed upload and uncompressed tar alike
_CHUNK = 1 << 20
_TAR_BUFSIZE = 64 * 1024


class Stages:
    """A commit's stages as progress events: each stage is RUNNING (with a line for people)
    until the next one starts or finish() is called, then DONE with the time it took."""

    def __init__(self, report: Report) -> None:
        self._report = report
        self._current = ""
        self._started = 0.0

    def __call__(self, stage: str, message: str) -> None:
        if stage != self._current:
            self.finish()
            self._current, self._started = stage, time.monotonic()
        self._report(Event(stage, State.RUNNING, unit=Unit.NONE, message=message))

    def finish(self) -> None:
        if self._current:
            seconds = time.monotonic() - self._started
            self._report(Event(self._current, State.DONE, unit=Unit.NONE, seconds=seconds))
            self._current = ""


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# --- commit ------------------------------------------------------------------------------------


@metrics.counted(metrics.COMMITS)
async def commit(
    catalog: Catalog,
    cluster: ClusterApi,
    container: str,
    reference: str,
    author: str,
    message: str,
    pause: bool,
    changes: list[str],
    report: Report = ignore,
) -> ImageDetail:
    """Snapshot a cluster container's changed filesystem as a new image named `reference`
    (`name[:tag]`; empty: untagged, in the parent's repository). Progress: the stages
    "resolve", "export" and "write"."""
    # Everything the caller typed is checked before anything is touched.
    name = catalog_name(reference, "reference") if reference else None
    with _field("changes"):
        parse_changes(changes)
    if not container:
        raise InvalidArgument("no container given", field="container")

    progress = Stages(report)
    progress("resolve", f"finding container {container}")
    found, node = await _find_container(cluster, container)
    agent = NodeApi(node.address)
    parent = await _parent_image(catalog, found, node, agent)
    repository = name.repository if name else parent.repository
    progress("resolve", f"container {found.name} runs on node {node.id}, image {found.image}")

    paused = " (paused while it is read)" if pause else ""
    progress("export", f"node {node.id} packs the changes of {found.name}{paused}")
    layer_digest, diff_id, size = await agent.export_layer(found.id, repository, pause)
    progress("export", f"layer {layer_digest} ({size} bytes) pushed to {repository}")

    progress("write", "writing the image config and manifest")
    if repository != parent.repository:
        for layer in parent.parsed.layers:
            await _mount(catalog, repository, layer.digest, parent.repository)
    config = commit_config(
        parent.config.raw,
        changes,
        diff_id,
        found.id,
        found.command or _image_command(parent.config.config),
        author,
        message,
        now_rfc3339(),
    )
    layers = [*map(as_oci_layer, parent.parsed.layers)]
    layers.append(Descriptor(mediatypes.OCI_LAYER_TAR_GZIP, layer_digest, size))
    image = await catalog.write_image(
        repository, name.tag if name else None, config, layers, ORIGIN_COMMIT, found.id
    )
    progress.finish()
    return image


@contextmanager
def _field(field: str) -> Iterator[None]:
    """An InvalidArgument without a more specific reason names the request field at fault."""
    try:
        yield
    except InvalidArgument as exc:
        if exc.reason != "INVALID_ARGUMENT" or exc.details.field_violations:
            raise
        raise InvalidArgument(str(exc), field=field) from None


async def _find_container(cluster: ClusterApi, container: str) -> tuple[ClusterContainer, NodeInfo]:
    found = await cluster.inspect(container)
    if not found.node_id:
        raise FailedPrecondition(
            f"container {found.name} is not placed on any node",
            reason="CONTAINER_NOT_PLACED",
            metadata={"container": found.id},
            resource=("container", found.id),
        )
    return found, await cluster.node(found.node_id)


async def _parent_image(
    catalog: Catalog, found: ClusterContainer, node: NodeInfo, agent: NodeApi
) -> ResolvedImage:
    """The image the container runs: its repository and the manifest digest its node pulled."""
    if found.state == "pending":
        raise FailedPrecondition(
            f"container {found.name} is not created on node {node.id} yet; commit it once it runs",
            reason="CONTAINER_NOT_CREATED",
            metadata={"container": found.id, "node_id": node.id},
            resource=("container", found.id),
        )
    if node.state != "ready":
        raise Unavailable(
            f"node {node.id} of container {found.name} is {node.state}: its changes cannot be read",
            reason="NODE_UNAVAILABLE",
            metadata={"node_id": node.id, "state": node.state},
            resource=("node", node.id),
        )
    digest = found.image_digest
    if not digest:  # no status with it reported yet: ask the node that pulled it
        digest = (await agent.inspect(found.id)).image_digest
    repository = parse_reference(found.image).repository
    try:
        return await catalog.resolve(f"{repository}@{digest}")
    except NotFound:
        raise FailedPrecondition(
            f"the image of container {found.name} ({found.image}, {digest}) is no longer in "
            "the registry, so the new image would have no parent layers",
            reason="PARENT_IMAGE_UNKNOWN",
            metadata={"image": f"{repository}@{digest}", "container": found.id},
            resource=("image", f"{repository}@{digest}"),
        ) from None


async def _mount(catalog: Catalog, repository: str, digest: str, source: str) -> None:
    if not await catalog.registry.mount_blob(repository, digest, source):
        raise FailedPrecondition(
            f"layer {digest} of the parent image is missing from repository {source}",
            reason="IMAGE_DAMAGED",
            metadata={"digest": digest, "repository": source},
            resource=("blob", digest),
        )


def _image_command(config: Mapping[str, Any]) -> list[str]:
    return [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]


def commit_config(
    parent: Mapping[str, Any],
    changes: Sequence[str],
    diff_id: str,
    container_id: str,
    command: Sequence[str],
    author: str,
    message: str,
    created: str,
) -> dict[str, Any]:
    """The new image's config: the parent's, with `changes` applied to its `config` section,
    the new layer's diff_id, and a history step as `docker commit` writes it."""
    config = copy.deepcopy(dict(parent))
    config["config"] = apply_changes(parent.get("config") or {}, changes)
    rootfs = dict(config.get("rootfs") or {"type": "layers"})
    diff_ids = list(rootfs.get("diff_ids") or [])
    rootfs["diff_ids"] = [*diff_ids, diff_id]
    config["rootfs"] = rootfs
    history = list(config.get("history") or [])
    # A parent without a history step per layer would pair the new step with an old layer.
    described = sum(1 for step in history if not step.get("empty_layer"))
    history += [{} for _ in range(len(diff_ids) - described)]
    step: dict[str, Any] = {"created": created, "created_by": " ".join(command)}
    if author:
        step["author"] = author
    if message:
        step["comment"] = message
    config["history"] = [*history, step]
    config["created"] = created
    config["container"] = container_id
    if author:
        config["author"] = author
    else:
        config.pop("author", None)
    return config


# --- import --------------------------------------------------------------------------------------


@metrics.counted(metrics.IMPORTS)
async def import_tarball(
    catalog: Catalog,
    chunks: AsyncIterator[bytes],
    reference: str,
    message: str,
    changes: list[str],
    source: str,
    max_bytes: int = DEFAULT_IMPORT_LIMIT,
    progress: Report = ignore,
) -> ImageDetail:
    """A root filesystem tarball as a one-layer image named `reference` (`name[:tag]`; empty:
    untagged, in the `imported` repository). Progress: "upload" DONE once every byte is in
    (the caller reports the bytes as they arrive), then "layer" RUNNING and DONE."""
    name = catalog_name(reference, "reference") if reference else None
    with _field("changes"):
        config_section = apply_changes({}, changes)
    repository = name.repository if name else IMPORT_REPOSITORY
    # The upload and its packed layer go in scratch: a full disk is STORAGE_FULL.
    with catalog.disk.guard("cannot import the tarball"):
        catalog.scratch.mkdir(parents=True, exist_ok=True)
        base = catalog.scratch / f"import-{uuid.uuid4().hex}"
        upload, blob = base.with_suffix(".upload"), base.with_suffix(".tar.gz")
        try:
            too_large = f"import: the tarball is larger than {_gib(max_bytes)}"
            received = await spool_upload(chunks, upload, max_bytes, too_large)
            if received == 0:
                raise InvalidArgument(
                    "import: the tarball is empty", reason="INVALID_ARCHIVE", field="data"
                )
            progress(Event("upload", State.DONE, received, received))
            started = time.monotonic()
            progress(
                Event(
                    "layer", State.RUNNING, unit=Unit.NONE, message="checking and packing the layer"
                )
            )
            layer = await asyncio.to_thread(pack_layer, upload, blob, max_bytes)
            upload.unlink()
            await catalog.registry.push_blob(repository, blob, layer.digest, layer.size)
            progress(
                Event(
                    "layer",
                    State.DONE,
                    unit=Unit.NONE,
                    message=f"layer {layer.digest} ({layer.size} bytes)",
                    seconds=time.monotonic() - started,
                )
            )
            os_name, architecture = host_platform()
            created = now_rfc3339()
            step = {"created": created, "created_by": f"Imported from {source or '-'}"}
            if message:
                step["comment"] = message
            config = {
                "created": created,
                "architecture": architecture,
                "os": os_name,
                "config": config_section,
                "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
                "history": [step],
            }
            descriptor = Descriptor(mediatypes.OCI_LAYER_TAR_GZIP, layer.digest, layer.size)
            return await catalog.write_image(
                repository, name.tag if name else None, config, [descriptor], ORIGIN_IMPORT, source
            )
        finally:
            upload.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)


def _gib(size: int) -> str:
    return f"{size / (1 << 30):g} GiB" if size >= 1 << 30 else f"{size} bytes"


@dataclass(frozen=True)
class PackedLayer:
    """diff_id: sha256 of the uncompressed tar; digest and size: of the gzip blob."""

    diff_id: str
    digest: str
    size: int


def pack_layer(source: Path, dest: Path, max_bytes: int = DEFAULT_IMPORT_LIMIT) -> PackedLayer:
    """Turn a tarball (plain, gzip, bzip2 or xz) into a gzip layer blob at `dest`, refusing
    entries that could write outside the root it is unpacked into, in one pass."""
    with open(source, "rb") as raw, open(dest, "wb") as out:
        tar_stream = _decompressed(raw)
        compressed = _HashingWriter(out)
        with igzip.IGzipFile(fileobj=compressed, mode="wb", compresslevel=1, mtime=0) as gz:
            tee = _Tee(HashingReader(tar_stream), gz, max_bytes)
            check_tar(tee)
            while tee.read(_CHUNK):  # what follows the end-of-archive blocks is part of the tar
                pass
        out.flush()
        os.fsync(out.fileno())
    return PackedLayer(tee.source.digest, compressed.digester.digest, compressed.digester.size)


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _decompressed(raw: BinaryIO) -> BinaryIO:
    """The tar stream inside `raw`, by its magic bytes."""
    head = raw.read(6)
    raw.seek(0)
    if head.startswith(b"\x1f\x8b"):
        return igzip.IGzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if head.startswith(b"BZh"):
        return bz2.BZ2File(raw)  # type: ignore[return-value]
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)  # type: ignore[return-value]
    if head.startswith(_ZSTD_MAGIC):
        raise InvalidArgument(
            "import: zstd tarballs are not supported; use gzip, bzip2 or xz",
            reason="INVALID_ARCHIVE",
            field="data",
        )
    return raw


# Errors of corrupt compressed data, from each decompressor.
_CORRUPT = (igzip.BadGzipFile, igzip_lib.IsalError, EOFError, OSError, lzma.LZMAError)


class _Tee:
    """Reads the tar stream, enforcing the size cap, and writes every byte to the layer."""

    def __init__(self, source: HashingReader, sink: BinaryIO, max_bytes: int) -> None:
        self.source = source
        self.sink = sink
        self.max_bytes = max_bytes

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.source.read(size)
        except _CORRUPT as e:
            raise InvalidArgument(
                f"import: the tarball is not valid compressed data: {e}",
                reason="INVALID_ARCHIVE",
                field="data",
            ) from e
        if self.source.size > self.max_bytes:
            raise ResourceExhausted(
                f"import: the uncompressed tar is larger than {_gib(self.max_bytes)}",
                reason="ARCHIVE_TOO_LARGE",
                metadata={"limit": self.max_bytes},
            )
        self.sink.write(data)
        return data

    def readable(self) -> bool:
        return True


class _HashingWriter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.digester = Digester()

    def write(self, data: bytes) -> int:
        self.digester.update(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()

    def writable(self) -> bool:
        return True


def check_tar(stream: Any) -> int:
    """Read a tar stream to its end-of-archive, refusing (UnsafeLayer, naming the entry) what
    the node's extraction (berthd.common.tarsafe) would refuse: absolute paths, `..`, entries
    under a symlink of the archive, hard links to anything but an earlier file, bad whiteouts.
    Returns the number of entries."""
    checker = _TarChecker()
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=_TAR_BUFSIZE) as tar:
            for member in tar:
                checker.check(member)
    except tarfile.TarError as e:
        raise InvalidArgument(
            f"import: not a tar archive (plain, gzip, bzip2 or xz): {e}",
            reason="INVALID_ARCHIVE",
            field="data",
        ) from e
    return checker.entries


Parts = tuple[str, ...]


class _TarChecker:
    def __init__(self) -> None:
        self.symlinks: set[Parts] = set()
        self.files: set[Parts] = set()
        self.entries = 0

    def check(self, member: tarfile.TarInfo) -> None:
        self.entries += 1
        parts = split_path(member.name, member.name, IMPORT)
        if not parts:
            if not member.isdir():
                raise _unsafe(member, "the root must be a directory")
            return
        for depth in range(1, len(parts)):
            if parts[:depth] in self.symlinks:
                where = quoted("/".join(parts[:depth]))
                raise _unsafe(member, f"{where} is a symlink; writing through it could escape")
        base = parts[-1]
        whiteout = base.startswith(WHITEOUT_PREFIX) and base != OPAQUE_MARKER
        if whiteout and base[len(WHITEOUT_PREFIX) :] in ("", ".", ".."):
            raise _unsafe(member, "whiteout of an invalid name")
        if member.islnk() and split_path(member.linkname, member.name, IMPORT) not in self.files:
            raise _unsafe(
                member,
                f"hardlink target {quoted(member.linkname)} is not a file earlier in the archive",
            )
        # A later entry replaces an earlier one of the same path, and everything under it.
        self.symlinks = {p for p in self.symlinks if p[: len(parts)] != parts}
        if member.issym():
            self.symlinks.add(parts)
        if not member.isdir():
            self.files.add(parts)


# How import's errors name the tarball's entries: "import: tar entry "x": ...".
IMPORT = "import: tar"


def _unsafe(member: tarfile.TarInfo, why: str) -> UnsafeLayer:
    return UnsafeLayer(f"{IMPORT} entry {quoted(member.name)}: {why}")
