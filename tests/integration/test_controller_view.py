"""The controller against a real etcd, in one process: once it holds its view it reads nothing
from etcd (no pass re-reads the state), writes outside its families do not wake it, and its view
follows scaling and a node's loss. ClusterCore.inspect reads the one container it is asked for."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from berthd.cluster.controller import Controller
from berthd.cluster.core import ClusterCore, allocation_after, allocation_key, name_key
from berthd.cluster.services import ServiceRecord, service_key
from berthd.common.containers import ContainerConfig
from berthd.common.state.containers import CONTAINERS, STATUSES, ContainerStatus, DesiredContainer
from berthd.common.state.nodes import NODES, NodeRecord
from berthd.common.store import Store

from .counting import CountingStore

pytestmark = pytest.mark.integration

GiB = 1 << 30


async def replicas(store: Store, done: Callable[[dict[str, str]], bool]) -> dict[str, str]:
    """Until `done(name -> node)` holds for the desired records: watched, not polled."""
    found, revision = await CONTAINERS.snapshot(store)
    current = {v.id: v.record for v in found}
    placed = {c.name: c.node for c in current.values()}
    if done(placed):
        return placed
    async for change in CONTAINERS.watch(store, revision + 1):
        if change.record is None:
            current.pop(change.id, None)
        else:
            current[change.id] = change.record
        placed = {c.name: c.node for c in current.values()}
        if done(placed):
            return placed
    raise AssertionError("the watch ended")


async def test_the_controller_reads_nothing_once_it_holds_its_view(
    store: Store, counting: CountingStore
) -> None:
    for node in ("n1", "n2"):
        await NODES.put(store, node, NodeRecord(node, cpus=4, memory_bytes=4 * GiB))
    web = ServiceRecord(
        id="s" * 64,
        name="web",
        template=ContainerConfig(image="busybox", restart_policy="always"),
        replicas=1,
    )
    await store.put(service_key(web.id), web.to_json())
    controller = Controller(counting)
    task = asyncio.create_task(controller.run())
    try:
        async with asyncio.timeout(60):  # a guard only
            await replicas(store, lambda placed: set(placed) == {"web.1"})
            counting.reads = counting.records = 0
            # Keys the controller does not decide on: nothing to read, nothing to do.
            for i in range(30):
                await store.put(f"requests/r{i}", b"{}")
                await store.put(f"registry/tags/demo/app@v{i}", b"{}")
                await store.put(f"cluster/names/other{i}", b"x")
            web.replicas = 2
            await store.put(service_key(web.id), web.to_json())
            placed = await replicas(store, lambda placed: len(set(placed.values())) == 2)
            # web.1's node's lease ends: the replica moves, decided on the view alone.
            lost, kept = placed["web.1"], placed["web.2"]
            await NODES.delete(store, lost)
            await replicas(store, lambda placed: placed == {"web.1": kept, "web.2": kept})
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert (counting.reads, counting.records) == (0, 0)


async def test_inspect_reads_the_container_asked_for_not_every_one(
    store: Store, counting: CountingStore
) -> None:
    await NODES.put(store, "n1", NodeRecord("n1", cpus=4, memory_bytes=4 * GiB))
    ids = []
    for i in range(40):
        name = f"c{i:02d}"
        desired = DesiredContainer(
            id=f"{i:02d}" + "a" * 62,
            name=name,
            node="n1",
            config=ContainerConfig("busybox", name=name),
        )
        ids.append(desired.id)
        await CONTAINERS.put(store, desired.id, desired)
        await store.put(name_key(name), desired.id.encode())
        await STATUSES.put(store, desired.id, ContainerStatus(node="n1", state="running"))
    core = ClusterCore(counting)
    for ref in ("c07", ids[7], ids[7][:5]):
        counting.reads = counting.records = 0
        view = await core.inspect(ref)
        assert (view.name, view.state, view.node_ready) == ("c07", "running", True)
        # The record, its status and its node (and the name claim): never the 40 others.
        assert counting.records <= 4, (ref, counting.records)
    with pytest.raises(Exception, match="ambiguous: it matches 10 containers"):
        await core.inspect("0")
    with pytest.raises(Exception, match="no such container: nope"):
        await core.inspect("nope")


async def test_a_refused_pass_reads_again_only_the_keys_it_wrote(
    store: Store, counting: CountingStore
) -> None:
    await NODES.put(store, "n1", NodeRecord("n1", cpus=4, memory_bytes=4 * GiB))
    web = ServiceRecord(
        id="s" * 64, name="web", template=ContainerConfig(image="busybox"), replicas=1
    )
    await store.put(service_key(web.id), web.to_json())
    controller = Controller(counting)
    await controller.load()  # no watch runs: the view sees only what it reads or writes
    # Meanwhile another placement books n1: the pass's compare on n1's allocation fails.
    await store.put_json(allocation_key("n1"), allocation_after(None, 0, 0, 1))
    counting.reads = counting.records = 0
    assert await controller.reconcile_once() is False
    # n1's allocation (found) and the new replica's record (absent), not the world.
    assert (counting.reads, counting.records) == (2, 1)
    assert await controller.reconcile_once() is True
    assert [c.record.name for c in await CONTAINERS.list(store)] == ["web.1"]
    assert (await store.get_json(allocation_key("n1")))["containers"] == 2
