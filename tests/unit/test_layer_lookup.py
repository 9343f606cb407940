"""Image locality's layer lookups (`ClusterCore.image_layers`): a burst of runs of one image
asks the registry once, not once per run, and a list past its time is refreshed behind the
placements, not waited for (issue 14: a burst of 30 runs after the list expired made 30
registry calls, each run waiting for its own)."""

from __future__ import annotations

import asyncio
import json

import pytest

from berthd.cluster import core as cluster_core
from berthd.cluster.core import ClusterCore
from berthd.common.rpc.registry import ManifestData
from berthd.common.store import Store

MANIFEST = json.dumps({"layers": [{"digest": "sha256:" + "a" * 64, "size": 5}]}).encode()


class Registry:
    """Answers GetManifest when `answer` is set; counts the calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.answer = asyncio.Event()

    async def get_manifest(self, repository: str, reference: str) -> ManifestData:
        self.calls += 1
        await self.answer.wait()
        return ManifestData("sha256:" + "b" * 64, "application/json", MANIFEST)


@pytest.fixture
async def core() -> ClusterCore:
    core = ClusterCore(Store("127.0.0.1:1"))  # never connected: nothing here reads etcd
    core.registry = Registry()  # type: ignore[assignment]
    yield core
    await core.close()


async def test_a_burst_of_runs_asks_the_registry_once(core: ClusterCore) -> None:
    registry: Registry = core.registry  # type: ignore[assignment]
    lookups = [asyncio.create_task(core.image_layers("bench/busybox:1")) for _ in range(30)]
    while registry.calls == 0:
        await asyncio.sleep(0)
    for _ in range(10):
        await asyncio.sleep(0)  # every lookup has had its turn to ask
    registry.answer.set()
    found = await asyncio.gather(*lookups)
    assert registry.calls == 1
    assert all(layers == {"sha256:" + "a" * 64: 5} for layers in found)


async def test_an_expired_list_is_served_while_one_refresh_runs(
    core: ClusterCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry: Registry = core.registry  # type: ignore[assignment]
    registry.answer.set()
    first = await core.image_layers("bench/busybox:1")
    assert registry.calls == 1
    monkeypatch.setattr(cluster_core, "LAYER_CACHE_SECONDS", 0.0)
    registry.answer.clear()  # the registry is slow to answer the refresh
    async with asyncio.timeout(60):  # a guard: before, each run waited for the registry
        found = await asyncio.gather(*(core.image_layers("bench/busybox:1") for _ in range(30)))
    # Each run had the list at once, and one refresh was asked for.
    assert found == [first] * 30
    assert registry.calls == 2
    registry.answer.set()
