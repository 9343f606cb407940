"""A real etcd store that counts its reads: the scale tests (issue 14) assert that a question
about one thing reads that thing, not the family it belongs to."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

from berthd.common import idempotency
from berthd.common.store import GET_MANY_BATCH, Entry, Page, Store, WatchEvent

S = TypeVar("S", bound=Store)


@contextlib.asynccontextmanager
async def opened(kind: type[S], endpoint: str, prefix: str) -> AsyncIterator[S]:
    """A connected store of `kind` on the test's prefix; on the way out its request_id claims'
    keeper stopped, the prefix emptied and the store closed."""
    store = kind(endpoint, prefix)
    await store.connect()
    try:
        yield store
    finally:
        await idempotency.close(store)
        await store.delete_prefix("")
        await store.close()


class CountingStore(Store):
    """A real store that counts the reads it makes and the records they return, and the
    events its watches deliver."""

    reads = 0
    records = 0

    def _counted(self, found: int) -> None:
        self.reads += 1
        self.records += found

    async def get(self, key: str) -> Entry | None:
        entry = await super().get(key)
        self._counted(entry is not None)
        return entry

    async def get_at(self, key: str) -> tuple[Entry | None, int]:
        entry, revision = await super().get_at(key)
        self._counted(entry is not None)
        return entry, revision

    async def get_many(self, keys):  # type: ignore[no-untyped-def]
        # One read per transaction it makes (a hundred keys each).
        entries = await super().get_many(keys)
        self.reads += -(-len(keys) // GET_MANY_BATCH)
        self.records += sum(entry is not None for entry in entries)
        return entries

    async def list(self, prefix: str, **kw) -> list[Entry]:  # type: ignore[override]
        entries = await super().list(prefix, **kw)
        self._counted(len(entries))
        return entries

    async def range(self, start: str, end: str, **kw) -> Page:  # type: ignore[override]
        page = await super().range(start, end, **kw)
        self._counted(len(page.entries))
        return page

    async def snapshot(self, prefix: str) -> tuple[list[Entry], int]:
        entries, revision = await super().snapshot(prefix)
        self._counted(len(entries))
        return entries, revision

    async def count(self, prefix: str) -> int:
        self._counted(0)
        return await super().count(prefix)

    # Events its watches delivered (what wakes a watcher), counted apart from reads.
    watched = 0

    async def _watch(  # type: ignore[override]
        self, start: bytes, end: bytes, start_revision: int | None
    ) -> AsyncIterator[WatchEvent]:
        async for event in super()._watch(start, end, start_revision):
            self.watched += 1
            yield event


class RequestCountingStore(CountingStore):
    """A CountingStore that counts its writes and lease calls too (`writes`): what one call
    costs etcd in round trips."""

    writes = 0

    async def put(self, key: str, value: bytes, lease: int | None = None) -> None:
        self.writes += 1
        await super().put(key, value, lease)

    async def delete(self, key: str) -> bool:
        self.writes += 1
        return await super().delete(key)

    async def txn(self, compare, success, failure=()):  # type: ignore[no-untyped-def]
        self.writes += 1
        return await super().txn(compare, success, failure)

    async def txn_at(self, compare, success):  # type: ignore[no-untyped-def]
        self.writes += 1
        return await super().txn_at(compare, success)

    async def grant_lease(self, ttl: int) -> int:
        self.writes += 1
        return await super().grant_lease(ttl)

    async def refresh_lease(self, lease_id: int) -> int:
        self.writes += 1
        return await super().refresh_lease(lease_id)

    async def revoke_lease(self, lease_id: int) -> None:
        self.writes += 1
        await super().revoke_lease(lease_id)
