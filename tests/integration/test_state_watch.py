"""The typed state modules against a real etcd: a family's watch sees its own puts and deletes
and nothing of the families around it, reads by key carry the revision transactions compare."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from berthd.common.containers import ContainerConfig
from berthd.common.state.containers import CONTAINERS, STATUSES, ContainerStatus, DesiredContainer
from berthd.common.state.family import Change, Family
from berthd.common.state.nodes import NODE_LAYERS, NODES, NodeLayers, NodeRecord
from berthd.common.store import Store

pytestmark = pytest.mark.integration

A, B = "a" * 64, "b" * 64


def desired(cid: str, node: str = "n1") -> DesiredContainer:
    return DesiredContainer(cid, f"box-{cid[:4]}", node, ContainerConfig(image="busybox"))


async def collect(
    family: Family[Any], store: Store, revision: int, until: str, id: str | None = None
) -> list[Change[Any]]:
    """Changes of `family` from `revision` until a put of record `until`."""
    seen: list[Change[Any]] = []
    async with asyncio.timeout(10):
        async for change in family.watch(store, revision, id=id):
            seen.append(change)
            if change.kind == "put" and change.id == until:
                return seen
    raise AssertionError("the watch ended")


async def write_every_family(store: Store) -> None:
    """Puts and deletes in the families around container statuses, one of them unreadable."""
    await CONTAINERS.put(store, A, desired(A))
    await NODES.put(store, "n1", NodeRecord("n1", "127.0.0.1:1"))
    await STATUSES.put(store, A, ContainerStatus(node="n1", state="running", pid=7))
    await store.put(f"containers/{A}/other", b"not a status")  # same prefix, not the family
    await store.put(STATUSES.key(B), b"{unreadable")
    await NODE_LAYERS.put(store, "n1", NodeLayers({"sha256:" + "c" * 64: 1}))
    await STATUSES.delete(store, A)
    await CONTAINERS.delete(store, A)
    await NODES.delete(store, "n1")
    await STATUSES.put(store, B, ContainerStatus(node="n2", state="exited", exit_code=1))
    await CONTAINERS.put(store, B, desired(B, "n2"))
    await NODES.put(store, "n2", NodeRecord("n2"))


async def test_a_family_watch_sees_its_own_changes_only(store: Store) -> None:
    _, revision = await STATUSES.snapshot(store)
    await write_every_family(store)
    start = revision + 1

    statuses = await collect(STATUSES, store, start, until=B)
    assert [(c.kind, c.id) for c in statuses] == [("put", A), ("delete", A), ("put", B)]
    assert statuses[0].record == ContainerStatus(
        node="n1", state="running", pid=7, updated_at=statuses[0].record.updated_at
    )
    assert statuses[1].record is None and statuses[2].record.exit_code == 1

    containers = await collect(CONTAINERS, store, start, until=B)
    assert [(c.kind, c.id) for c in containers] == [("put", A), ("delete", A), ("put", B)]
    assert (containers[2].record.id, containers[2].record.node) == (B, "n2")

    nodes = await collect(NODES, store, start, until="n2")
    assert [(c.kind, c.id) for c in nodes] == [("put", "n1"), ("delete", "n1"), ("put", "n2")]

    # Narrowed to one record: only A's status, never B's.
    only_a = []
    async with asyncio.timeout(10):
        async for change in STATUSES.watch(store, start, id=A):
            only_a.append((change.kind, change.id))
            if change.kind == "delete":
                break
    assert only_a == [("put", A), ("delete", A)]


async def test_reads_by_key_and_the_revisions_transactions_compare(store: Store) -> None:
    assert await CONTAINERS.get(store, A) is None
    assert await CONTAINERS.read(store, A) is None
    record = desired(A)
    ok, _ = await store.txn([CONTAINERS.absent(store, A)], [CONTAINERS.op_put(store, A, record)])
    assert ok
    found = await CONTAINERS.read(store, A)
    assert found is not None and found.record == record and found.mod_revision > 0
    # A write on a stale revision is refused.
    await CONTAINERS.put(store, A, desired(A, "n2"))
    ok, _ = await store.txn(
        [CONTAINERS.unchanged(store, A, found.mod_revision)],
        [CONTAINERS.op_delete(store, A)],
    )
    assert not ok and (await CONTAINERS.get(store, A)).node == "n2"

    status, revision = await STATUSES.get_at(store, A)
    assert status is None and revision > 0
    await STATUSES.put(store, A, ContainerStatus(state="running"))
    status, _ = await STATUSES.get_at(store, A)
    assert status is not None and status.state == "running"
    assert set(await STATUSES.records(store)) == {A}
    assert [v.id for v in await CONTAINERS.list(store)] == [A]

    # Unreadable records are skipped by whole-family reads, not fatal.
    await store.put(CONTAINERS.key(B), b"{unreadable")
    assert [v.id for v in await CONTAINERS.list(store)] == [A]
    assert await CONTAINERS.get(store, B) is None
