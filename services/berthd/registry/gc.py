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
from dataclasses import dataclass, field

from berthd.registry import metrics
from berthd.registry.blobstore import BlobStat, BlobStore
from berthd.registry.metadata import Metadata

log = logging.getLogger("berthd.registry.gc")

DEFAULT_GRACE_SECONDS = 3600
# Upload sessions nobody wrote to for this long are abandoned and removed.
ABANDONED_UPLOAD_SECONDS = 24 * 3600


@dataclass
class GcReport:
    deleted: list[BlobStat] = field(default_factory=list)
    bytes_freed: int = 0
    blobs_marked: int = 0
    blobs_young: int = 0
    uploads_removed: int = 0


async def mark(meta: Metadata) -> set[str]:
    """Every digest a manifest in any repository references, manifests included."""
    marked: set[str] = set()
    for _, record in await meta.all_manifests():
        marked.add(record.digest)
        marked.update(record.references)
    return marked


async def collect(
    blobs: BlobStore, meta: Metadata, *, dry_run: bool, grace_seconds: int
) -> GcReport:
    metrics.GC_RUNS.labels("dry-run" if dry_run else "delete").inc()
    cutoff = time.time() - (grace_seconds or DEFAULT_GRACE_SECONDS)
    marked = await mark(meta)
    report = GcReport()
    for blob in await asyncio.to_thread(lambda: list(blobs.walk())):
        if blob.digest in marked:
            report.blobs_marked += 1
        elif blob.mtime > cutoff:
            report.blobs_young += 1
        elif dry_run or await asyncio.to_thread(blobs.delete_if_older, blob.digest, cutoff):
            report.deleted.append(blob)
            report.bytes_freed += blob.size
        else:
            report.blobs_young += 1
    if not dry_run:
        await meta.unlink_everywhere({b.digest for b in report.deleted})
        metrics.GC_FREED_BYTES.inc(report.bytes_freed)
        metrics.GC_DELETED_BLOBS.inc(len(report.deleted))
        abandoned = time.time() - ABANDONED_UPLOAD_SECONDS
        for upload in await asyncio.to_thread(blobs.open_uploads):
            if upload.updated_at < abandoned:
                await asyncio.to_thread(blobs.cancel, upload.upload_id)
                report.uploads_removed += 1
    log.info(
        "gc finished",
        extra={
            "dry_run": dry_run,
            "deleted": len(report.deleted),
            "bytes_freed": report.bytes_freed,
            "marked": report.blobs_marked,
            "young": report.blobs_young,
        },
    )
    return report
