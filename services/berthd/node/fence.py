"""Fencing: a node agent cut off from etcd stops its service replicas itself.

While an agent cannot see its own registration (`nodes/<id>`: etcd unreachable, or its lease
expired), the cluster may already have declared the node down and started its replicas
elsewhere; a partitioned host that kept serving them would run duplicates for as long as the
partition lasts. After `stop_after` seconds of failed checks in a row the fence stops the
node's service replicas, and after `standalone_after` (0: never, the default) its standalone
cluster containers, as Nomad's `stop_after_client_disconnect` does; containers made on the
node directly are never touched.
While fenced the converger starts nothing. Once the registration is seen again the converger
takes a fresh snapshot of the desired state before it acts: replicas moved elsewhere meanwhile
are removed, those still assigned here start again.

Time counts from the first failed check, not from the last success: an agent frozen (SIGSTOP)
for longer than `stop_after` has failed no check, and gets its lease back within a third of its
TTL before it would fence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from berthd.common.errors import BerthError
from berthd.common.state.containers import MANAGED_LABEL
from berthd.common.state.nodes import NODES
from berthd.common.store import Store
from berthd.node.containers import ContainerManager
from berthd.node.converge import Converger
from berthd.node.records import RESTARTING, RUNNING

log = logging.getLogger("berthd.node.fence")

# How often the agent looks for its registration, and how long one look may take.
CHECK_INTERVAL = 1.0
CHECK_TIMEOUT = 2.0
# Grace given to a fenced container to stop (SIGTERM, then SIGKILL).
STOP_GRACE = 10.0


class Fence:
    def __init__(
        self,
        store: Store,
        node_id: str,
        manager: ContainerManager,
        converger: Converger,
        stop_after: float,
        standalone_after: float = 0.0,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.manager = manager
        self.converger = converger
        self.stop_after = stop_after
        self.standalone_after = standalone_after
        self.fenced = False
        self._stopped: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.stop_after > 0 or self.standalone_after > 0:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def registered(self) -> bool:
        """Whether etcd answers and holds this node's registration (its lease is alive)."""
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                return await self.store.get(NODES.key(self.node_id)) is not None
        except (TimeoutError, BerthError) as exc:
            log.debug("registration check failed: %s", exc)
            return False

    async def _run(self) -> None:
        lost_since: float | None = None
        while True:
            if await self.registered():
                if lost_since is not None:
                    log.info("registration seen again after %.1fs", time.monotonic() - lost_since)
                lost_since = None
                if self.fenced:
                    await self.converger.resynchronize()
                    self.fenced = self.converger.fenced = False
                    self._stopped.clear()
            else:
                now = time.monotonic()
                if lost_since is None:
                    lost_since = now
                    log.warning("cannot see this node's registration in etcd")
                if victims := self.victims(now - lost_since):
                    await self.fence(victims, now - lost_since)
            await asyncio.sleep(CHECK_INTERVAL)

    def victims(self, lost_for: float) -> list[str]:
        """The running cluster containers whose time is up: replicas after `stop_after`,
        standalone ones after `standalone_after`; the converger's last copy of the desired
        state says which are replicas."""
        found = []
        for record in self.manager.records.values():
            if not record.config.labels.get(MANAGED_LABEL) or record.id in self._stopped:
                continue
            if record.state not in (RUNNING, RESTARTING):
                continue
            desired = self.converger.desired.get(record.id)
            replica = desired is not None and bool(desired.service)
            limit = self.stop_after if replica else self.standalone_after
            if limit > 0 and lost_for >= limit:
                found.append(record.id)
        return found

    async def fence(self, victims: list[str], lost_for: float) -> None:
        self.fenced = True
        self.converger.fenced = True  # nothing starts again until the registration is back
        log.warning(
            "no registration for %.0fs: stopping %d container(s) (--stop-after-disconnect)",
            lost_for,
            len(victims),
        )
        for container_id in victims:
            self._stopped.add(container_id)
            try:
                await self.manager.stop(container_id, STOP_GRACE)
            except BerthError as exc:
                log.warning("cannot stop it: %s", exc, extra={"container": container_id})
            else:
                log.info("stopped: the node is cut off", extra={"container": container_id})
