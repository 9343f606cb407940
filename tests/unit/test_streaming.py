"""berthd.common.streaming: a progress callback as a server stream, and upload streams."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from berthd.common.streaming import Done, progress_stream, run_limited, upload_chunks


async def test_events_from_threads_come_before_the_result() -> None:
    async def work(report: Callable[[int], None]) -> str:
        def in_thread() -> None:
            for n in range(50):
                report(n)

        await asyncio.to_thread(in_thread)
        return "done"

    items = [item async for item in progress_stream(work)]
    assert items[:-1] == list(range(50))
    assert items[-1] == Done("done")


async def test_a_failure_comes_after_the_events_reported_before_it() -> None:
    async def work(report: Callable[[str], None]) -> None:
        report("started")
        raise ValueError("broken")

    seen: list[object] = []
    with pytest.raises(ValueError, match="broken"):
        async for item in progress_stream(work):
            seen.append(item)
    assert seen == ["started"]


async def test_a_consumer_that_stops_cancels_the_work() -> None:
    cancelled = threading.Event()

    async def work(report: Callable[[int], None]) -> None:
        report(1)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    stream = progress_stream(work)
    assert await anext(stream) == 1
    await stream.aclose()
    assert cancelled.is_set()


@dataclass
class Message:
    data: bytes = b""
    context: bytes = b""


async def test_upload_chunks_takes_the_first_message_and_skips_empty_ones() -> None:
    async def rest() -> AsyncIterator[Message]:
        for message in (Message(b"b"), Message(), Message(b"c")):
            yield message

    assert [c async for c in upload_chunks(Message(b"a"), rest())] == [b"a", b"b", b"c"]
    first = Message(context=b"x")
    assert [c async for c in upload_chunks(first, rest(), field="context")] == [b"x"]


async def test_run_limited_keeps_to_its_limit_and_raises_the_first_failure_as_itself() -> None:
    running = peak = 0

    async def job() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1

    await run_limited([job] * 10, 3)
    assert peak == 3

    async def failing() -> None:
        raise KeyError("the blob")

    with pytest.raises(KeyError, match="the blob"):
        await run_limited([job, failing, job], 2)
