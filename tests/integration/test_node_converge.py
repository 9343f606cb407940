"""A node agent converging on desired state written to etcd (what the cluster service does)."""

from __future__ import annotations

import asyncio
import secrets
import time

from berth.client import NodeClient
from berthd.common.containers import ContainerConfig
from berthd.common.state.containers import (
    CONTAINERS,
    MANAGED_LABEL,
    STATUSES,
    STOPPED,
    DesiredContainer,
)
from berthd.common.store import Store

# A long-running process that ends at once on SIGTERM (PID 1 ignores it without a handler).
SERVE = "trap 'exit 0' TERM; while true; do sleep 0.1; done"


async def until(check, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await asyncio.to_thread(check)
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout}s")


async def test_node_follows_its_desired_containers(
    node_agent, busybox, etcd_endpoint: str, etcd_prefix: str
) -> None:
    store = Store(etcd_endpoint, etcd_prefix)
    await store.connect()
    node = NodeClient(node_agent.address)
    try:
        mine = DesiredContainer(
            id=secrets.token_hex(32),
            name="web-1",
            node=node_agent.node_id,
            config=ContainerConfig(image=busybox, command=["sh", "-c", SERVE]),
        )
        elsewhere = DesiredContainer(
            id=secrets.token_hex(32),
            name="web-2",
            node="some-other-node",
            config=ContainerConfig(image=busybox, command=["sleep", "1000"]),
        )
        await CONTAINERS.put(store, mine.id, mine)
        await CONTAINERS.put(store, elsewhere.id, elsewhere)

        # Pulled, created with the cluster's id, started; status reported.
        info = await until(lambda: _running(node, mine.id), what="desired container running")
        assert info.name == "web-1" and node.inspect(mine.id).labels[MANAGED_LABEL] == "true"
        assert [c.id for c in node.list(all=True)] == [mine.id]
        # The status reaches etcd after the node starts it: wait for it, not for inspect.
        deadline = time.monotonic() + 30
        while (status := await STATUSES.get(store, mine.id)) is None or status.state != "running":
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.05)
        assert status.node == node_agent.node_id and status.image_digest.startswith("sha256:")

        mine.desired = STOPPED
        await CONTAINERS.put(store, mine.id, mine)
        await until(lambda: node.inspect(mine.id).state == "exited", what="stopped")

        # Reassigned elsewhere (the cluster moved it): the node removes its copy.
        mine.node = "some-other-node"
        await CONTAINERS.put(store, mine.id, mine)
        await until(lambda: node.list(all=True) == [], what="removed")
    finally:
        node.close()
        await store.close()


def _running(node: NodeClient, container_id: str):
    containers = [c for c in node.list(all=True) if c.id == container_id]
    return containers[0] if containers and containers[0].state == "running" else None
