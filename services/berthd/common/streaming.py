"""Turn a long operation that reports progress through a callback into a server stream; read
the bytes of a client stream; split a session's requests (a `start`, then `input`s); run jobs
a few at a time.

Core functions take a `progress(event)` callback and return a result; a streaming RPC wants
an async iterator of events followed by the result. `progress_stream` bridges the two, from
any thread (blocking work in `asyncio.to_thread` reports from its worker thread), and cancels
the operation if the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from berthd.common.errors import InvalidArgument, ResourceExhausted

E = TypeVar("E")
R = TypeVar("R")


@dataclass(frozen=True)
class Done(Generic[R]):
    """The last item of a progress stream: what the operation returned."""

    result: R


async def progress_stream(
    work: Callable[[Callable[[E], None]], Awaitable[R]],
) -> AsyncIterator[E | Done[R]]:
    """Run work(progress) and yield every event it reports, then Done(result). An exception of
    work is raised here, after the events reported before it."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[E | None] = asyncio.Queue()

    def report(event: E) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    task = asyncio.ensure_future(work(report))
    # Queued after every event already scheduled from threads, so none is lost at the end.
    task.add_done_callback(lambda _: loop.call_soon(events.put_nowait, None))
    try:
        while (event := await events.get()) is not None:
            yield event
        yield Done(await task)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def upload_chunks(
    first: object, rest: AsyncIterator[object], field: str = "data"
) -> AsyncIterator[bytes]:
    """The bytes of a client stream whose first message (already read: it also carries the
    options) may carry some: `field` of every message, empty ones skipped."""
    if data := getattr(first, field):
        yield data
    async for message in rest:
        if data := getattr(message, field):
            yield data


async def spool_upload(
    chunks: AsyncIterator[bytes], path: Path, max_bytes: int, too_large: str
) -> int:
    """Write an upload's bytes to `path` (off the event loop); returns how many there were.
    Past `max_bytes` it stops with ResourceExhausted(too_large); the caller removes `path`."""
    size = 0
    with open(path, "wb") as out:
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise ResourceExhausted(too_large)
            await asyncio.to_thread(out.write, chunk)
    return size


async def session_start(requests: AsyncIterator[Any], rpc: str) -> Any:
    """The `start` of a session's request stream (Exec, AttachContainer: a `oneof request` of
    `start`, then `input`s); INVALID_ARGUMENT when the stream begins otherwise."""
    first = await anext(aiter(requests), None)
    if first is None or first.WhichOneof("request") != "start":
        raise InvalidArgument(f"the first {rpc} message must be the start", field="start")
    return first.start


async def session_inputs(requests: AsyncIterator[Any], rpc: str) -> AsyncIterator[Any]:
    """The `input`s that follow the start (berth.types.v1.ProcessInput); a second start is
    INVALID_ARGUMENT."""
    async for request in requests:
        kind = request.WhichOneof("request")
        if kind == "start":
            raise InvalidArgument(f"only the first {rpc} message may be the start", field="start")
        if kind == "input":
            yield request.input


async def run_limited(jobs: Iterable[Callable[[], Awaitable[object]]], limit: int) -> None:
    """Run every job, `limit` at a time. The first failure cancels the others and is raised as
    itself (not as an ExceptionGroup), so callers keep their errors' meaning."""
    slots = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[object]]) -> None:
        async with slots:
            await job()

    try:
        async with asyncio.TaskGroup() as group:
            for job in jobs:
                group.create_task(one(job))
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
