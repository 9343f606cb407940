"""gRPC servicer for berth.registry.v1: converts messages and calls the core, nothing more.

Errors raised by the core become status codes in the common interceptor, which also checks
the repositories a request names. What it cannot see is checked here, for the call's
principal: an upload session's repository (found from its id), a mount's source repository,
and which repositories a listing shows (berthd.registry.access).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable

import grpc

from berth.enums.registry import VISIBILITIES
from berth.registry.v1 import registry_pb2 as pb
from berth.registry.v1 import registry_pb2_grpc
from berth.types.v1 import progress_pb2, types_pb2
from berthd.common.errors import BerthError, InvalidArgument
from berthd.common.idempotency import once
from berthd.common.messages import progress, timestamp
from berthd.common.security.authorize import Authorizer
from berthd.common.security.permissions import Permission
from berthd.common.security.principal import current_principal
from berthd.common.streaming import Done, progress_stream
from berthd.registry import gc, metrics
from berthd.registry.access import MayPull, pull_filter
from berthd.registry.blobstore import BlobStat
from berthd.registry.core import Registry
from berthd.registry.metadata import ListedManifest, RepoRecord, TagRecord

Context = grpc.aio.ServicerContext
SERVICE = pb.DESCRIPTOR.services_by_name["RegistryService"].full_name


def descriptor(blob: BlobStat) -> types_pb2.Descriptor:
    return types_pb2.Descriptor(digest=blob.digest, size=blob.size)


def repository(record: RepoRecord) -> pb.Repository:
    return pb.Repository(
        name=record.name,
        description=record.description,
        labels=record.labels or None,  # an empty map costs a copy all the same
        tag_count=record.tag_count,
        created_at=timestamp(record.created_at),
        last_push_at=timestamp(record.last_push_at),
        visibility=VISIBILITIES.value(record.visibility),
    )


def visibility(value: int) -> str | None:
    """A request's visibility as the core's word; None for "leave it" (UNSPECIFIED)."""
    if value == pb.VISIBILITY_UNSPECIFIED:
        return None
    name = VISIBILITIES.name(value, "")
    if not name:
        raise InvalidArgument(
            f"unknown visibility {value}: VISIBILITY_PRIVATE or VISIBILITY_PUBLIC",
            reason="VISIBILITY_INVALID",
            field="visibility",
        )
    return name


def may_pull() -> MayPull | None:
    """Which repositories the call's principal may pull (None: all)."""
    return pull_filter(current_principal())


def tag(record: TagRecord) -> pb.Tag:
    return pb.Tag(name=record.name, digest=record.digest, pushed_at=timestamp(record.pushed_at))


def gc_progress(stage: gc.GcStage) -> progress_pb2.Progress:
    return progress(
        stage.stage,
        "done" if stage.done else "running",
        current=stage.current,
        total=stage.total,
        unit="items",
    )


def gc_result(report: gc.GcReport) -> pb.GarbageCollectResult:
    return pb.GarbageCollectResult(
        deleted=[descriptor(b) for b in report.deleted],
        reclaimed_bytes=report.reclaimed_bytes,
        blobs_marked=report.blobs_marked,
        blobs_young=report.blobs_young,
        uploads_removed=report.uploads_removed,
    )


def manifest_entry(entry: ListedManifest) -> pb.ManifestEntry:
    record = entry.record
    return pb.ManifestEntry(
        repository=entry.repository,
        digest=record.digest,
        media_type=record.media_type,
        size=record.size,
        references=record.references,
        tags=[tag(t) for t in entry.tags],
        pushed_at=timestamp(record.created_at),
    )


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, registry: Registry, authorizer: Authorizer) -> None:
        self.registry = registry
        self.authorizer = authorizer

    async def _check(self, permission: Permission, repository: str, method: str) -> None:
        await self.authorizer.check_repository(
            current_principal(), permission, repository, f"/{SERVICE}/{method}"
        )

    async def _check_upload(self, upload_id: str, method: str) -> None:
        """The caller may push to the session's repository (an unknown session fails as
        before, with UPLOAD_UNKNOWN: its id says nothing about any repository)."""
        info = await self.registry.upload_info(upload_id)
        await self._check(Permission.REPOSITORY_PUSH, info.repository, method)

    async def StartUpload(
        self, request: pb.StartUploadRequest, context: Context
    ) -> pb.StartUploadResponse:
        async def start() -> pb.StartUploadResponse:
            return pb.StartUploadResponse(
                upload_id=await self.registry.start_upload(request.repository)
            )

        return await once(
            self.registry.meta.store,
            "registry.StartUpload",
            request.request_id,
            pb.StartUploadResponse,
            start,
        )

    async def WriteUpload(
        self, request_iterator: AsyncIterator[pb.WriteUploadRequest], context: Context
    ) -> pb.WriteUploadResponse:
        writer = None
        metrics.UPLOADS_IN_PROGRESS.inc()
        try:
            async for chunk in request_iterator:
                if writer is None:
                    await self._check_upload(chunk.upload_id, "WriteUpload")
                    writer = await asyncio.to_thread(
                        self.registry.blobs.open_writer, chunk.upload_id
                    )
                elif chunk.upload_id != writer.upload_id:
                    raise InvalidArgument(
                        "every chunk of a WriteUpload stream must name one upload",
                        field="upload_id",
                    )
                await asyncio.to_thread(writer.write, chunk.offset, chunk.data)
                metrics.BYTES_RECEIVED.inc(len(chunk.data))
            if writer is None:
                raise InvalidArgument("WriteUpload stream carried no chunk")
            # The offset is only promised once durable: a failed fsync fails the call.
            await asyncio.shield(asyncio.to_thread(writer.close))
            return pb.WriteUploadResponse(offset=writer.offset)
        finally:
            metrics.UPLOADS_IN_PROGRESS.dec()
            if writer is not None:
                # Shielded: when the client hangs up, this task is cancelled, and an unshielded
                # executor job still queued would never run, leaving the session locked. The
                # call already failed here (or closed above): its first error is the one to tell.
                with contextlib.suppress(BerthError):
                    await asyncio.shield(asyncio.to_thread(writer.close))

    async def GetUpload(
        self, request: pb.GetUploadRequest, context: Context
    ) -> pb.GetUploadResponse:
        await self._check_upload(request.upload_id, "GetUpload")
        info = await self.registry.upload_info(request.upload_id)
        return pb.GetUploadResponse(
            upload_id=info.upload_id,
            repository=info.repository,
            offset=info.offset,
            started_at=timestamp(info.started_at),
        )

    async def CommitUpload(
        self, request: pb.CommitUploadRequest, context: Context
    ) -> pb.CommitUploadResponse:
        await self._check_upload(request.upload_id, "CommitUpload")
        blob, existed = await self.registry.commit_upload(request.upload_id, request.digest)
        return pb.CommitUploadResponse(descriptor=descriptor(blob), deduplicated=existed)

    async def CancelUpload(
        self, request: pb.CancelUploadRequest, context: Context
    ) -> pb.CancelUploadResponse:
        await self._check_upload(request.upload_id, "CancelUpload")
        await self.registry.cancel_upload(request.upload_id)
        return pb.CancelUploadResponse()

    async def StatBlob(self, request: pb.StatBlobRequest, context: Context) -> pb.StatBlobResponse:
        blob = await self.registry.stat_blob(request.repository, request.digest)
        return pb.StatBlobResponse(descriptor=descriptor(blob))

    async def ReadBlob(
        self, request: pb.ReadBlobRequest, context: Context
    ) -> AsyncIterator[pb.ReadBlobResponse]:
        chunks = await self.registry.read_blob(
            request.repository, request.digest, request.offset, request.length
        )
        async for chunk in chunks:
            yield pb.ReadBlobResponse(
                offset=chunk.offset, data=chunk.data, total_size=chunk.total_size
            )

    async def MountBlob(
        self, request: pb.MountBlobRequest, context: Context
    ) -> pb.MountBlobResponse:
        if request.from_repository:
            await self._check(Permission.REPOSITORY_PULL, request.from_repository, "MountBlob")
        blob = await self.registry.mount_blob(
            request.repository, request.digest, request.from_repository, may_pull()
        )
        if blob is None:
            return pb.MountBlobResponse(mounted=False)
        return pb.MountBlobResponse(mounted=True, descriptor=descriptor(blob))

    async def PutManifest(
        self, request: pb.PutManifestRequest, context: Context
    ) -> pb.PutManifestResponse:
        digest, size = await self.registry.put_manifest(
            request.repository, request.reference, request.media_type, request.content
        )
        return pb.PutManifestResponse(digest=digest, size=size)

    async def GetManifest(
        self, request: pb.GetManifestRequest, context: Context
    ) -> pb.GetManifestResponse:
        manifest = await self.registry.get_manifest(request.repository, request.reference)
        return pb.GetManifestResponse(
            digest=manifest.digest, media_type=manifest.media_type, content=manifest.content
        )

    async def BatchGetManifests(
        self, request: pb.BatchGetManifestsRequest, context: Context
    ) -> pb.BatchGetManifestsResponse:
        names = [(name.repository, name.digest) for name in request.manifests]
        found = await self.registry.get_manifests(names, request.include_configs, may_pull())
        return pb.BatchGetManifestsResponse(
            results=[
                pb.BatchManifest(
                    repository=m.repository,
                    digest=m.digest,
                    found=m.found,
                    media_type=m.media_type,
                    content=m.content,
                    config=m.config,
                )
                for m in found
            ]
        )

    async def DeleteManifest(
        self, request: pb.DeleteManifestRequest, context: Context
    ) -> pb.DeleteManifestResponse:
        digest, tags = await self.registry.delete_manifest(request.repository, request.reference)
        return pb.DeleteManifestResponse(digest=digest, deleted_tags=tags)

    async def ListRepositories(
        self, request: pb.ListRepositoriesRequest, context: Context
    ) -> pb.ListRepositoriesResponse:
        records, token = await self.registry.list_repositories(
            request.page_size, request.page_token, may_pull()
        )
        return pb.ListRepositoriesResponse(
            repositories=[repository(r) for r in records], next_page_token=token
        )

    async def GetRepository(
        self, request: pb.GetRepositoryRequest, context: Context
    ) -> pb.GetRepositoryResponse:
        record = await self.registry.get_repository(request.repository)
        return pb.GetRepositoryResponse(repository=repository(record))

    async def UpdateRepository(
        self, request: pb.UpdateRepositoryRequest, context: Context
    ) -> pb.UpdateRepositoryResponse:
        record = await self.registry.update_repository(
            request.repository,
            request.description if request.HasField("description") else None,
            dict(request.labels),
            request.replace_labels,
            visibility(request.visibility),
        )
        return pb.UpdateRepositoryResponse(repository=repository(record))

    async def ListTags(self, request: pb.ListTagsRequest, context: Context) -> pb.ListTagsResponse:
        tags, token = await self.registry.list_tags(
            request.repository, request.page_size, request.page_token
        )
        return pb.ListTagsResponse(tags=[tag(t) for t in tags], next_page_token=token)

    async def ListManifests(
        self, request: pb.ListManifestsRequest, context: Context
    ) -> pb.ListManifestsResponse:
        entries, token = await self.registry.list_manifests(
            request.repository, request.page_size, request.page_token, may_pull()
        )
        return pb.ListManifestsResponse(
            manifests=[manifest_entry(e) for e in entries], next_page_token=token
        )

    async def DeleteTag(
        self, request: pb.DeleteTagRequest, context: Context
    ) -> pb.DeleteTagResponse:
        return pb.DeleteTagResponse(
            digest=await self.registry.delete_tag(request.repository, request.tag)
        )

    async def Search(self, request: pb.SearchRequest, context: Context) -> pb.SearchResponse:
        results, token = await self.registry.search(
            request.term, dict(request.labels), request.page_size, request.page_token, may_pull()
        )
        return pb.SearchResponse(results=[repository(r) for r in results], next_page_token=token)

    async def GarbageCollect(
        self, request: pb.GarbageCollectRequest, context: Context
    ) -> AsyncIterator[pb.GarbageCollectResponse]:
        # min_age set (0 included) is used as given; grace_period's 0 is "unset" for
        # clients written before min_age existed.
        field = "min_age" if request.HasField("min_age") else "grace_period"
        grace: float | None = getattr(request, field).ToTimedelta().total_seconds()
        if grace is not None and grace < 0:
            raise InvalidArgument(f"{field} must not be negative", field=field)
        if field == "grace_period" and not grace:
            grace = None

        def work(report: gc.GcProgress) -> Awaitable[gc.GcReport]:
            return gc.collect(
                self.registry.blobs,
                self.registry.meta,
                dry_run=request.dry_run,
                grace_seconds=grace,
                progress=report,
            )

        async for item in progress_stream(work):
            if isinstance(item, Done):
                yield pb.GarbageCollectResponse(result=gc_result(item.result))
            else:
                yield pb.GarbageCollectResponse(progress=gc_progress(item))
