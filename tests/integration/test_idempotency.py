"""`request_id` keys in real etcd: a retried mutation returns the first result, a concurrent one
is ABORTED, a failed one can be retried, and without a key nothing is remembered."""

from __future__ import annotations

import asyncio

import pytest

from berth.types.v1 import types_pb2
from berthd.common import idempotency
from berthd.common.errors import Aborted, InvalidArgument, NotFound
from berthd.common.store import Store


def _counting(calls: list[int], digest: str = "sha256:ab"):
    async def work() -> types_pb2.Descriptor:
        calls.append(1)
        return types_pb2.Descriptor(digest=f"{digest}-{len(calls)}", size=len(calls))

    return work


async def test_a_retry_gets_the_first_result(store: Store) -> None:
    calls: list[int] = []
    first = await idempotency.once(store, "t/Run", "r1", types_pb2.Descriptor, _counting(calls))
    again = await idempotency.once(store, "t/Run", "r1", types_pb2.Descriptor, _counting(calls))
    assert again == first and len(calls) == 1
    # Another scope or another id is another request.
    await idempotency.once(store, "t/Other", "r1", types_pb2.Descriptor, _counting(calls))
    await idempotency.once(store, "t/Run", "r2", types_pb2.Descriptor, _counting(calls))
    assert len(calls) == 3


async def test_an_empty_result_is_remembered_too(store: Store) -> None:
    calls: list[int] = []

    async def empty() -> types_pb2.Descriptor:
        calls.append(1)
        return types_pb2.Descriptor()

    for _ in range(2):
        assert await idempotency.once(store, "t", "e", types_pb2.Descriptor, empty) == (
            types_pb2.Descriptor()
        )
    assert len(calls) == 1


async def test_a_request_in_flight_is_aborted(store: Store) -> None:
    working = asyncio.Event()  # the first call claimed the request_id and does its work
    release = asyncio.Event()

    async def slow() -> types_pb2.Descriptor:
        working.set()
        await release.wait()
        return types_pb2.Descriptor(size=7)

    first = asyncio.create_task(idempotency.once(store, "t", "busy", types_pb2.Descriptor, slow))
    await asyncio.wait_for(working.wait(), 30)
    with pytest.raises(Aborted) as raised:
        await idempotency.once(store, "t", "busy", types_pb2.Descriptor, slow)
    assert raised.value.reason == "REQUEST_IN_PROGRESS"
    release.set()
    assert (await first).size == 7


async def test_a_failed_request_can_be_retried(store: Store) -> None:
    async def fails() -> types_pb2.Descriptor:
        raise NotFound("no such image")

    with pytest.raises(NotFound):
        await idempotency.once(store, "t", "f", types_pb2.Descriptor, fails)
    calls: list[int] = []
    done = await idempotency.once(store, "t", "f", types_pb2.Descriptor, _counting(calls))
    assert len(calls) == 1 and done.size == 1


async def test_no_request_id_runs_every_time_and_bad_ids_are_refused(store: Store) -> None:
    calls: list[int] = []
    for _ in range(2):
        await idempotency.once(store, "t", "", types_pb2.Descriptor, _counting(calls))
    assert len(calls) == 2
    assert await store.list("requests/") == []
    for bad in ("a/b", "x" * 129):
        with pytest.raises(InvalidArgument):
            await idempotency.once(store, "t", bad, types_pb2.Descriptor, _counting(calls))
