"""A node agent follows only its own assignments (`cluster/assignments/<node>/<id>`): writes
of other nodes' containers never reach it, a change of its own record's desired state or a move
does; a cluster whose records predate the index is backfilled by the leader, and agents follow
every record until it marks the index ready. A listing by node reads that node's containers;
the Events stream watches only the key range of the families it reports. A real etcd and a
real converger (with a container manager whose records are all stopped: nothing is pulled or
run)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from berthd.cluster.assignments import backfill_assignments
from berthd.cluster.core import ClusterCore
from berthd.cluster.events import NODE_JOINED, EventFilter, watch_events
from berthd.common.containers import ContainerConfig
from berthd.common.state.containers import (
    ASSIGNMENTS,
    ASSIGNMENTS_READY,
    CONTAINERS,
    STATUSES,
    STOPPED,
    ContainerStatus,
    DesiredContainer,
    assignment_key,
    delete_desired,
    put_desired,
)
from berthd.common.state.nodes import NODES, NodeRecord
from berthd.common.store import Store
from berthd.node.containers import ContainerManager
from berthd.node.converge import Converger
from berthd.node.layers import ImageStore, LayerStore
from berthd.node.runtime import Runtime

from .counting import CountingStore

pytestmark = pytest.mark.integration

GUARD = 30  # seconds: only a guard against a hang, never what a test measures


def stopped(node: str, name: str) -> DesiredContainer:
    record = DesiredContainer(secrets.token_hex(32), name, node, ContainerConfig(image="busybox"))
    record.desired = STOPPED
    return record


async def until(check: Callable[[], bool], what: str) -> None:
    """Until `check()` holds (the converger's state, fed by its watch)."""
    async with asyncio.timeout(GUARD):
        while not check():
            await asyncio.sleep(0.02)


@pytest.fixture
async def converger(counting: CountingStore, tmp_path: Path) -> AsyncIterator[Converger]:
    node = f"n-{secrets.token_hex(4)}"
    manager = ContainerManager(
        tmp_path,
        node,
        Runtime(tmp_path / "runc"),
        ImageStore(tmp_path),
        LayerStore(tmp_path),
        counting,
    )

    async def no_pull(image: str) -> None:
        raise AssertionError("nothing is pulled: every record here is stopped")

    converger = Converger(counting, node, manager, no_pull)  # type: ignore[arg-type]
    yield converger
    await converger.stop()


async def test_an_agent_is_not_woken_by_other_nodes_container_writes(
    store: Store, counting: CountingStore, converger: Converger
) -> None:
    await store.put(ASSIGNMENTS_READY, b"{}")  # what the leader writes once the index is whole
    mine = stopped(converger.node_id, "mine")
    await put_desired(store, mine)
    await converger.start()
    await until(lambda: mine.id in converger.desired, "its record")

    counting.reads = counting.records = counting.watched = 0
    others = [stopped("other", f"web.{i}") for i in range(20)]
    for other in others:
        await put_desired(store, other)
    for other in others[:10]:
        other.attempt += 1  # a new attempt: what StartContainer writes
        await put_desired(store, other)
    for other in others[10:]:
        await delete_desired(store, other)
    sentinel = stopped(converger.node_id, "sentinel")
    await put_desired(store, sentinel)
    await until(lambda: sentinel.id in converger.desired, "the sentinel")
    # Its own write, and the one point read of the record it names: none of the 40 others.
    assert (counting.watched, counting.reads, counting.records) == (1, 1, 1)


async def test_an_agent_sees_its_records_change_move_and_go(
    store: Store, converger: Converger
) -> None:
    await store.put(ASSIGNMENTS_READY, b"{}")
    mine = stopped(converger.node_id, "mine")
    await put_desired(store, mine)
    await converger.start()
    await until(lambda: mine.id in converger.desired, "its record")

    # A change of the record alone (no move) reaches the agent: its key is put with it.
    mine.attempt, mine.stop_grace = 3, 1.5
    await put_desired(store, mine)
    await until(lambda: converger.desired[mine.id].attempt == 3, "the new attempt")
    assert converger.desired[mine.id].stop_grace == 1.5

    # Moved to another node: its key here is deleted in the same write, the agent lets it go.
    mine.node = "elsewhere"
    await put_desired(store, mine)
    await until(lambda: mine.id not in converger.desired, "the move")
    assert await store.get(assignment_key(converger.node_id, mine.id)) is None
    assert await store.get(assignment_key("elsewhere", mine.id)) is not None

    back = stopped(converger.node_id, "back")
    await put_desired(store, back)
    await until(lambda: back.id in converger.desired, "a new record")
    await delete_desired(store, back)
    await until(lambda: back.id not in converger.desired, "its removal")


async def test_records_without_the_index_are_backfilled_and_agents_follow_all_until_then(
    store: Store, counting: CountingStore, converger: Converger
) -> None:
    # Written as before the index: records only, and a stray key naming no record.
    old_mine, old_theirs = stopped(converger.node_id, "old"), stopped("other", "theirs")
    for record in (old_mine, old_theirs):
        await CONTAINERS.put(store, record.id, record)
    stray = assignment_key(converger.node_id, "f" * 64)
    await store.put(stray, b"")

    await converger.start()  # no marker: it follows every record, and sees its own
    await until(lambda: old_mine.id in converger.desired, "the record without a key")
    newer = stopped(converger.node_id, "newer")
    await CONTAINERS.put(store, newer.id, newer)
    await until(lambda: newer.id in converger.desired, "a record written without a key")

    assert await backfill_assignments(store) == 4  # three keys written, the stray deleted
    keys = {e.key for e in await store.list(ASSIGNMENTS)}
    assert keys == {
        assignment_key(converger.node_id, old_mine.id),
        assignment_key(converger.node_id, newer.id),
        assignment_key("other", old_theirs.id),
    }
    assert await store.get(ASSIGNMENTS_READY) is not None
    assert await backfill_assignments(store) == 0  # done once: the marker says so

    # The marker moves the agent to its own keys: others' writes no longer reach it.
    await until(lambda: converger.following == "assignments", "the switch")
    counting.watched = 0
    for i in range(10):
        await put_desired(store, stopped("other", f"x{i}"))
    last = stopped(converger.node_id, "last")
    await put_desired(store, last)
    await until(lambda: last.id in converger.desired, "the last record")
    assert counting.watched == 1
    assert {old_mine.id, newer.id, last.id} == converger.desired.keys()


async def test_ps_filtered_by_node_reads_that_nodes_containers_only(
    store: Store, counting: CountingStore
) -> None:
    await store.put(ASSIGNMENTS_READY, b"{}")
    await NODES.put(store, "n2", NodeRecord("n2", cpus=4, memory_bytes=1 << 30))
    on_n2 = []
    for i in range(42):
        record = stopped("n1" if i % 20 else "n2", f"c{i:02d}")
        record.scheduled_at = float(i)
        await put_desired(store, record)
        await STATUSES.put(store, record.id, ContainerStatus(node=record.node, state="exited"))
        if record.node == "n2":
            on_n2.append(record.name)
    core = ClusterCore(counting)
    counting.reads = counting.records = 0
    found = await core.list(node_id="n2", include_stopped=True)
    assert [v.name for v in found] == sorted(on_n2, reverse=True)  # newest first, as ps
    assert {(v.state, v.node_ready) for v in found} == {("exited", True)}
    # The marker, n2's record and its 3 keys, then each of the 3 records and statuses: none
    # of the other 39 containers.
    assert counting.records <= 11, counting.records
    assert [v.name for v in await core.list(node_id="n1/x", include_stopped=True)] == []
    # Without the marker (an index not backfilled yet) the listing reads every record.
    await store.delete(ASSIGNMENTS_READY)
    again = await core.list(node_id="n2", include_stopped=True)
    assert [v.name for v in again] == [v.name for v in found]


async def test_the_events_stream_is_not_woken_by_keys_it_does_not_report(
    store: Store, counting: CountingStore
) -> None:
    seen: list[tuple[str, str]] = []
    watching = asyncio.Event()

    async def ready() -> None:
        watching.set()

    async def follow() -> None:
        async for event in watch_events(counting, EventFilter(), ready):
            seen.append((event.type, event.node_id))

    task = asyncio.create_task(follow())
    try:
        async with asyncio.timeout(GUARD):
            await watching.wait()
        counting.watched = 0
        for i in range(20):  # a push, placements' bookkeeping, index keys, secrets
            await store.put(f"registry/tags/demo/app@v{i}", b"{}")
            await store.put(f"cluster/allocations/n{i}", b"{}")
            await store.put(assignment_key(f"n{i}", "a" * 64), b"")
            await store.put(f"secrets/s{i}", b"{}")
        await NODES.put(store, "n1", NodeRecord("n1"))
        await until(lambda: bool(seen), "the node's event")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert seen == [(NODE_JOINED, "n1")]
    assert counting.watched == 1
