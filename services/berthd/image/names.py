"""The catalog's names (the registry's tags and manifests) in memory, fed by a watch.

The image service answers a question about one image (inspect, history, tag, rmi) and lists
the catalog from this view instead of listing the registry each time. It lists the registry's
tag and manifest records once at one revision R (berthd.common.state.registry), then applies
every change of that key range from R + 1. A compacted revision, a watch that ends or etcd
going away drop the view; it is listed again.

Up to date, not eventually: the registry puts a marker key (`registry/names-changed`) as the
last write of every transaction that changes a tag or manifest. `current()` reads the marker
(one point read) and waits until the view has applied the watch up to the marker's revision,
so a request sees every name committed before it started, as a fresh listing would, at the
cost of a point read. etcd down: that read fails with UNAVAILABLE, as every read does.

`Snapshot` is the state without I/O (unit-tested by feeding it changes); it also counts, for
each digest, the (repository, manifest) pairs that reference it, so a removal knows which
blobs it frees without walking the catalog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

from berthd.common.errors import BerthError, Unavailable
from berthd.common.state.registry import (
    NAMES_CHANGED,
    NAMES_END,
    NAMES_START,
    NameChange,
    name_change,
)
from berthd.common.store import Entry, RevisionCompacted, Store, WatchEvent

log = logging.getLogger("berthd.image.names")

# Keys per range read while listing.
LISTING_BATCH = 1000
# How long a request waits for the watch to catch up before it reports the view unavailable
# (a guard: the watch normally brings a change within milliseconds).
CATCH_UP_SECONDS = 10.0
# Pauses between attempts to list and watch again after a failure.
RETRY_FIRST, RETRY_MAX = 0.2, 5.0


class Snapshot:
    """The registry's names at one moment."""

    def __init__(self) -> None:
        # manifest digest -> {repository: the digests the manifest references}, for every
        # repository holding it
        self.manifests: dict[str, dict[str, tuple[str, ...]]] = {}
        # (repository, tag) -> manifest digest
        self.tags: dict[tuple[str, str], str] = {}
        # manifest digest -> the (repository, tag) pairs naming it
        self._named: dict[str, set[tuple[str, str]]] = {}
        # digest -> how many (repository, manifest) pairs reference it (a blob, or an index's
        # child manifest)
        self.users: dict[str, int] = {}

    @classmethod
    def of(
        cls,
        manifests: dict[str, dict[str, tuple[str, ...]]],
        tags: dict[tuple[str, str], str],
    ) -> Snapshot:
        snapshot = cls()
        for digest, by_repo in manifests.items():
            for repo, references in by_repo.items():
                snapshot.put_manifest(repo, digest, references)
        for (repo, tag), digest in tags.items():
            snapshot.put_tag(repo, tag, digest)
        return snapshot

    def copy(self) -> Snapshot:
        """A copy the watch does not change (for work that spans awaits: listings, prune)."""
        other = Snapshot()
        other.manifests = {d: dict(by_repo) for d, by_repo in self.manifests.items()}
        other.tags = dict(self.tags)
        other._named = {d: set(named) for d, named in self._named.items()}
        other.users = dict(self.users)
        return other

    # Reading ------------------------------------------------------------------------------

    def tags_of(self, digest: str) -> list[tuple[str, str]]:
        """(repository, tag) pairs naming the manifest, sorted."""
        return sorted(self._named.get(digest, ()))

    def holders(self, digest: str) -> list[str]:
        return sorted(self.manifests.get(digest, {}))

    def tag(self, repo: str, tag: str) -> str | None:
        """The manifest `repo:tag` names, if the repository holds it."""
        digest = self.tags.get((repo, tag))
        return digest if digest is not None and repo in self.manifests.get(digest, {}) else None

    # Changing -----------------------------------------------------------------------------

    def apply(self, change: NameChange) -> str | None:
        """One record's change; returns a manifest digest no repository holds any more."""
        if change.kind == "tag":
            if isinstance(change.value, str):
                self.put_tag(change.repository, change.name, change.value)
            else:  # deleted, or damaged (the registry reads it as absent too)
                self.delete_tag(change.repository, change.name)
            return None
        if isinstance(change.value, tuple):
            self.put_manifest(change.repository, change.name, change.value)
            return None
        return change.name if self.delete_manifest(change.repository, change.name) else None

    def put_manifest(self, repo: str, digest: str, references: tuple[str, ...]) -> None:
        by_repo = self.manifests.setdefault(digest, {})
        old = by_repo.get(repo)
        if old is not None:
            self._count(old, -1)
        by_repo[repo] = references
        self._count(references, 1)

    def delete_manifest(self, repo: str, digest: str) -> bool:
        """True when that was the manifest's last repository."""
        by_repo = self.manifests.get(digest)
        if by_repo is None or repo not in by_repo:
            return False
        self._count(by_repo.pop(repo), -1)
        if by_repo:
            return False
        del self.manifests[digest]
        return True

    def put_tag(self, repo: str, tag: str, digest: str) -> None:
        self.delete_tag(repo, tag)
        self.tags[(repo, tag)] = digest
        self._named.setdefault(digest, set()).add((repo, tag))

    def delete_tag(self, repo: str, tag: str) -> None:
        old = self.tags.pop((repo, tag), None)
        if old is not None:
            named = self._named[old]
            named.discard((repo, tag))
            if not named:
                del self._named[old]

    def _count(self, references: Iterable[str], delta: int) -> None:
        for reference in set(references):
            users = self.users.get(reference, 0) + delta
            if users > 0:
                self.users[reference] = users
            else:
                self.users.pop(reference, None)


class NamesView:
    """The Snapshot of now, kept by a background task (started by the first `current()`).
    `on_gone(digest)` is told of each manifest no repository holds any more, and
    `on_reload(digests)` of every manifest after a new listing (the content cache follows)."""

    def __init__(
        self,
        store: Store,
        on_gone: Callable[[str], None] = lambda _digest: None,
        on_reload: Callable[[set[str]], None] = lambda _digests: None,
    ) -> None:
        self.store = store
        self.names = Snapshot()
        self.loaded = False
        # Every change committed up to this revision is in `names`.
        self.applied = 0
        # Full listings made (the first, and one after each lost watch): for tests and logs.
        self.listings = 0
        self._on_gone = on_gone
        self._on_reload = on_reload
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def current(self) -> Snapshot:
        """The names as they are now (every change committed before the call). Use it before
        the next await, or copy it: the watch changes it in place."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        marker = await self.store.get(NAMES_CHANGED)
        wanted = marker.mod_revision if marker is not None else 0
        deadline = time.monotonic() + CATCH_UP_SECONDS
        while not (self.loaded and self.applied >= wanted):
            progress = self._progress
            try:
                # Not wait_for: Python 3.11's drops a cancellation that arrives with progress.
                async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                    await progress.wait()
            except TimeoutError:
                raise Unavailable(
                    "the image service's view of the registry's names is behind etcd "
                    "(its watch does not keep up); retry in a moment",
                    reason="CATALOG_UNAVAILABLE",
                ) from None
        return self.names

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # The background task ---------------------------------------------------------------------

    async def _run(self) -> None:
        pause = RETRY_FIRST
        while True:
            try:
                await self._load()
                pause = RETRY_FIRST
                async for event in self.store.watch_range(NAMES_START, NAMES_END, self.applied + 1):
                    self._apply(event)
                log.info("the watch of the registry's names ended; listing them again")
            except RevisionCompacted:
                log.info("the registry's names were compacted past the view; listing again")
            except BerthError as exc:
                log.warning("the view of the registry's names is lost (%s); retrying", exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX)
            finally:
                self.loaded = False

    async def _load(self) -> None:
        """List the names at one revision, in batches."""
        names = Snapshot()
        start, revision = NAMES_START, 0
        while True:
            page = await self.store.range(start, NAMES_END, limit=LISTING_BATCH, revision=revision)
            revision = page.revision
            for entry in page.entries:
                _put(names, entry)
            if not page.more or not page.entries:
                break
            start = page.entries[-1].key + "\0"
        self.names, self.applied, self.loaded = names, revision, True
        self.listings += 1
        self._on_reload(set(names.manifests))
        self._signal()

    def _apply(self, event: WatchEvent) -> None:
        change = name_change(event.key, event.value if event.kind == "put" else None)
        if change is not None:
            gone = self.names.apply(change)
            if gone is not None:
                self._on_gone(gone)
        # Changes arrive in revision order, a transaction's in the order of its ops: the
        # marker ends its transaction, any other change means the revisions before are done.
        done = event.mod_revision if event.key == NAMES_CHANGED else event.mod_revision - 1
        if done > self.applied:
            self.applied = done
            self._signal()

    def _signal(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()


def _put(names: Snapshot, entry: Entry) -> None:
    change = name_change(entry.key, entry.value)
    if change is not None:
        names.apply(change)
