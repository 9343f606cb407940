"""gRPC servicer for berth.builder.v1: converts messages and calls the core, nothing more.

Errors raised by the core become status codes in the common interceptor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from berth.builder.v1 import builder_pb2 as pb
from berth.builder.v1 import builder_pb2_grpc
from berth.enums.containers import LOG_STREAMS
from berth.types.v1 import progress_pb2
from berthd.builder.cache import CacheRecord, cache_page
from berthd.builder.errors import context_invalid
from berthd.builder.executor import Builder
from berthd.builder.model import (
    BuildEvent,
    BuildOptions,
    BuildProgress,
    BuildResult,
    StepEvent,
    StepOutput,
)
from berthd.common.messages import progress, timestamp
from berthd.common.streaming import Done, progress_stream

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


def build_step(event: StepEvent) -> pb.BuildStep:
    step = progress(
        f"step/{event.number}", event.status, message=event.instruction, seconds=event.duration
    )
    message = pb.BuildStep(
        number=event.number,
        total=event.total,
        stage=event.stage,
        instruction=event.instruction,
        line=event.line,
        progress=step,
        layer_digest=event.layer_digest,
    )
    if event.exit_code is not None:
        message.exit_code = event.exit_code
    return message


def build_progress(event: BuildProgress) -> progress_pb2.Progress:
    return progress(
        event.id,
        event.state,
        current=event.current,
        total=event.total,
        unit="bytes" if event.bytes else "",
        message=event.message,
        seconds=event.duration,
    )


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
    if isinstance(item, StepOutput):
        return pb.BuildResponse(
            output=pb.BuildOutput(
                step=item.step, stream=LOG_STREAMS.value(item.stream), data=item.data
            )
        )
    if isinstance(item, BuildProgress):
        return pb.BuildResponse(progress=build_progress(item))
    return pb.BuildResponse(step=build_step(item))


def cache_entry(record: CacheRecord) -> pb.CacheEntry:
    return pb.CacheEntry(
        key=record.key,
        instruction=record.instruction,
        layer_digest=record.layer.digest if record.layer else "",
        size=record.size,
        created_at=timestamp(record.created_at),
        last_used_at=timestamp(record.last_used),
        uses=record.uses,
    )


async def context_chunks(rest: AsyncIterator[pb.BuildRequest]) -> AsyncIterator[bytes]:
    """The context bytes of the requests after the first; options again is an error."""
    async for message in rest:
        kind = message.WhichOneof("request")
        if kind == "options":
            raise context_invalid("only the first BuildRequest may carry options")
        if kind == "context" and message.context:
            yield message.context


# --- the servicer -----------------------------------------------------------------------------


class BuilderServicer(builder_pb2_grpc.BuilderServiceServicer):
    def __init__(self, builder: Builder) -> None:
        self.builder = builder

    async def Build(
        self, request_iterator: AsyncIterator[pb.BuildRequest], context: Context
    ) -> AsyncIterator[pb.BuildResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("request") != "options":
            raise context_invalid("the first BuildRequest must carry the options")
        options = build_options(first.options)
        chunks = context_chunks(request_iterator)

        def work(report: Callable[[BuildEvent], None]) -> Awaitable[BuildResult]:
            return self.builder.build(options, chunks, report)

        async for item in progress_stream(work):
            yield build_response(item)

    async def ListCache(
        self, request: pb.ListCacheRequest, context: Context
    ) -> pb.ListCacheResponse:
        records = await self.builder.cache.list()
        page, token = cache_page(records, request)
        return pb.ListCacheResponse(
            entries=[cache_entry(r) for r in page],
            total_bytes=sum({r.layer.digest: r.size for r in records if r.layer}.values()),
            next_page_token=token,
        )

    async def PruneCache(
        self, request: pb.PruneCacheRequest, context: Context
    ) -> pb.PruneCacheResponse:
        unused_for = request.unused_for.ToNanoseconds() / 1e9
        result = await self.builder.prune_cache(unused_for or None)
        return pb.PruneCacheResponse(
            deleted=len(result.deleted), reclaimed_bytes=result.bytes_freed
        )
