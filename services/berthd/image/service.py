"""gRPC servicer for berth.image.v1: converts messages and calls the core, nothing more.

Errors raised by the core become status codes in the common interceptor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable

import grpc

from berth.enums.image import ARCHIVE_FORMATS
from berth.image.v1 import image_pb2 as pb
from berth.image.v1 import image_pb2_grpc
from berth.types.v1 import progress_pb2, types_pb2
from berthd.common import messages
from berthd.common.errors import InvalidArgument
from berthd.common.idempotency import once
from berthd.common.messages import timestamp
from berthd.common.rpc.cluster import ClusterApi
from berthd.common.streaming import Done, progress_stream
from berthd.image import archive, commit, metrics, transfer
from berthd.image.archive import ArchiveFormat
from berthd.image.catalog import Catalog
from berthd.image.model import (
    Credentials,
    Event,
    HistoryStep,
    ImageDetail,
    ImageRow,
    Removal,
    Report,
    State,
    Unit,
)

Context = grpc.aio.ServicerContext
# While an upload arrives, its bytes are reported about this often.
UPLOAD_PROGRESS_BYTES = 1 << 20


# --- conversions ------------------------------------------------------------------------------


def history_entry(step: HistoryStep) -> pb.HistoryEntry:
    return pb.HistoryEntry(
        layer=step.layer,
        created_at=timestamp(step.created),
        created_by=step.created_by,
        size=step.size,
        comment=step.comment,
        empty_layer=step.empty_layer,
        author=step.author,
    )


def image_detail(image: ImageDetail) -> pb.ImageDetail:
    return pb.ImageDetail(
        digest=image.digest,
        id=image.id,
        repo_tags=image.repo_tags,
        repo_digests=image.repo_digests,
        media_type=image.media_type,
        manifest=image.manifest,
        config=image.config,
        layers=[
            types_pb2.Descriptor(
                media_type=layer.media_type,
                digest=layer.digest,
                size=layer.size,
                annotations=layer.annotations,
            )
            for layer in image.layers
        ],
        diff_ids=image.diff_ids,
        history=[history_entry(step) for step in image.history],
        created_at=timestamp(image.created),
        size=image.size,
        hosts=image.hosts,
        platform=image.platform,
        origin=image.origin,
        origin_detail=image.origin_detail,
    )


def image_row(row: ImageRow) -> pb.Image:
    return pb.Image(
        repository=row.repository,
        tag=row.tag,
        digest=row.digest,
        id=row.id,
        created_at=timestamp(row.created),
        size=row.size,
        shared_size=row.shared_size,
        hosts=list(row.hosts),
        containers=row.containers,
    )


def removal(result: Removal) -> pb.RemoveImageResponse:
    return pb.RemoveImageResponse(untagged=result.untagged, deleted=result.deleted)


def progress(event: Event) -> progress_pb2.Progress:
    return messages.progress(
        event.id,
        str(event.state),
        current=event.current,
        total=event.total,
        unit=str(event.unit),
        message=event.message,
        seconds=event.seconds,
    )


def archive_format(value: int) -> ArchiveFormat:
    """The archive module's name ("docker", "oci") for a SaveImages format."""
    name = ARCHIVE_FORMATS.name(value, "")
    if not name:
        raise InvalidArgument(
            f"unknown archive format {value}: expected {' or '.join(ARCHIVE_FORMATS.names)}",
            field="format",
        )
    return "oci" if name == "oci-archive" else "docker"


async def options_of(requests: AsyncIterator[object], call: str) -> object:
    """The options of an upload stream: its first message, which must carry them."""
    first = await anext(requests, None)
    if first is None or first.WhichOneof("content") != "options":  # type: ignore[attr-defined]
        what = "carried no message" if first is None else "did not start with the options"
        raise InvalidArgument(f"{call} stream {what}", field="options")
    return first.options  # type: ignore[attr-defined]


async def received(
    requests: AsyncIterator[object], call: str, report: Report
) -> AsyncIterator[bytes]:
    """The bytes of an upload stream after its options, reporting how many arrived ("upload",
    DOWNLOADING) as they arrive."""
    total = last = 0
    async for message in requests:
        if message.WhichOneof("content") == "options":  # type: ignore[attr-defined]
            raise InvalidArgument(
                f"{call}: only the first message may carry the options", field="options"
            )
        data = message.data  # type: ignore[attr-defined]
        total += len(data)
        if total - last >= UPLOAD_PROGRESS_BYTES:
            last = total
            report(Event("upload", State.DOWNLOADING, total))
        if data:
            yield data
    if total != last:
        report(Event("upload", State.DOWNLOADING, total))


def credentials(message: pb.Credentials) -> Credentials:
    return Credentials(message.username, message.password, message.identity_token)


# --- the servicer -----------------------------------------------------------------------------


class ImageServicer(image_pb2_grpc.ImageServiceServicer):
    def __init__(self, catalog: Catalog, cluster: ClusterApi) -> None:
        self.catalog = catalog
        self.cluster = cluster

    async def ListImages(
        self, request: pb.ListImagesRequest, context: Context
    ) -> pb.ListImagesResponse:
        rows, token = await self.catalog.list_page(
            request.reference,
            request.all,
            request.dangling_only,
            request.page_size,
            request.page_token,
        )
        return pb.ListImagesResponse(images=[image_row(row) for row in rows], next_page_token=token)

    async def GetImage(self, request: pb.GetImageRequest, context: Context) -> pb.GetImageResponse:
        return pb.GetImageResponse(image=image_detail(await self.catalog.inspect(request.image)))

    async def GetImageHistory(
        self, request: pb.GetImageHistoryRequest, context: Context
    ) -> pb.GetImageHistoryResponse:
        steps = await self.catalog.history(request.image)
        return pb.GetImageHistoryResponse(entries=[history_entry(step) for step in steps])

    async def TagImage(self, request: pb.TagImageRequest, context: Context) -> pb.TagImageResponse:
        return pb.TagImageResponse(digest=await self.catalog.tag(request.source, request.target))

    async def RemoveImage(
        self, request: pb.RemoveImageRequest, context: Context
    ) -> pb.RemoveImageResponse:
        return removal(await self.catalog.remove(request.image, request.force))

    async def PruneImages(
        self, request: pb.PruneImagesRequest, context: Context
    ) -> pb.PruneImagesResponse:
        removed, reclaimed = await self.catalog.prune(request.all)
        return pb.PruneImagesResponse(
            removed=[removal(r) for r in removed], reclaimed_bytes=reclaimed
        )

    async def CommitContainer(
        self, request: pb.CommitContainerRequest, context: Context
    ) -> AsyncIterator[pb.CommitContainerResponse]:
        def work(report: Report) -> Awaitable[ImageDetail]:
            return commit.commit(
                self.catalog,
                self.cluster,
                request.container,
                request.reference,
                request.author,
                request.message,
                request.pause,
                list(request.changes),
                report,
            )

        async for item in progress_stream(work):
            if isinstance(item, Done):
                yield pb.CommitContainerResponse(image=image_detail(item.result))
            else:
                yield pb.CommitContainerResponse(progress=progress(item))

    async def ImportImage(
        self, request_iterator: AsyncIterator[pb.ImportImageRequest], context: Context
    ) -> AsyncIterator[pb.ImportImageResponse]:
        options = await options_of(request_iterator, "ImportImage")
        assert isinstance(options, pb.ImportImageOptions)

        def work(report: Report) -> Awaitable[ImageDetail]:
            return commit.import_tarball(
                self.catalog,
                received(request_iterator, "ImportImage", report),
                options.reference,
                options.message,
                list(options.changes),
                options.source or "-",
                progress=report,
            )

        async for item in progress_stream(work):
            if isinstance(item, Done):
                yield pb.ImportImageResponse(image=image_detail(item.result))
            else:
                yield pb.ImportImageResponse(progress=progress(item))

    async def SaveImages(
        self, request: pb.SaveImagesRequest, context: Context
    ) -> AsyncIterator[pb.SaveImagesResponse]:
        if not request.images:
            raise InvalidArgument("name at least one image to save", field="images")
        # Counted here, not in the core: a save is done when its last byte has been sent.
        try:
            total, chunks = await archive.save_images(
                self.catalog, list(request.images), archive_format(request.format)
            )
            yield pb.SaveImagesResponse(
                progress=progress(Event("archive", State.RUNNING, 0, total, Unit.BYTES))
            )
            async for chunk in chunks:
                yield pb.SaveImagesResponse(data=chunk)
        except BaseException:
            metrics.SAVES.labels(metrics.ERROR).inc()
            raise
        metrics.SAVES.labels(metrics.OK).inc()

    async def LoadImages(
        self, request_iterator: AsyncIterator[pb.LoadImagesRequest], context: Context
    ) -> AsyncIterator[pb.LoadImagesResponse]:
        options = await options_of(request_iterator, "LoadImages")
        assert isinstance(options, pb.LoadImagesOptions)

        def work(report: Report) -> Awaitable[tuple[list[ImageDetail], list[str]]]:
            return archive.load_images(
                self.catalog,
                received(request_iterator, "LoadImages", report),
                options.reference,
                progress=report,
            )

        async for item in progress_stream(work):
            if isinstance(item, Done):
                images, references = item.result
                result = pb.LoadImagesResult(
                    images=[image_detail(i) for i in images], references=references
                )
                yield pb.LoadImagesResponse(result=result)
            else:
                yield pb.LoadImagesResponse(progress=progress(item))

    async def PullImage(
        self, request: pb.PullImageRequest, context: Context
    ) -> AsyncIterator[pb.PullImageResponse]:
        def work(report: Report) -> Awaitable[tuple[ImageDetail, str]]:
            return transfer.pull_external(
                self.catalog,
                request.image,
                credentials(request.credentials),
                request.insecure,
                request.local_reference,
                report,
            )

        async for item in progress_stream(work):
            if isinstance(item, Done):
                image, local = item.result
                result = pb.PullImageResult(image=image_detail(image), local_reference=local)
                yield pb.PullImageResponse(result=result)
            else:
                yield pb.PullImageResponse(progress=progress(item))

    async def PushImage(
        self, request: pb.PushImageRequest, context: Context
    ) -> AsyncIterator[pb.PushImageResponse]:
        def work(report: Report) -> Awaitable[pb.PushImageResult]:
            async def push() -> pb.PushImageResult:
                digest, size = await transfer.push_external(
                    self.catalog,
                    request.image,
                    request.destination,
                    credentials(request.credentials),
                    request.insecure,
                    report,
                )
                return pb.PushImageResult(digest=digest, size=size)

            # A retry of a finished push gets its stored result (and no progress); one of a
            # push in flight, ABORTED.
            return once(
                self.catalog.store,
                "image.PushImage",
                request.request_id,
                pb.PushImageResult,
                push,
            )

        async for item in progress_stream(work):
            if isinstance(item, Done):
                yield pb.PushImageResponse(result=item.result)
            else:
                yield pb.PushImageResponse(progress=progress(item))
