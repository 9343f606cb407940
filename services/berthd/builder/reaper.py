"""Sweeping up RUN step containers that outlived their build.

A build removes its step's container when the step ends, in one attempt: that attempt fails
while the cluster cannot be reached (an instance or etcd down), and a builder killed mid-step
makes none. So every step container carries its build's id and its builder instance's id
(labels), and each builder sweeps every REAP_SECONDS: it removes a step container of its own
whose build is no longer running, and one of an instance no longer registered in etcd (its
lease expired: that builder is dead, and its builds with it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from berth.client.cluster import ClusterContainer
from berthd.builder.runner import BUILD_LABEL, BUILDER_LABEL
from berthd.common.errors import BerthError
from berthd.common.rpc.cluster import ClusterApi
from berthd.common.state.endpoints import instances
from berthd.common.store import Store

log = logging.getLogger("berthd.builder.reaper")

NAME_PREFIX = "build-"  # step containers are named build-<build id>-<step>
REAP_SECONDS = 10.0


def orphans(
    containers: Iterable[ClusterContainer], own: str, running: set[str], live: set[str]
) -> list[ClusterContainer]:
    """The step containers among `containers` that no running build owns: this instance's
    (`own`) whose build is not `running`, and those of an instance not `live`. Containers
    must be listed before `running` and `live` are read, so a build that starts in between
    cannot lose its container."""
    found = []
    for c in containers:
        build = c.labels.get(BUILD_LABEL)
        if build is None:
            continue  # not a step container, whatever its name
        owner = c.labels.get(BUILDER_LABEL, "")
        if (owner == own and build not in running) or (owner != own and owner not in live):
            found.append(c)
    return found


class Reaper:
    def __init__(
        self, cluster: ClusterApi, store: Store, instance: str, running: Callable[[], set[str]]
    ) -> None:
        self.cluster = cluster
        self.store = store
        self.instance = instance
        self.running = running  # ids of the builds this instance runs now

    async def sweep(self) -> int:
        """Remove the orphaned step containers; how many went."""
        listed = await self.cluster.list(name=NAME_PREFIX)
        live = {record.instance for record in await instances(self.store, "builder")}
        removed = 0
        for container in orphans(listed, self.instance, self.running(), live):
            try:
                await self.cluster.remove(container.id, force=True)
            except BerthError as exc:  # the next sweep tries again
                log.warning("cannot remove orphaned build container %s: %s", container.id, exc)
                continue
            log.info("removed build container %s, whose build ended", container.name)
            removed += 1
        return removed

    async def run(self) -> None:
        while True:
            try:
                await self.sweep()
            except BerthError as exc:  # the cluster or etcd away: sweep again later
                log.warning("cannot sweep build containers: %s", exc)
            await asyncio.sleep(REAP_SECONDS)
