"""The controller against a real etcd (its default --max-txn-ops, 128): a pass that adds or
removes more replicas than one transaction can hold still converges, and every replica's record,
name claim and node allocation agree once it has."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from berthd.cluster.controller import Controller
from berthd.cluster.core import allocation_key, name_key
from berthd.cluster.services import ServiceCore, ServiceRecord, service_key
from berthd.common.containers import ContainerConfig
from berthd.common.security.principal import Principal
from berthd.common.state.containers import CONTAINERS
from berthd.common.state.nodes import NODES, NodeRecord
from berthd.common.store import Store

from .test_controller_view import replicas

pytestmark = pytest.mark.integration

GiB = 1 << 30
# A guard only: the waits end on the records themselves.
GUARD = 90


async def _agree(store: Store, count: int) -> None:
    """Records, name claims and allocations tell the same story."""
    records = [v.record for v in await CONTAINERS.list(store)]
    assert len(records) == count
    for record in records:
        assert (await store.get(name_key(record.name))).value == record.id.encode()
    assert len(await store.list("cluster/names/")) == count
    per_node = Counter(r.node for r in records)
    for node in (f"n{i}" for i in range(10)):
        allocation = await store.get_json(allocation_key(node))
        assert (allocation or {}).get("containers", 0) == per_node[node], node


async def test_a_service_scaled_past_one_transaction_converges(store: Store) -> None:
    """Before: 0 -> 150 replicas was one transaction of about 310 compares, which etcd refused
    ("too many operations in txn request") at every pass: no replica was ever placed."""
    for i in range(10):
        await NODES.put(store, f"n{i}", NodeRecord(f"n{i}", cpus=64, memory_bytes=64 * GiB))
    web = ServiceRecord(
        id="s" * 64,
        name="web",
        template=ContainerConfig(image="busybox"),
        cpu_millis=10,
        memory_bytes=1 << 20,
        replicas=0,
    )
    await store.put(service_key(web.id), web.to_json())
    controller = Controller(store)
    task = asyncio.create_task(controller.run())
    try:
        async with asyncio.timeout(GUARD):
            web.replicas = 150
            await store.put(service_key(web.id), web.to_json())
            placed = await replicas(store, lambda placed: len(placed) == 150)
            assert set(placed) == {f"web.{n}" for n in range(1, 151)}
            # Spread as one pass would have: 15 on each node.
            assert set(Counter(placed.values()).values()) == {15}
            await _agree(store, 150)
            # And back down to 5: 145 removals.
            web.replicas = 5
            await store.put(service_key(web.id), web.to_json())
            placed = await replicas(store, lambda placed: len(placed) == 5)
            assert set(placed) == {f"web.{n}" for n in range(1, 6)}
            await _agree(store, 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_removing_a_service_of_150_replicas_removes_them_all(store: Store) -> None:
    """Before: RemoveService deleted the service and every replica in one transaction, which
    etcd refused past about 40 replicas: the service could not be removed."""
    for i in range(10):
        await NODES.put(store, f"n{i}", NodeRecord(f"n{i}", cpus=64, memory_bytes=64 * GiB))
    admin = Principal("user:admin", frozenset())
    spec = ServiceRecord(
        id="",
        name="web",
        template=ContainerConfig(image="busybox"),
        cpu_millis=10,
        memory_bytes=1 << 20,
        replicas=150,
    )
    web = await ServiceCore(store).create(spec, admin)
    controller = Controller(store)
    await controller.load()  # no watch: nothing acts on the records but the calls below
    while await controller.reconcile_once():
        pass
    await _agree(store, 150)
    await ServiceCore(store).remove("web", admin)
    assert await store.get(service_key(web.id)) is None
    await _agree(store, 0)
