"""gRPC servicer for berth.builder.v1: converts messages and calls the core, nothing more.

Errors raised by the core become status codes in the common interceptor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.duration_pb2 import Duration

from berth.builder.v1 import builder_pb2 as pb
from berth.builder.v1 import builder_pb2_grpc
from berth.enums.builder import STEP_STATUSES
from berthd.builder.cache import CacheRecord
from berthd.builder.executor import Builder
from berthd.builder.model import (
    BuildEvent,
    BuildMessage,
    BuildOptions,
    BuildResult,
    StepEvent,
)
from berthd.common.errors import InvalidArgument
from berthd.common.messages import timestamp
from berthd.common.streaming import Done, progress_stream, upload_chunks

Context = grpc.aio.ServicerContext

# --- conversions ------------------------------------------------------------------------------


def build_options(message: pb.BuildOptions) -> BuildOptions:
    return BuildOptions(
        dockerfile=message.dockerfile or "Dockerfile",
        dockerfile_content=message.dockerfile_content,
        build_args=dict(message.build_args),
        target=message.target,
        tags=list(message.tags),
        no_cache=message.no_cache,
        labels=dict(message.labels),
    )


def duration(seconds: float) -> Duration:
    message = Duration()
    message.FromNanoseconds(round(seconds * 1e9))
    return message


def step_event(event: StepEvent) -> pb.StepEvent:
    message = pb.StepEvent(
        number=event.number,
        total=event.total,
        stage=event.stage,
        instruction=event.instruction,
        line=event.line,
        status=STEP_STATUSES.value(event.status),
        output=event.output,
        layer=event.layer,
        exit_code=event.exit_code,
    )
    if event.duration is not None:
        message.duration.CopyFrom(duration(event.duration))
    return message


def build_response(item: BuildEvent | Done[BuildResult]) -> pb.BuildResponse:
    if isinstance(item, Done):
        r = item.result
        return pb.BuildResponse(
            result=pb.BuildResult(
                digest=r.digest,
                id=r.id,
                tags=r.tags,
                cached_steps=r.cached_steps,
                total_steps=r.total_steps,
            )
        )
    if isinstance(item, BuildMessage):
        return pb.BuildResponse(message=item.text)
    return pb.BuildResponse(step=step_event(item))


def cache_entry(record: CacheRecord) -> pb.CacheEntry:
    return pb.CacheEntry(
        key=record.key,
        instruction=record.instruction,
        layer=record.layer.digest if record.layer else "",
        size=record.size,
        created=timestamp(record.created_at),
        last_used=timestamp(record.last_used),
        uses=record.uses,
    )


# --- the servicer -----------------------------------------------------------------------------


class BuilderServicer(builder_pb2_grpc.BuilderServiceServicer):
    def __init__(self, builder: Builder) -> None:
        self.builder = builder

    async def Build(
        self, request_iterator: AsyncIterator[pb.BuildRequest], context: Context
    ) -> AsyncIterator[pb.BuildResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            raise InvalidArgument("Build stream carried no message")
        options = build_options(first.options)
        chunks = upload_chunks(first, request_iterator, field="context")

        def work(report: Callable[[BuildEvent], None]) -> Awaitable[BuildResult]:
            return self.builder.build(options, chunks, report)

        async for item in progress_stream(work):
            yield build_response(item)

    async def ListCache(
        self, request: pb.ListCacheRequest, context: Context
    ) -> pb.ListCacheResponse:
        records = await self.builder.cache.list()
        return pb.ListCacheResponse(
            entries=[cache_entry(r) for r in records],
            total_size=sum({r.layer.digest: r.size for r in records if r.layer}.values()),
        )

    async def PruneCache(
        self, request: pb.PruneCacheRequest, context: Context
    ) -> pb.PruneCacheResponse:
        unused_for = request.unused_for.ToNanoseconds() / 1e9
        result = await self.builder.prune_cache(unused_for or None)
        return pb.PruneCacheResponse(
            deleted=len(result.deleted), space_reclaimed=result.bytes_freed
        )
