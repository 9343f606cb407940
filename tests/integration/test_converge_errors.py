"""A container its node cannot create: the node says why in the container's status at once,
and takes that status away again when the container goes."""

from __future__ import annotations

import asyncio

import pytest

from berth.client import ClusterClient, ContainerConfig
from berthd.common.state.containers import STATUSES
from berthd.common.store import Store

from .conftest import NodeProcess, Services, wait_until

pytestmark = pytest.mark.integration


async def test_the_reason_is_reported_then_cleaned_up(
    services: Services, node_agent: NodeProcess, busybox: str, store: Store
) -> None:
    cluster = services.start("cluster")
    with ClusterClient(cluster.address) as c:
        wait_until(lambda: c.nodes() and c.nodes()[0].state == "ready", 30, "the node")
        box = c.run(ContainerConfig(busybox, command=["true"], user="nobody-here"))
        wait_until(lambda: c.inspect(box.id).error, 30, "the node's report")
        seen = c.inspect(box.id)
        assert seen.state == "pending"
        assert "nobody-here" in seen.error
        assert seen.node_id == node_agent.node_id

        c.remove(box.id, force=True)

    for _ in range(100):  # the node notices the removal on its next pass
        if await STATUSES.get(store, box.id) is None:
            break
        await asyncio.sleep(0.1)
    assert await store.get(STATUSES.key(box.id)) is None
