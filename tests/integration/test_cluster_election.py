"""The controller's election fence against a real etcd, in one process: a leader deposed while
it was busy (its lease gone, another instance elected) must not write what it decided."""

from __future__ import annotations

import pytest

from berthd.cluster.controller import Controller
from berthd.cluster.election import Election
from berthd.cluster.services import ServiceRecord, service_key
from berthd.common.containers import ContainerConfig
from berthd.common.state.containers import CONTAINERS
from berthd.common.state.nodes import NODES, NodeRecord
from berthd.common.store import Store

pytestmark = pytest.mark.integration

GiB = 1 << 30


async def test_a_deposed_leaders_late_writes_are_refused(store: Store) -> None:
    await NODES.put(store, "n1", NodeRecord("n1", cpus=4, memory_bytes=4 * GiB))
    web = ServiceRecord(
        id="s" * 64, name="web", template=ContainerConfig(image="busybox"), replicas=2
    )
    await store.put(service_key(web.id), web.to_json())

    old = Election(store, "cluster-old", ttl=30)
    assert await old.campaign()
    late = Controller(store, fence=old.fence())
    # Deposed while busy: its lease is gone (revoked here rather than waited out) and another
    # instance now holds the election key.
    await store.revoke_lease(old.lease_id)
    new = Election(store, "cluster-new", ttl=30)
    assert await new.campaign()

    assert await late.reconcile_once() is False  # the fence refused the whole transaction
    assert await CONTAINERS.list(store) == []
    assert await Controller(store, fence=new.fence()).reconcile_once() is True
    assert sorted(c.record.name for c in await CONTAINERS.list(store)) == ["web.1", "web.2"]
    await store.revoke_lease(new.lease_id)
