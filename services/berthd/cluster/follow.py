"""Following key families into a ClusterView: listed once at one revision, then watched from the
next. Shared by the controller (every family it decides on) and by placement in every serving
instance (`NodeCache`: the node families only).

A placement made on the cached view is never wrong for its lag: its transaction compares the
chosen node's record, availability and allocation at the revisions the view holds, and a refused
one reads those keys again (`refresh`) before the next try. A refusal (no node fits) is made on
a fresh listing, so a node that joined a moment ago is not missed either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence

from berthd.cluster.view import PLACEMENT_WATCHED, ClusterView
from berthd.common.errors import BerthError, Unavailable
from berthd.common.relisting import relisting
from berthd.common.store import Entry, Store, WatchEvent, prefix_end

log = logging.getLogger("berthd.cluster.follow")

# Before listing again after a lost watch (etcd unreachable).
RETRY_SECONDS = 1.0


async def list_families(store: Store, prefixes: Sequence[str]) -> tuple[list[Entry], int]:
    """Every key under `prefixes`, all read at one revision; that revision."""
    first = await store.range(prefixes[0], prefix_end(prefixes[0]), limit=1)
    revision = first.revision

    async def family(prefix: str) -> list[Entry]:
        return [e async for e in store.iterate_range(prefix, prefix_end(prefix), revision=revision)]

    listed = await asyncio.gather(*(family(p) for p in prefixes))
    return [entry for entries in listed for entry in entries], revision


async def watch_family(
    store: Store, prefix: str, start: int, queue: asyncio.Queue[WatchEvent | BaseException]
) -> None:
    """Every change under `prefix` from revision `start` into `queue`; the end of the watch (an
    error, a compaction) as an exception: the view is lost, the follower lists again."""
    try:
        async for event in store.watch_prefix(prefix, start):
            queue.put_nowait(event)
        queue.put_nowait(Unavailable(f"the watch of {prefix} ended"))
    except BerthError as exc:
        queue.put_nowait(exc)


class NodeCache:
    """The nodes as placement sees them, in memory: a ClusterView of PLACEMENT_WATCHED (counts
    from the allocation records) kept by a watch in this instance, started at the first use."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.view = ClusterView(counts_from_allocations=True)
        self._task: asyncio.Task[None] | None = None

    async def current(self) -> ClusterView:
        """The watched view; a fresh listing while it is not loaded (first use, a lost watch:
        then Unavailable when etcd cannot be read)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        if self.view.loaded:
            return self.view
        return await self.fresh()

    async def fresh(self) -> ClusterView:
        """A view of the node families read now, for this call only."""
        entries, _ = await list_families(self.store, PLACEMENT_WATCHED)
        view = ClusterView(counts_from_allocations=True)
        view.load(entries)
        return view

    async def refresh(self, keys: Iterable[str]) -> bool:
        """Read `keys` again into the watched view (after a refused commit); True when that
        changed it."""
        keys = sorted(set(keys))
        reads = await asyncio.gather(*(self.store.get_at(key) for key in keys))
        changed = [self.view.apply_read(k, e, rev) for k, (e, rev) in zip(keys, reads, strict=True)]
        return any(changed)

    def written(self, key: str, value: bytes | None, revision: int) -> None:
        """A write this instance committed at `revision`: seen before the watch brings it."""
        if self.view.loaded:
            self.view.apply_write(key, value, revision)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        await relisting(self._follow_marked, "placement view", log, RETRY_SECONDS)

    async def _follow_marked(self) -> None:
        """_follow, and the view marked not loaded whenever it ends (placement waits then)."""
        try:
            await self._follow()
        finally:
            self.view.loaded = False

    async def _follow(self) -> None:
        entries, revision = await list_families(self.store, PLACEMENT_WATCHED)
        self.view.load(entries)
        queue: asyncio.Queue[WatchEvent | BaseException] = asyncio.Queue()
        watchers = [
            asyncio.create_task(watch_family(self.store, prefix, revision + 1, queue))
            for prefix in PLACEMENT_WATCHED
        ]
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                self.view.apply(item)
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
