"""gRPC servicer for berth.image.v1: converts messages and calls the core, nothing more.

Errors raised by the core become status codes in the common interceptor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from berth.enums.image import ARCHIVE_FORMATS, COMMIT_STAGES, TRANSFER_STATES
from berth.image.v1 import image_pb2 as pb
from berth.image.v1 import image_pb2_grpc
from berth.types.v1 import types_pb2
from berthd.common.errors import InvalidArgument
from berthd.common.messages import timestamp
from berthd.common.rpc.cluster import ClusterApi
from berthd.common.streaming import Done, progress_stream, upload_chunks
from berthd.image import archive, commit, metrics, transfer
from berthd.image.archive import ArchiveFormat
from berthd.image.catalog import Catalog
from berthd.image.model import (
    Credentials,
    HistoryStep,
    ImageDetail,
    ImageRow,
    LayerEvent,
    LayerProgress,
    Removal,
)

Context = grpc.aio.ServicerContext


# --- conversions ------------------------------------------------------------------------------


def history_entry(step: HistoryStep) -> pb.HistoryEntry:
    return pb.HistoryEntry(
        layer=step.layer,
        created=timestamp(step.created),
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
        created=timestamp(image.created),
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
        created=timestamp(row.created),
        size=row.size,
        shared_size=row.shared_size,
        hosts=list(row.hosts),
        containers=row.containers,
    )


def removal(result: Removal) -> pb.RemoveImageResponse:
    return pb.RemoveImageResponse(untagged=result.untagged, deleted=result.deleted)


def layer_progress(event: LayerEvent) -> pb.LayerProgress:
    return pb.LayerProgress(
        digest=event.digest,
        state=TRANSFER_STATES.value(event.state.name.lower()),
        current=event.current,
        total=event.total,
        config=event.config,
        mounted_from=event.mounted_from,
    )


def archive_format(value: int) -> ArchiveFormat:
    """The archive module's name ("docker", "oci") for a SaveImages format."""
    name = ARCHIVE_FORMATS.name(value, "")
    if not name:
        raise InvalidArgument(
            f"unknown archive format {value}: expected {' or '.join(ARCHIVE_FORMATS.names)}"
        )
    return "oci" if name == "oci-archive" else "docker"


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
        rows = await self.catalog.list(request.reference, request.all, request.dangling_only)
        return pb.ListImagesResponse(images=[image_row(row) for row in rows])

    async def InspectImage(
        self, request: pb.InspectImageRequest, context: Context
    ) -> pb.InspectImageResponse:
        return pb.InspectImageResponse(
            image=image_detail(await self.catalog.inspect(request.image))
        )

    async def ImageHistory(
        self, request: pb.ImageHistoryRequest, context: Context
    ) -> pb.ImageHistoryResponse:
        steps = await self.catalog.history(request.image)
        return pb.ImageHistoryResponse(entries=[history_entry(step) for step in steps])

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
            removed=[removal(r) for r in removed], space_reclaimed=reclaimed
        )

    async def CommitContainer(
        self, request: pb.CommitContainerRequest, context: Context
    ) -> AsyncIterator[pb.CommitContainerResponse]:
        def work(report: Callable[[tuple[str, str]], None]) -> Awaitable[ImageDetail]:
            return commit.commit(
                self.catalog,
                self.cluster,
                request.container,
                request.reference,
                request.author,
                request.message,
                request.pause,
                list(request.changes),
                lambda stage, text: report((stage, text)),
            )

        async for item in progress_stream(work):
            if isinstance(item, Done):
                yield pb.CommitContainerResponse(
                    stage=pb.COMMIT_STAGE_DONE, image=image_detail(item.result)
                )
            else:
                stage, text = item
                yield pb.CommitContainerResponse(stage=COMMIT_STAGES.value(stage), message=text)

    async def ImportImage(
        self, request_iterator: AsyncIterator[pb.ImportImageRequest], context: Context
    ) -> pb.ImportImageResponse:
        first = await anext(request_iterator, None)
        if first is None:
            raise InvalidArgument("ImportImage stream carried no message")
        image = await commit.import_tarball(
            self.catalog,
            upload_chunks(first, request_iterator),
            first.reference,
            first.message,
            list(first.changes),
            first.source or "-",
        )
        return pb.ImportImageResponse(image=image_detail(image))

    async def SaveImages(
        self, request: pb.SaveImagesRequest, context: Context
    ) -> AsyncIterator[pb.SaveImagesResponse]:
        if not request.images:
            raise InvalidArgument("name at least one image to save")
        # Counted here, not in the core: a save is done when its last byte has been sent.
        try:
            total, chunks = await archive.save_images(
                self.catalog, list(request.images), archive_format(request.format)
            )
            first = True
            async for chunk in chunks:
                yield pb.SaveImagesResponse(data=chunk, total_size=total if first else 0)
                first = False
        except BaseException:
            metrics.SAVES.labels(metrics.ERROR).inc()
            raise
        metrics.SAVES.labels(metrics.OK).inc()

    async def LoadImages(
        self, request_iterator: AsyncIterator[pb.LoadImagesRequest], context: Context
    ) -> pb.LoadImagesResponse:
        first = await anext(request_iterator, None)
        if first is None:
            raise InvalidArgument("LoadImages stream carried no message")
        images, references = await archive.load_images(
            self.catalog, upload_chunks(first, request_iterator), first.reference
        )
        return pb.LoadImagesResponse(
            images=[image_detail(i) for i in images], references=references
        )

    async def PullImage(
        self, request: pb.PullImageRequest, context: Context
    ) -> AsyncIterator[pb.PullImageResponse]:
        def work(report: LayerProgress) -> Awaitable[tuple[ImageDetail, str]]:
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
                yield pb.PullImageResponse(image=image_detail(image), local_reference=local)
            else:
                yield pb.PullImageResponse(progress=layer_progress(item))

    async def PushImage(
        self, request: pb.PushImageRequest, context: Context
    ) -> AsyncIterator[pb.PushImageResponse]:
        def work(report: LayerProgress) -> Awaitable[tuple[str, int]]:
            return transfer.push_external(
                self.catalog,
                request.image,
                request.destination,
                credentials(request.credentials),
                request.insecure,
                report,
            )

        async for item in progress_stream(work):
            if isinstance(item, Done):
                digest, size = item.result
                yield pb.PushImageResponse(digest=digest, size=size)
            else:
                yield pb.PushImageResponse(progress=layer_progress(item))
