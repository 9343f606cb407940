"""Mark-and-sweep garbage collection of blobs that no manifest references.

Safe while the registry serves traffic: blobs younger than the grace period are kept (uploads,
stats, mounts and manifest pushes touch a blob's mtime, so a blob a client is about to reference
counts as young), upload sessions live outside the blob tree, and each blob's age is checked
again just before it is unlinked.

It reads and checks everything it decides on (manifest records, blobs, upload sessions) before
it deletes anything, so a damaged record found on the way can stop it only while nothing is
deleted yet. A damaged manifest record is rebuilt from the manifest's blob; one whose blob is
gone too stops GC (DATA_LOSS, MANIFEST_RECORD_CORRUPT), since the blobs it references are
unknown. A damaged upload session is removed once older than the grace period.

Every step is one pass over what it reads (manifest records, blob files, links, upload
sessions, tag keys), with lookups in sets: its cost is linear in the registry's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from berthd.common.errors import DataLoss, InvalidArgument, NotFound
from berthd.common.oci.digest import digest_bytes
from berthd.common.oci.manifest import parse_manifest
from berthd.common.store import RevisionCompacted
from berthd.registry import metrics
from berthd.registry.blobstore import BlobStat, BlobStore
from berthd.registry.core import manifest_record_of
from berthd.registry.metadata import ManifestRecord, Metadata

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


def _rebuilt(blobs: BlobStore, repo: str, digest: str) -> ManifestRecord:
    """A damaged manifest record rebuilt from the manifest's own blob; DataLoss if the blob
    is gone or is no manifest."""
    try:
        content = blobs.read_all(digest)
        if digest_bytes(content) != digest:
            raise ValueError("content does not match its digest")
        parsed = parse_manifest(content, None)
    except (NotFound, InvalidArgument, ValueError) as exc:
        log.error("manifest record %s@%s is damaged and cannot be rebuilt: %s", repo, digest, exc)
        raise DataLoss(
            f"the record of manifest {repo}@{digest} is damaged and its content is missing or "
            "unreadable, so garbage collection cannot tell which blobs it references; nothing "
            "was deleted. Delete that manifest by its digest and run it again",
            reason="MANIFEST_RECORD_CORRUPT",
            metadata={"repository": repo, "digest": digest},
            resource=("manifest", f"{repo}@{digest}"),
        ) from None
    return manifest_record_of(digest, parsed, len(content))


async def mark(
    meta: Metadata,
    progress: GcProgress = _ignore,
    blobs: BlobStore | None = None,
    repair: bool = True,
) -> set[str]:
    """Every digest a manifest in any repository references, manifests included. A damaged
    record is rebuilt from its blob (and rewritten, with `repair`)."""
    marked: set[str] = set()
    progress(GcStage("mark", 0))
    manifests = await meta.all_manifests()
    for count, (repo, digest, found, entry) in enumerate(manifests, 1):
        record = found
        if record is None:
            if blobs is None:
                raise DataLoss(f"the record of manifest {repo}@{digest} is damaged")
            record = await asyncio.to_thread(_rebuilt, blobs, repo, digest)
            if repair and await meta.repair_manifest(repo, record, entry):
                log.warning("rebuilt the damaged record of manifest %s@%s", repo, digest)
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
    grace_seconds: float | None,
    progress: GcProgress = _ignore,
) -> GcReport:
    """`grace_seconds` None is the default; 0 keeps no unreferenced blob for its age."""
    metrics.GC_RUNS.labels("dry-run" if dry_run else "delete").inc()
    grace = DEFAULT_GRACE_SECONDS if grace_seconds is None else grace_seconds
    cutoff = time.time() - grace
    # Read and check everything first: whatever stops GC stops it before any deletion.
    marked = await mark(meta, progress, blobs, repair=not dry_run)
    report = GcReport()
    found = await asyncio.to_thread(lambda: list(blobs.walk()))
    uploads = await asyncio.to_thread(blobs.scan_uploads)
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
        for upload in uploads.sessions:
            if upload.updated_at < abandoned:
                with contextlib.suppress(NotFound):  # committed or cancelled meanwhile
                    await asyncio.to_thread(blobs.cancel, upload.upload_id)
                    report.uploads_removed += 1
        # A damaged session can never be committed (its repository is unknown); one younger
        # than the grace period may still be an older replica's session being created.
        for broken in uploads.broken:
            if broken.updated_at < cutoff:
                log.warning("removing damaged upload session %s: %s", broken.name, broken.why)
                await asyncio.to_thread(blobs.remove_broken, broken.name)
                report.uploads_removed += 1
        # Not part of the mark: the index of links by blob completed (links an older version
        # wrote), and the counts a listing shows put right where hand edits made them wrong.
        # A compaction in the middle of the count's read only postpones it to the next run.
        if indexed := await meta.index_holders():
            log.info("indexed %d blob links by blob", indexed)
        try:
            await meta.recount_tags()
        except RevisionCompacted:
            log.warning("tag counts not checked: etcd compacted the revision being read")
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
