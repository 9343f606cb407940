"""`stop` of a container whose restart policy is restarting it: the container ends stopped,
never running while its record says exited.

The node's ContainerManager runs in this process on a real runc, conmon and overlayfs, with an
image pulled from a real registry. A container with `--restart always` exits at once, then
runs on once restarted; the test
holds its restart inside `runc start` (the restart task then holds the container's lock while
its state still says RESTARTING), asks for a stop, and lets the start go on. Before the fix,
stop saw RESTARTING, waited for the lock, and wrote EXITED over a container that had just
started: runc ran it while every listing said exited, and nothing would ever stop it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from berth.client import ContainerConfig, RegistryClient
from berthd.common.rpc.registry import RegistryApi
from berthd.node.containers import EXITED, RESTARTING, ContainerManager
from berthd.node.layers import ImageStore, LayerStore, pull_image
from berthd.node.runtime import Runtime

from .images import busybox_layer, push_image

pytestmark = pytest.mark.integration

GUARD = 60  # seconds: only a guard against a hang, never what the test measures


async def test_stop_while_a_restart_is_starting_stops_the_restarted_process(
    client: RegistryClient, tmp_path: Path
) -> None:
    node = tmp_path / "node"
    push_image(client, "test/restarting", "1", [busybox_layer()], tmp_path)
    images, layers = ImageStore(node), LayerStore(node)
    await pull_image(
        RegistryApi(client.address), images, layers, "test/restarting:1", node / "downloads",
        lambda event: None,
    )  # fmt: skip
    runtime = Runtime(node / "runc")
    manager = ContainerManager(node, "node-1", runtime, images, layers, None)
    await manager.start_background()
    record = None
    try:
        # The first run exits, its restart runs on (the root filesystem keeps the mark).
        script = "test -e /restarted && exec sleep 1000; touch /restarted; exit 3"
        config = ContainerConfig(
            "test/restarting:1", command=["sh", "-c", script], restart_policy="always"
        )
        record = await manager.create(config)

        # The first run goes through; the restart's `runc start` waits for the test.
        starts = 0
        in_start, go_on = asyncio.Event(), asyncio.Event()
        real_start = runtime.start

        async def held_start(container_id: str) -> None:
            nonlocal starts
            starts += 1
            if starts == 2:
                in_start.set()
                await go_on.wait()
            await real_start(container_id)

        runtime.start = held_start  # type: ignore[method-assign]
        await manager.start(record.id)
        await asyncio.wait_for(in_start.wait(), GUARD)
        assert record.state == RESTARTING

        stopping = asyncio.create_task(manager.stop(record.id, timeout=0))
        await asyncio.sleep(0)  # stop has looked at the state and waits for the lock
        go_on.set()
        await asyncio.wait_for(stopping, GUARD)

        assert record.state == EXITED
        state = await runtime.state(record.id)
        assert state is None or state.status != "running", "runc still runs a stopped container"
    finally:
        if record is not None:
            await manager.remove(record.id, force=True)
        await manager.stop_background()
