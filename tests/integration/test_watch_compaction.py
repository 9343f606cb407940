"""Every long watch survives an etcd compaction (issue 14), against a real etcd compacted by the
test itself: the cluster's Events stream, the election's follower, a container wait (the
cluster's status watch) and the node agent's converger.

A watch that is caught up never notices a compaction (etcd only refuses a watch that asks for a
revision it no longer keeps), so each test does both: it compacts while the watcher runs and
shows a later change is seen, and it makes the watcher's next watch start at a revision etcd
has just compacted away (`CompactingStore`: a change the watch will not see, then Compact, right
before the watch is made, as when a compaction falls between a watcher's read and its watch or
while a lost watch is being resumed). The watcher must read again, see the change it missed,
and go on to see the next one."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from berthd.cluster.core import ClusterCore
from berthd.cluster.election import Election, Role
from berthd.cluster.events import NODE_JOINED, NODE_LOST, EventFilter, watch_events
from berthd.common.containers import ContainerConfig
from berthd.common.state.containers import (
    CONTAINERS,
    STATUSES,
    STOPPED,
    ContainerStatus,
    DesiredContainer,
)
from berthd.common.state.nodes import NODES, NodeRecord
from berthd.common.store import Store, WatchEvent
from berthd.node.containers import ContainerManager
from berthd.node.converge import Converger
from berthd.node.layers import ImageStore, LayerStore
from berthd.node.runtime import Runtime

pytestmark = pytest.mark.integration

GUARD = 30  # seconds: only a guard against a hang, never what a test measures


async def compact_now(store: Store) -> int:
    """Compact etcd (the whole of it) at a new revision; returns it. A write first, so that
    there is always something newer than the last compaction to compact."""
    await store.put("compaction-probe", b"")
    _, revision = await store.get_at("compaction-probe")
    await store._client.compact(revision, physical=True)  # etcd's Compact RPC
    return revision


class CompactingStore(Store):
    """A real store whose next watch from a start revision, once `arm`ed, finds that revision
    compacted: `before` runs first (a change that watch will never deliver), then etcd is
    compacted at its current revision, then the watch is made."""

    def __init__(self, endpoint: str, prefix: str) -> None:
        super().__init__(endpoint, prefix)
        self._before: Callable[[], Awaitable[None]] | None = None
        self.compacted = asyncio.Event()

    def arm(self, before: Callable[[], Awaitable[None]]) -> None:
        self._before = before
        self.compacted.clear()

    async def _watch(  # type: ignore[override]
        self, start: bytes, end: bytes, start_revision: int | None
    ) -> AsyncIterator[WatchEvent]:
        # Every watch (of a prefix or a range) starts here.
        if self._before is not None and start_revision is not None:
            before, self._before = self._before, None
            await before()
            await compact_now(self)
            self.compacted.set()
        async for event in super()._watch(start, end, start_revision):
            yield event


@pytest.fixture
async def compacting(etcd_endpoint: str, etcd_prefix: str) -> AsyncIterator[CompactingStore]:
    s = CompactingStore(etcd_endpoint, etcd_prefix)
    await s.connect()
    yield s
    await s.close()


async def until(check: Callable[[], bool], what: str) -> None:
    """Until `check()` holds (state fed by a watch, looked at as it changes)."""
    async with asyncio.timeout(GUARD):
        while not check():
            await asyncio.sleep(0.02)


async def test_the_events_stream_goes_on_after_a_compaction_with_what_changed_meanwhile(
    store: Store, compacting: CompactingStore
) -> None:
    await NODES.put(store, "gone", NodeRecord("gone"))
    seen: list[tuple[str, str]] = []
    ready = asyncio.Event()

    async def watching() -> None:
        ready.set()

    async def follow() -> None:
        wanted = EventFilter(types={NODE_JOINED, NODE_LOST})
        async for event in watch_events(compacting, wanted, watching):
            seen.append((event.type, event.node_id))

    async def missed() -> None:
        # Changes the compacted watch never delivers: a node joins, another is lost.
        await NODES.put(store, "joined-meanwhile", NodeRecord("joined-meanwhile"))
        await NODES.delete(store, "gone")

    compacting.arm(missed)
    task = asyncio.create_task(follow())
    try:
        async with asyncio.timeout(GUARD):
            await ready.wait()
            await compacting.compacted.wait()
        await NODES.put(store, "joined-after", NodeRecord("joined-after"))
        await until(lambda: (NODE_JOINED, "joined-after") in seen, "the join after it")
        # What the watch missed comes as the state read again shows it; the join after the
        # compaction too (before or after those, as the state was read before or after it).
        assert sorted(seen) == [
            (NODE_JOINED, "joined-after"),
            (NODE_JOINED, "joined-meanwhile"),
            (NODE_LOST, "gone"),
        ]
        # A compaction under a watch that is caught up: nothing to notice, it goes on.
        await compact_now(store)
        await NODES.put(store, "joined-later", NodeRecord("joined-later"))
        await until(lambda: (NODE_JOINED, "joined-later") in seen, "the join after the second")
        assert seen[3:] == [(NODE_JOINED, "joined-later")]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_follower_campaigns_again_after_a_compaction(
    store: Store, compacting: CompactingStore
) -> None:
    holder = Election(store, "cluster-holder", ttl=30)
    assert await holder.campaign()
    follower = Election(compacting, "cluster-follower", ttl=30)
    leading = asyncio.Event()

    async def duty() -> None:
        leading.set()
        await asyncio.Event().wait()

    async def nothing() -> None:
        pass

    compacting.arm(nothing)
    task = asyncio.create_task(follower.run(duty))
    try:
        async with asyncio.timeout(GUARD):
            await compacting.compacted.wait()
        await compact_now(store)  # and once more under its next watch
        await store.revoke_lease(holder.lease_id)  # the key vanishes after the compactions
        async with asyncio.timeout(GUARD):
            await leading.wait()
        assert follower.role is Role.LEADER
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await follower.resign()


async def test_a_container_wait_sees_the_exit_after_a_compaction(
    store: Store, compacting: CompactingStore
) -> None:
    cid = secrets.token_hex(32)
    await NODES.put(store, "n1", NodeRecord("n1"))
    await CONTAINERS.put(
        store, cid, DesiredContainer(cid, "waited", "n1", ContainerConfig(image="busybox"))
    )
    await STATUSES.put(store, cid, ContainerStatus(node="n1", state="running", pid=7))

    async def restarted() -> None:  # a change the compacted watch never delivers
        await STATUSES.put(store, cid, ContainerStatus(node="n1", state="running", pid=8))

    compacting.arm(restarted)
    core = ClusterCore(compacting)
    waiting = asyncio.create_task(core.wait(cid))
    async with asyncio.timeout(GUARD):
        await compacting.compacted.wait()
    await STATUSES.put(store, cid, ContainerStatus(node="n1", state="exited", exit_code=3))
    async with asyncio.timeout(GUARD):
        status = await waiting
    assert (status.state, status.exit_code) == ("exited", 3)

    # A wait on a removed container ends when the compacted-away change was the removal.
    await STATUSES.put(store, cid, ContainerStatus(node="n1", state="running", pid=9))

    async def removed() -> None:
        await STATUSES.delete(store, cid)

    compacting.arm(removed)
    with pytest.raises(Exception, match="removed before it exited"):
        async with asyncio.timeout(GUARD):
            await core.wait(cid)


async def test_the_node_converger_follows_desired_records_after_a_compaction(
    store: Store, compacting: CompactingStore, tmp_path: Path
) -> None:
    node = f"n-{secrets.token_hex(4)}"
    manager = ContainerManager(
        tmp_path,
        node,
        Runtime(tmp_path / "runc"),
        ImageStore(tmp_path),
        LayerStore(tmp_path),
        compacting,
    )

    async def no_pull(image: str) -> None:
        raise AssertionError("nothing is pulled: every record here is stopped")

    def stopped(name: str) -> DesiredContainer:
        record = DesiredContainer(
            secrets.token_hex(32), name, node, ContainerConfig(image="busybox")
        )
        record.desired = STOPPED
        return record

    missed, after, later = stopped("missed"), stopped("after"), stopped("later")

    async def put_missed() -> None:
        await CONTAINERS.put(store, missed.id, missed)

    compacting.arm(put_missed)
    converger = Converger(compacting, node, manager, no_pull)  # type: ignore[arg-type]
    await converger.start()
    try:
        async with asyncio.timeout(GUARD):
            await compacting.compacted.wait()
        await CONTAINERS.put(store, after.id, after)
        await until(lambda: {missed.id, after.id} <= converger.desired.keys(), "both records")
        await compact_now(store)
        await CONTAINERS.put(store, later.id, later)
        await until(lambda: later.id in converger.desired, "the record after the second")
    finally:
        await converger.stop()
