"""Leader election on one etcd key, so exactly one cluster instance runs the controller.

Campaign: create `election/cluster` with this instance's id, bound to a fresh lease, only if the
key is absent (one transaction: of several candidates exactly one wins). The leader keeps the
lease alive and runs its duty; followers watch the key and campaign again when it vanishes
(the leader resigned, or died and its lease expired). A leader that cannot refresh its lease
in time stops its duty at once, before etcd can hand the key to someone else: the TTL bounds
how long two leaders could both believe they lead, and the controller's transactions compare
the key's value anyway (`fence`), so a deposed leader's writes are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from enum import Enum

from berthd.cluster import metrics
from berthd.common.errors import BerthError
from berthd.common.store import Compare, RevisionCompacted, Store

log = logging.getLogger("berthd.cluster.election")

ELECTION_KEY = "election/cluster"
RETRY_SECONDS = 1.0


class Role(Enum):
    FOLLOWER = "follower"
    LEADER = "leader"


def keepalive_interval(ttl: int) -> float:
    """Refresh three times per TTL, so one lost refresh never costs the lease."""
    return max(ttl / 3, 0.2)


def lease_lost(last_refresh: float, now: float, ttl: int) -> bool:
    """Whether a leader must assume its lease gone: no successful refresh for most of the TTL
    (a margin before etcd expires it, so the old leader steps down before a new one starts)."""
    return now - last_refresh >= ttl * 0.8


class Election:
    def __init__(self, store: Store, instance_id: str, ttl: int, key: str = ELECTION_KEY) -> None:
        self.store = store
        self.instance_id = instance_id
        self.ttl = ttl
        self.key = key
        self.role = Role.FOLLOWER
        self.lease_id = 0

    def fence(self) -> Compare:
        """A transaction compare that holds only while this instance is the leader."""
        return self.store.value_is(self.key, self.instance_id.encode())

    async def leader(self) -> str | None:
        entry = await self.store.get(self.key)
        return entry.value.decode() if entry else None

    async def run(self, duty: Callable[[], Awaitable[None]]) -> None:
        """Campaign forever; run `duty` while leading, cancel it when leadership is lost."""
        while True:
            try:
                if await self.campaign():
                    await self._lead(duty)
                else:
                    await self._wait_for_vacancy()
            except asyncio.CancelledError:
                raise
            except BerthError as exc:
                log.warning("election: %s", exc)
                self._set_role(Role.FOLLOWER)
                await asyncio.sleep(RETRY_SECONDS)

    async def campaign(self) -> bool:
        lease = await self.store.grant_lease(self.ttl)
        if await self.store.create(self.key, self.instance_id.encode(), lease=lease):
            self.lease_id = lease
            self._set_role(Role.LEADER)
            return True
        with contextlib.suppress(BerthError):
            await self.store.revoke_lease(lease)
        return False

    async def _lead(self, duty: Callable[[], Awaitable[None]]) -> None:
        task = asyncio.create_task(duty())
        try:
            await self._keep_alive(task)
        finally:
            self._set_role(Role.FOLLOWER)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            # Let a follower take over now rather than after the TTL (best effort: when etcd
            # is unreachable the lease expires on its own).
            with contextlib.suppress(BerthError, TimeoutError):
                async with asyncio.timeout(1):
                    await self.store.revoke_lease(self.lease_id)

    async def _keep_alive(self, task: asyncio.Task[None]) -> None:
        """Returns when the lease is (or must be assumed) lost, or the duty ended."""
        last = time.monotonic()
        while not task.done():
            await asyncio.sleep(keepalive_interval(self.ttl))
            try:
                async with asyncio.timeout(keepalive_interval(self.ttl)):
                    remaining = await self.store.refresh_lease(self.lease_id)
            except (BerthError, TimeoutError) as exc:
                log.warning("leader lease refresh failed: %s", exc)
                remaining = -1
            if remaining == 0:
                log.warning("leader lease expired: stepping down")
                return
            if remaining > 0:
                last = time.monotonic()
            elif lease_lost(last, time.monotonic(), self.ttl):
                log.warning("leader lease not refreshed in time: stepping down")
                return
        if task.exception() is not None:
            log.error("controller failed: %s", task.exception())

    async def _wait_for_vacancy(self) -> None:
        """Block until the election key is deleted (or found absent). A watch whose revision
        etcd compacted away returns at once: the key may have gone meanwhile, and the next
        campaign finds out."""
        entries, revision = await self.store.snapshot(self.key)
        if not any(e.key == self.key for e in entries):
            return
        try:
            async for event in self.store.watch_prefix(self.key, revision + 1):
                if event.key == self.key and event.kind == "delete":
                    return
        except RevisionCompacted:
            log.info("election: watch compacted, campaigning again")

    async def resign(self) -> None:
        """Give the key up at once (on shutdown), so a follower need not wait for the TTL."""
        if self.role is Role.LEADER and self.lease_id:
            with contextlib.suppress(BerthError):
                await self.store.revoke_lease(self.lease_id)
        self._set_role(Role.FOLLOWER)

    def _set_role(self, role: Role) -> None:
        if role is not self.role:
            log.info("election: now %s", role.value, extra={"instance": self.instance_id})
        self.role = role
        metrics.LEADER.set(1 if role is Role.LEADER else 0)
