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

The fence lives in the agent, so a dead agent (SIGKILL, a crash loop) fences nothing while its
containers run on under their conmons. Its watchdog (berthd.node.watchdog), a process of its
own that outlives the agent, then does the same with the same rule (`victims`, `Disconnection`,
`registered` here), reading which containers are replicas from their records on disk.

Not covered: a whole host frozen (nothing on it runs, nothing stops), and a dead agent whose
watchdog is dead too (killed with it, or OOM): its replicas run until an agent returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable

from berthd.common.errors import BerthError
from berthd.common.state.containers import MANAGED_LABEL, SERVICE_LABEL, DesiredContainer
from berthd.common.state.nodes import NODES
from berthd.common.store import Store
from berthd.node.containers import ContainerManager
from berthd.node.converge import Converger
from berthd.node.records import RESTARTING, RUNNING, ContainerRecord

log = logging.getLogger("berthd.node.fence")

# How often the agent looks for its registration, and how long one look may take.
CHECK_INTERVAL = 1.0
CHECK_TIMEOUT = 2.0
# Grace given to a fenced container to stop (SIGTERM, then SIGKILL).
STOP_GRACE = 10.0


def is_replica(record: ContainerRecord, desired: DesiredContainer | None = None) -> bool:
    """A service replica: by its label (set when its node created it), or by the cluster's
    desired record when there is one (replicas created before the label existed)."""
    return bool(record.config.labels.get(SERVICE_LABEL)) or bool(desired and desired.service)


def victims(
    records: Iterable[ContainerRecord],
    lost_for: float,
    stop_after: float,
    standalone_after: float,
    replica: Callable[[ContainerRecord], bool] = is_replica,
    spared: Collection[str] = (),
) -> list[ContainerRecord]:
    """The running cluster containers whose time is up after `lost_for` seconds without the
    node's registration: replicas after `stop_after`, standalone ones after `standalone_after`
    (a limit of 0: never). Containers made on the node directly, and those in `spared`
    (stopped already), are never victims. With `lost_for` infinite: every container that
    would be stopped some day, what the watchdog guards."""
    found = []
    for record in records:
        if not record.config.labels.get(MANAGED_LABEL) or record.id in spared:
            continue
        if record.state not in (RUNNING, RESTARTING):
            continue
        limit = stop_after if replica(record) else standalone_after
        if limit > 0 and lost_for >= limit:
            found.append(record)
    return found


class Disconnection:
    """How long the node's registration has been unseen: from the first failed check of a run
    of failures, not from the last success (see the module's docstring)."""

    def __init__(self) -> None:
        self.since: float | None = None

    def observe(self, seen: bool, now: float) -> float:
        """Record one check; the seconds without the registration (0 when seen)."""
        if seen:
            if self.since is not None:
                log.info("registration seen again after %.1fs", now - self.since)
            self.since = None
            return 0.0
        if self.since is None:
            self.since = now
            log.warning("cannot see this node's registration in etcd")
        return now - self.since


async def registered(store: Store, node_id: str) -> bool:
    """Whether etcd answers and holds the node's registration (its agent's lease is alive)."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            return await store.get(NODES.key(node_id)) is not None
    except (TimeoutError, BerthError) as exc:
        log.debug("registration check failed: %s", exc)
        return False


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

    async def _run(self) -> None:
        lost = Disconnection()
        while True:
            seen = await registered(self.store, self.node_id)
            lost_for = lost.observe(seen, time.monotonic())
            if seen and self.fenced:
                await self.converger.resynchronize()
                self.fenced = self.converger.fenced = False
                self._stopped.clear()
            elif not seen and (found := self.victims(lost_for)):
                await self.fence(found, lost_for)
            await asyncio.sleep(CHECK_INTERVAL)

    def victims(self, lost_for: float) -> list[str]:
        """The containers whose time is up (`victims`); the converger's last copy of the
        desired state also says which are replicas."""
        desired = self.converger.desired
        found = victims(
            self.manager.records.values(),
            lost_for,
            self.stop_after,
            self.standalone_after,
            replica=lambda record: is_replica(record, desired.get(record.id)),
            spared=self._stopped,
        )
        return [record.id for record in found]

    async def fence(self, found: list[str], lost_for: float) -> None:
        self.fenced = True
        self.converger.fenced = True  # nothing starts again until the registration is back
        log.warning(
            "no registration for %.0fs: stopping %d container(s) (--stop-after-disconnect)",
            lost_for,
            len(found),
        )
        for container_id in found:
            self._stopped.add(container_id)
            try:
                await self.manager.stop(container_id, STOP_GRACE)
            except BerthError as exc:
                log.warning("cannot stop it: %s", exc, extra={"container": container_id})
            else:
                log.info("stopped: the node is cut off", extra={"container": container_id})
