"""Mark-and-sweep garbage collection of blobs that no manifest references.

Safe while the registry serves traffic: blobs younger than the grace period are kept (uploads,
stats, mounts and manifest pushes touch a blob's mtime, so a blob a client is about to reference
counts as young), upload sessions live outside the blob tree, and each blob's age is checked
again just before it is unlinked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from berthd.registry import metrics
from berthd.registry.blobstore import BlobStat, BlobStore
from berthd.registry.metadata import Metadata

log = logging.getLogger("berthd.registry.gc")

DEFAULT_GRACE_SECONDS = 3600
# Upload sessions nobody wrote to for this long are abandoned and removed.
ABANDONED_UPLOAD_SECONDS = 24 * 3600


# Progress is reported about every this many items of a stage, and at its end.
PROGRESS_EVERY = 500


@dataclass
class GcReport:
    deleted: list[BlobStat] = field(default_factory=list)
    reclaimed_bytes: int = 0
    blobs_marked: int = 0
    blobs_young: int = 0
    uploads_removed: int = 0


@dataclass(frozen=True)
class GcStage:
    """Progress of one stage: "mark" (manifests read) or "sweep" (blobs checked); `total` is
    0 when unknown, `done` once the stage is over."""

    stage: str
    current: int
    total: int = 0
    done: bool = False


GcProgress = Callable[[GcStage], None]


def _ignore(stage: GcStage) -> None:
    pass


async def mark(meta: Metadata, progress: GcProgress = _ignore) -> set[str]:
    """Every digest a manifest in any repository references, manifests included."""
    marked: set[str] = set()
    progress(GcStage("mark", 0))
    manifests = await meta.all_manifests()
    for count, (_, record) in enumerate(manifests, 1):
        marked.add(record.digest)
        marked.update(record.references)
        if count % PROGRESS_EVERY == 0:
            progress(GcStage("mark", count))
    progress(GcStage("mark", len(manifests), len(manifests), done=True))
    return marked


async def collect(
    blobs: BlobStore,
    meta: Metadata,
    *,
    dry_run: bool,
    grace_seconds: float,
    progress: GcProgress = _ignore,
) -> GcReport:
    metrics.GC_RUNS.labels("dry-run" if dry_run else "delete").inc()
    cutoff = time.time() - (grace_seconds or DEFAULT_GRACE_SECONDS)
    marked = await mark(meta, progress)
    report = GcReport()
    found = await asyncio.to_thread(lambda: list(blobs.walk()))
    progress(GcStage("sweep", 0, len(found)))
    for count, blob in enumerate(found, 1):
        if blob.digest in marked:
            report.blobs_marked += 1
        elif blob.mtime > cutoff:
            report.blobs_young += 1
        elif dry_run or await asyncio.to_thread(blobs.delete_if_older, blob.digest, cutoff):
            report.deleted.append(blob)
            report.reclaimed_bytes += blob.size
        else:
            report.blobs_young += 1
        if count % PROGRESS_EVERY == 0 and count < len(found):
            progress(GcStage("sweep", count, len(found)))
    if not dry_run:
        await meta.unlink_everywhere({b.digest for b in report.deleted})
        metrics.GC_FREED_BYTES.inc(report.reclaimed_bytes)
        metrics.GC_DELETED_BLOBS.inc(len(report.deleted))
        abandoned = time.time() - ABANDONED_UPLOAD_SECONDS
        for upload in await asyncio.to_thread(blobs.open_uploads):
            if upload.updated_at < abandoned:
                await asyncio.to_thread(blobs.cancel, upload.upload_id)
                report.uploads_removed += 1
    progress(GcStage("sweep", len(found), len(found), done=True))
    log.info(
        "gc finished",
        extra={
            "dry_run": dry_run,
            "deleted": len(report.deleted),
            "reclaimed_bytes": report.reclaimed_bytes,
            "marked": report.blobs_marked,
            "young": report.blobs_young,
        },
    )
    return report
