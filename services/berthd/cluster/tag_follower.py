"""The elected cluster instance's follower: a push that moves a followed tag updates the service.

One watch on the registry's tag records (`registry/tags/`, typed in berthd.common.state.registry)
and one on the service records, both from the revision they were listed at. A tag change costs
a string split and a set lookup unless its repository is followed (issue 14: no work per
unrelated push); for a followed one the service's policy is resolved again (one point read, or
one listing of the repository's tags for a semver range) and, when the digest moved, the
service is updated through ServiceCore.update: the ordinary path, so the rollout rules apply
and the record keeps `repo@digest`. The update is made at the version read (a user's concurrent
change wins, and resolves the tag itself). At the start of each term every followed service is
checked once, so a push made while no instance led is not missed.

Why etcd, not a registry event stream over gRPC: the tag records already have a typed read side
in common (the image service watches them too); a watch resumes from a revision after a lost
connection with no gap, and needs no new RPC, no delivery state and no coupling to the
registry's uptime.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections import defaultdict

from berthd.cluster.follow import list_families, watch_family
from berthd.cluster.services import CONTROLLER, SERVICES, ServiceCore, ServiceRecord
from berthd.cluster.tag_follow import TAG, FollowSpec, followed, resolve
from berthd.common.errors import BerthError
from berthd.common.relisting import relisting
from berthd.common.security.permissions import Permission
from berthd.common.security.principal import Principal
from berthd.common.state.registry import TAGS, split_child_key
from berthd.common.store import Store, WatchEvent

log = logging.getLogger("berthd.cluster.tag_follower")

RETRY_SECONDS = 1.0


class TagFollower:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.services = ServiceCore(store)
        # Service id -> record, for the services that follow a tag; repository -> their ids.
        self.following: dict[str, ServiceRecord] = {}
        self.by_repository: dict[str, set[str]] = defaultdict(set)

    async def run(self) -> None:
        """Until cancelled (the end of the term); listed again after a lost watch."""
        await relisting(self._follow, "tag follower's view", log, RETRY_SECONDS)

    async def _follow(self) -> None:
        entries, revision = await list_families(self.store, [SERVICES])
        self.following.clear()
        self.by_repository.clear()
        for entry in entries:
            self._service(WatchEvent("put", entry.key, entry.value))
        for record in list(self.following.values()):
            await self._sync(record)
        queue: asyncio.Queue[WatchEvent | BaseException] = asyncio.Queue()
        watchers = [
            asyncio.create_task(watch_family(self.store, prefix, revision + 1, queue))
            for prefix in (SERVICES, TAGS)
        ]
        try:
            while True:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                if event.key.startswith(SERVICES):
                    self._service(event)
                elif event.kind == "put":
                    await self._tag_moved(event.key)
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

    def _service(self, event: WatchEvent) -> None:
        sid = event.key.removeprefix(SERVICES)
        gone = self.following.pop(sid, None)
        if gone is not None:
            self.by_repository[_repository(gone)].discard(sid)
        if event.kind == "delete":
            return
        try:
            record = ServiceRecord.from_json(event.value)
        except (ValueError, KeyError, TypeError):
            return
        if record.follow is not None:
            self.following[sid] = record
            self.by_repository[_repository(record)].add(sid)

    async def _tag_moved(self, key: str) -> None:
        repository, tag = split_child_key(key, TAGS)
        ids = self.by_repository.get(repository)
        if not ids:
            return  # the cheap filter: nobody follows this repository
        for sid in list(ids):
            record = self.following[sid]
            assert record.follow is not None
            if record.follow.mode == TAG and _followed_tag(record) != tag:
                continue
            await self._sync(record)

    async def _sync(self, record: ServiceRecord) -> None:
        """Update `record` to the digest its policy names now, when that moved."""
        follow = record.follow
        assert follow is not None
        try:
            found = await resolve(self.store, record.template.image, follow)
        except BerthError as exc:
            log.info("tag follower: %s stays on %s: %s", record.name, record.template.image, exc)
            return
        if found.image == record.template.image:
            return
        spec = copy.deepcopy(record)
        # Resolved again in the update, from this reference: the digest read there is used.
        spec.follow = FollowSpec(follow.mode, follow.semver, found.reference)
        try:
            updated = await self.services.update(
                record.id, spec, expected_version=record.version, principal=_principal(record)
            )
        except BerthError as exc:
            # A concurrent change (VERSION_MISMATCH) resolved the tag itself; others: logged.
            log.info("tag follower: %s not updated to %s: %s", record.name, found.image, exc)
            return
        log.info(
            "service follow: %s %s -> %s (version %d)",
            record.name,
            found.reference,
            found.digest,
            updated.version,
        )


def _repository(record: ServiceRecord) -> str:
    assert record.follow is not None
    try:
        return followed(record.template.image, record.follow)[0]
    except BerthError:
        return ""


def _followed_tag(record: ServiceRecord) -> str:
    assert record.follow is not None
    return followed(record.template.image, record.follow)[1]


def _principal(record: ServiceRecord) -> Principal:
    """The controller's own principal; the template was admitted before and only its image
    changes, so host access it already had is kept."""
    permissions = {Permission.HOST_ACCESS} if record.host_access_by else set()
    return Principal(CONTROLLER, frozenset(permissions))
