"""`request_id` keys in real etcd: a retried mutation returns the first result, a concurrent one
is ABORTED, a failed one can be retried, and without a key nothing is remembered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from berth.types.v1 import types_pb2
from berthd.common import idempotency
from berthd.common.errors import Aborted, InvalidArgument, NotFound, Unavailable
from berthd.common.store import Store

from .conftest import ClusterCA
from .own_etcd import OwnEtcd

# A guard only: the retry loops below end on the event itself (the claim gone).
GUARD = 60


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


@pytest.fixture
async def own_store(
    tmp_path: Path, cluster_ca: ClusterCA, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[OwnEtcd, Store]]:
    """A store on an etcd of the test's own, to kill mid-call; claims live 2 s here."""
    monkeypatch.setattr(idempotency, "CLAIM_TTL", 2)
    etcd = OwnEtcd(tmp_path / "etcd", cluster_ca)
    etcd.directory.mkdir()
    etcd.start()
    store = Store(etcd.endpoint, "/idempotency/")
    await store.connect()
    try:
        yield etcd, store
    finally:
        await store.close()
        etcd.stop()


async def retry_until_done(store: Store, request_id: str, calls: list[int]) -> types_pb2.Descriptor:
    """Retry as a client does on ABORTED (REQUEST_IN_PROGRESS) or UNAVAILABLE (etcd coming
    back), until the call is done."""
    deadline = time.monotonic() + GUARD
    while True:
        try:
            return await idempotency.once(
                store, "t", request_id, types_pb2.Descriptor, _counting(calls)
            )
        except (Aborted, Unavailable):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_etcd_failing_before_the_result_is_recorded_leaves_no_claim_for_ever(
    own_store: tuple[OwnEtcd, Store],
) -> None:
    """Before: etcd failing between the claim and the completion left the claim for 24 h, and
    every retry with that request_id was ABORTED until then."""
    etcd, store = own_store

    async def work_then_etcd_dies() -> types_pb2.Descriptor:
        await asyncio.to_thread(etcd.kill)
        return types_pb2.Descriptor(size=1)

    with pytest.raises(Unavailable) as lost:
        await idempotency.once(store, "t", "lost", types_pb2.Descriptor, work_then_etcd_dies)
    assert lost.value.reason == "ETCD_UNAVAILABLE"
    await asyncio.to_thread(etcd.start)
    calls: list[int] = []
    # The first call's outcome is unknown to its client (UNAVAILABLE), so its retry does the
    # work once the claim has expired.
    done = await retry_until_done(store, "lost", calls)
    assert (len(calls), done.size) == (1, 1)
    # And that result is remembered as any other.
    again = await idempotency.once(store, "t", "lost", types_pb2.Descriptor, _counting(calls))
    assert again == done and len(calls) == 1


async def test_a_failed_call_whose_release_etcd_refuses_reports_its_own_error(
    own_store: tuple[OwnEtcd, Store],
) -> None:
    etcd, store = own_store

    async def etcd_dies_then_work_fails() -> types_pb2.Descriptor:
        await asyncio.to_thread(etcd.kill)
        raise NotFound("no such image")

    # The call's own error, not the failed release's.
    with pytest.raises(NotFound):
        await idempotency.once(
            store, "t", "failed", types_pb2.Descriptor, etcd_dies_then_work_fails
        )
    await asyncio.to_thread(etcd.start)
    calls: list[int] = []
    assert (await retry_until_done(store, "failed", calls)).size == 1
    assert len(calls) == 1


async def test_a_long_call_keeps_its_claim(own_store: tuple[OwnEtcd, Store]) -> None:
    """The claim's lease is kept alive while the work runs, however long: a key on a lease of
    the same TTL, granted after the claim, expires twice over while the claim stays."""
    _, store = own_store
    release = asyncio.Event()

    async def slow() -> types_pb2.Descriptor:
        await release.wait()
        return types_pb2.Descriptor(size=9)

    first = asyncio.create_task(idempotency.once(store, "t", "long", types_pb2.Descriptor, slow))
    deadline = time.monotonic() + GUARD
    while await store.get("requests/t/long") is None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    for n in range(2):
        witness = await store.grant_lease(idempotency.CLAIM_TTL)
        await store.put(f"witness/{n}", b"", lease=witness)
        while await store.get(f"witness/{n}") is not None:  # etcd expires it
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        with pytest.raises(Aborted):
            await idempotency.once(store, "t", "long", types_pb2.Descriptor, _counting([]))
    release.set()
    assert (await first).size == 9
    assert (await store.get("requests/t/long")).value.startswith(idempotency.DONE)
