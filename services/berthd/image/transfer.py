"""Copy images between berth's registry and external OCI registries: `berth pull` and `push`.

A pull fetches the external manifest, copies every blob berth's registry lacks (a blob already
in the target repository is skipped, one stored in any other repository is linked by a mount),
then puts the manifest bytes unchanged under the local name, so the digest stays the same
(Docker schema2 manifests included). For an image index, only the host platform's image is
copied and stored: berth's catalog names images, and every node of a cluster shares the
platform of the host it was built for.

A push is the reverse: blobs the remote holds are skipped ("Layer already exists"), blobs the
remote holds in another repository are mounted from there, the rest are streamed from berth's
registry through a scratch file; then the manifest bytes go up unchanged.

Blobs move three at a time, each through a file under the catalog's scratch directory (never
in memory), with per-blob progress events (berth.types.v1.Progress: id the blob's digest, with
"config:" before it for the image config).
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Literal

from berthd.common.errors import DataLoss, FailedPrecondition, InvalidArgument
from berthd.common.oci.digest import hex_of
from berthd.common.oci.manifest import Descriptor, ParsedManifest, parse_manifest
from berthd.common.oci.platform import pick_platform
from berthd.common.oci.reference import Reference, parse_reference
from berthd.common.streaming import run_limited
from berthd.image import metrics
from berthd.image.catalog import Catalog
from berthd.image.distribution import DistributionClient, Manifest
from berthd.image.model import (
    CONFIG_PREFIX,
    ORIGIN_PULL,
    Credentials,
    Event,
    ImageDetail,
    Report,
    State,
)

PARALLEL_BLOBS = 3
# Byte progress is reported about every 1% of a blob, and at least every this many bytes.
PROGRESS_STEP = 1 << 20
EXAMPLE = "127.0.0.1:5000/name:tag"


class MountSources:
    """Which repository of a remote host is known to hold a blob, as a cross-repository mount
    source for later pushes to that host. Filled by pushes and pulls of this process; bounded,
    the oldest entries forgotten first."""

    def __init__(self, limit_per_host: int = 10_000) -> None:
        self._limit = limit_per_host
        self._hosts: dict[str, OrderedDict[str, str]] = {}

    def remember(self, host: str, digest: str, repository: str) -> None:
        known = self._hosts.setdefault(host, OrderedDict())
        known[digest] = repository
        known.move_to_end(digest)
        while len(known) > self._limit:
            known.popitem(last=False)

    def lookup(self, host: str, digest: str) -> str | None:
        return self._hosts.get(host, {}).get(digest)


MOUNT_SOURCES = MountSources()


def _reference(text: str, field: str) -> Reference:
    try:
        return parse_reference(text)
    except InvalidArgument as e:
        raise InvalidArgument(
            str(e), reason="INVALID_REFERENCE", field=field, metadata={field: text}
        ) from None


def external_reference(text: str, verb: Literal["pull", "push"], field: str = "image") -> Reference:
    """Parse a reference that must name an external registry (`host[:port]/name[:tag]`)."""
    reference = _reference(text, field)
    if reference.registry is None:
        way = "from" if verb == "pull" else "to"
        raise InvalidArgument(
            f"{text} has no registry host; berth {verb} copies {way} an external registry, "
            f"e.g. {EXAMPLE}",
            reason="INVALID_REFERENCE",
            field=field,
            metadata={field: text},
        )
    return reference


def local_target(source: Reference, local_reference: str) -> tuple[str, str | None]:
    """(repository, tag) to store a pulled image under in berth's registry; tag None stores
    it untagged by digest. Default: the source without its host, same tag (or digest)."""
    if not local_reference:
        return source.repository, source.tag
    target = _reference(local_reference, "local_reference")
    if target.registry is not None or target.digest is not None:
        raise InvalidArgument(
            f"{local_reference}: the local reference must be name[:tag] in berth's registry, "
            "without a registry host or digest",
            reason="INVALID_REFERENCE",
            field="local_reference",
            metadata={"local_reference": local_reference},
        )
    return target.repository, target.tag


# --- pull -----------------------------------------------------------------------------------


async def pull_external(
    catalog: Catalog,
    image: str,
    credentials: Credentials | None,
    insecure: bool,
    local_reference: str,
    progress: Report,
) -> tuple[ImageDetail, str]:
    """Copy `host/name[:tag|@digest]` into berth's registry; returns the image and the local
    reference it was stored under."""
    source = external_reference(image, "pull")
    repository, tag = local_target(source, local_reference)
    host = str(source.registry)
    async with DistributionClient(host, credentials, insecure) as remote:
        manifest, parsed = await _image_manifest(remote, source, image)
        progress = _marking_config(progress, parsed)

        async def copy(blob: Descriptor) -> None:
            digest = blob.digest
            if await catalog.registry.stat_blob(repository, digest) is not None:
                state = State.ALREADY_EXISTS
            elif await catalog.registry.mount_blob(repository, digest):
                state = State.MOUNTED
            else:
                await _fetch(catalog, remote, source.repository, repository, blob, progress)
                state = State.DONE
            MOUNT_SOURCES.remember(host, digest, source.repository)
            progress(Event(digest, state, blob.size, blob.size))

        await _copy_blobs(parsed.required_blobs, copy, progress)
    stored = await catalog.registry.put_manifest(
        repository, tag or manifest.digest, manifest.media_type, manifest.content
    )
    if stored != manifest.digest:
        raise DataLoss(
            f"{image}: berth's registry stored the manifest as {stored}",
            reason="DIGEST_MISMATCH",
            metadata={"expected": manifest.digest, "actual": stored},
        )
    await catalog.record_origin(stored, repository, ORIGIN_PULL, image)
    detail = await catalog.inspect(f"{repository}@{stored}")
    return detail, f"{repository}:{tag}" if tag else f"{repository}@{stored}"


async def _image_manifest(
    remote: DistributionClient, source: Reference, what: str
) -> tuple[Manifest, ParsedManifest]:
    """The image manifest a reference names; for an index, the host platform's image."""
    manifest = await remote.get_manifest(source.repository, str(source.reference))
    parsed = _parse(manifest, what)
    if parsed.kind == "index":
        entry = pick_platform(parsed, what)
        manifest = await remote.get_manifest(source.repository, entry.digest)
        parsed = _parse(manifest, what)
        if parsed.kind != "image":
            raise FailedPrecondition(
                f"{what}: the index's {entry.digest} is another index",
                reason="NOT_AN_IMAGE",
                metadata={"digest": entry.digest},
            )
    return manifest, parsed


def _parse(manifest: Manifest, what: str) -> ParsedManifest:
    try:
        return parse_manifest(manifest.content, manifest.media_type)
    except InvalidArgument as e:
        raise InvalidArgument(
            f"{what}: {e}", reason="MANIFEST_INVALID", metadata={"digest": manifest.digest}
        ) from e


async def _fetch(
    catalog: Catalog,
    remote: DistributionClient,
    remote_repository: str,
    repository: str,
    blob: Descriptor,
    progress: Report,
) -> None:
    """Download one blob to scratch, then push it into berth's registry."""
    with catalog.disk.guard(f"cannot pull {blob.digest}", digest=blob.digest):
        path = _scratch_path(catalog, "pull", blob.digest)
        try:
            report = _byte_progress(blob, progress, State.DOWNLOADING)
            size = await remote.download_blob(remote_repository, blob.digest, path, report)
            metrics.EXTERNAL_BYTES.labels(direction="pull").inc(size)
            if size != blob.size:
                raise DataLoss(
                    f"{remote.host}/{remote_repository}@{blob.digest}: {size} bytes, "
                    f"the manifest says {blob.size}",
                    reason="SIZE_MISMATCH",
                    metadata={"digest": blob.digest, "expected": blob.size, "actual": size},
                )
            # The download checked the digest; berth's registry checks it again on commit.
            progress(Event(blob.digest, State.VERIFYING, size, size))
            await catalog.registry.push_blob(repository, path, blob.digest, size)
        finally:
            path.unlink(missing_ok=True)
            # Its name is never used again: a download cut short is not resumed.
            path.with_name(path.name + ".partial").unlink(missing_ok=True)


# --- push -----------------------------------------------------------------------------------


async def push_external(
    catalog: Catalog,
    image: str,
    destination: str,
    credentials: Credentials | None,
    insecure: bool,
    progress: Report,
) -> tuple[str, int]:
    """Copy an image of berth's catalog to `host/name[:tag]`; returns the pushed manifest's
    digest and size."""
    target = external_reference(destination, "push", "destination")
    local = await catalog.resolve(image)
    if target.digest is not None and target.digest != local.digest:
        raise InvalidArgument(
            f"{destination} pins {target.digest}, but {image} is {local.digest}",
            field="destination",
            metadata={"expected": target.digest, "actual": local.digest},
        )
    host = str(target.registry)
    repository = target.repository
    progress = _marking_config(progress, local.parsed)
    async with DistributionClient(host, credentials, insecure) as remote:

        async def copy(blob: Descriptor) -> None:
            digest = blob.digest
            source = MOUNT_SOURCES.lookup(host, digest)
            message = ""
            if await remote.blob_exists(repository, digest) is not None:
                state = State.ALREADY_EXISTS
            elif source not in (None, repository) and await remote.mount_blob(
                repository, digest, str(source)
            ):
                state = State.MOUNTED
                message = f"Mounted from {source}"
            else:
                await _send(catalog, remote, local.repository, repository, blob, progress)
                state = State.DONE
            MOUNT_SOURCES.remember(host, digest, repository)
            progress(Event(digest, state, blob.size, blob.size, message=message))

        await _copy_blobs(local.parsed.required_blobs, copy, progress)
        digest = await remote.put_manifest(
            repository, target.tag or local.digest, local.media_type, local.manifest
        )
    return digest, len(local.manifest)


async def _send(
    catalog: Catalog,
    remote: DistributionClient,
    local_repository: str,
    repository: str,
    blob: Descriptor,
    progress: Report,
) -> None:
    """Stream one blob from berth's registry to scratch, then up to the remote."""
    with catalog.disk.guard(f"cannot push {blob.digest}", digest=blob.digest):
        path = _scratch_path(catalog, "push", blob.digest)
        try:
            await catalog.registry.pull_blob(local_repository, blob.digest, path, size=blob.size)
            report = _byte_progress(blob, progress, State.UPLOADING)
            await remote.upload_blob(repository, path, blob.digest, blob.size, report)
            metrics.EXTERNAL_BYTES.labels(direction="push").inc(blob.size)
        finally:
            path.unlink(missing_ok=True)
            # Its name is never used again: a download cut short is not resumed.
            path.with_name(path.name + ".partial").unlink(missing_ok=True)


# --- shared ---------------------------------------------------------------------------------


async def _copy_blobs(
    blobs: Iterable[Descriptor],
    copy: Callable[[Descriptor], Awaitable[None]],
    progress: Report,
) -> None:
    """Run copy() for each distinct blob, PARALLEL_BLOBS at a time; the first failure
    cancels the rest and is raised as itself."""
    unique = list({blob.digest: blob for blob in blobs}.values())
    for blob in unique:
        progress(Event(blob.digest, State.WAITING, 0, blob.size))
    await run_limited([functools.partial(copy, blob) for blob in unique], PARALLEL_BLOBS)


def _marking_config(progress: Report, manifest: ParsedManifest) -> Report:
    """progress, with the config blob's ids prefixed "config:" (clients show layers only)."""
    config = manifest.config.digest if manifest.config is not None else ""

    def report(event: Event) -> None:
        if event.id == config:
            event = replace(event, id=CONFIG_PREFIX + event.id)
        progress(event)

    return report


def _byte_progress(blob: Descriptor, progress: Report, state: State) -> Callable[[int, int], None]:
    """A (current, total) callback that reports `state` (DOWNLOADING or UPLOADING) about
    every 1% of the blob."""
    step = max(blob.size // 100, PROGRESS_STEP)
    last = -step

    def report(current: int, total: int) -> None:
        nonlocal last
        total = total or blob.size
        if current - last >= step or current >= total:
            last = current
            progress(Event(blob.digest, state, current, total))

    return report


def _scratch_path(catalog: Catalog, direction: str, digest: str) -> Path:
    catalog.scratch.mkdir(parents=True, exist_ok=True)
    return catalog.scratch / f"{direction}-{hex_of(digest)[:16]}-{time.monotonic_ns()}"
