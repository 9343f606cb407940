"""Repository, tag, manifest and blob-link records in etcd.

Keys (relative to the store prefix). A repository name never contains `@`, so `<repo>@` is an
exact prefix for one repository's children even when other names nest under it (`a` and `a/b`):

    registry/repos/<repo>                 {"created_at", "last_push_at", "description", "labels",
                                           "visibility", "tag_count"}
    registry/tags/<repo>@<tag>            {"digest", "pushed_at"}
    registry/manifests/<repo>@<digest>    {"media_type", "size", "references", "created_at"}
    registry/links/<repo>@<digest>        {"size", "linked_at"}   blob belongs to the repository
    registry/holders/<digest>@<repo>      {}   the same link, by blob: which repositories hold it
    registry/names-changed                {"changed_at"}: put last in every transaction that
                                          writes or deletes a tag or manifest record

The tag and manifest keys (and the marker) are built in berthd.common.state.registry, since the
image service reads them too: it keeps the catalog's names in memory from a watch, and the
marker's revision tells it whether that view is up to date with one point read.

Because all of this is in etcd and blobs are files in a shared directory, any number of
registry processes serve the same content.

A repository's record holds the number of its tag keys (`tag_count`), so a listing reads its
page and nothing per repository. Every tag put or delete writes the repository record in the
same transaction, compared on its mod revision: tag writes to one repository are serialized by
its record, and a count read together with an unchanged record is exact. A record written
before counts existed (or rewritten after damage) is counted once, with a count read, and
written back; GC counts every repository again from one read of all tag keys, for counts that
hand edits made wrong.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from berthd.common.errors import Aborted, DataLoss, NotFound
from berthd.common.state.registry import (
    LINKS,
    MANIFESTS,
    REPOS,
    TAGS,
    manifest_key,
    op_names_changed,
    split_child_key,
    tag_key,
)
from berthd.common.store import Compare, Entry, Op, Store, encode, prefix_end
from berthd.registry.webhooks import QueueOps

log = logging.getLogger("berthd.registry.metadata")

HOLDERS = "registry/holders/"

# A repository's visibility: who may pull it and find it. Records written before visibility
# existed have none and are private.
PRIVATE = "private"
PUBLIC = "public"
VISIBILITIES = (PRIVATE, PUBLIC)


def name_unknown(repo: str) -> NotFound:
    return NotFound(
        f"repository {repo} not found",
        reason="NAME_UNKNOWN",
        metadata={"repository": repo},
        resource=("repository", repo),
    )


def repo_key(repo: str) -> str:
    return REPOS + repo


def link_key(repo: str, digest: str) -> str:
    return f"{LINKS}{repo}@{digest}"


def holder_key(digest: str, repo: str) -> str:
    return f"{HOLDERS}{digest}@{repo}"


@dataclass
class RepoRecord:
    name: str
    created_at: float
    last_push_at: float
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    tag_count: int = 0
    visibility: str = PRIVATE
    # False for a record written before counts existed: its tag_count is not known yet.
    counted: bool = True

    @property
    def public(self) -> bool:
        return self.visibility == PUBLIC

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "created_at": self.created_at,
            "last_push_at": self.last_push_at,
            "description": self.description,
            "labels": self.labels,
            "visibility": self.visibility,
        }
        if self.counted:
            data["tag_count"] = self.tag_count
        return data

    @classmethod
    def from_json(cls, name: str, value: bytes | dict[str, Any]) -> RepoRecord:
        """The record from its etcd value; CorruptRepository when it is not one."""
        try:
            data = _fields(value, created_at=(int, float), last_push_at=(int, float))
            labels = data.get("labels", {})
            description = data.get("description", "")
            if not isinstance(description, str) or not isinstance(labels, dict):
                raise ValueError("description or labels of the wrong kind")
            if labels and not all(isinstance(v, str) for v in (*labels, *labels.values())):
                raise ValueError("a label that is not a string")
        except ValueError:
            raise CorruptRepository(name) from None
        count = data.get("tag_count")
        # A count of the wrong kind is as good as none: counted again, not a damaged record.
        counted = isinstance(count, int) and not isinstance(count, bool) and count >= 0
        return cls(
            name=name,
            created_at=data["created_at"],
            last_push_at=data["last_push_at"],
            description=description,
            labels=dict(labels),
            tag_count=count if counted else 0,
            visibility=PUBLIC if data.get("visibility") == PUBLIC else PRIVATE,
            counted=counted,
        )


@dataclass(frozen=True)
class ManifestRecord:
    digest: str
    media_type: str
    size: int
    references: tuple[str, ...]
    created_at: float
    # The manifest it refers to (OCI 1.1 `subject`: signatures, SBOMs), and its artifact type
    # (`artifactType`, else an image manifest's config media type): the referrers API's index.
    subject: str = ""
    artifact_type: str = ""


@dataclass(frozen=True)
class TagRecord:
    name: str
    digest: str
    pushed_at: float

    @classmethod
    def from_json(cls, repo: str, name: str, value: bytes | dict[str, Any]) -> TagRecord:
        """The record from its etcd value; CorruptTag when it is not one."""
        try:
            data = _fields(value, digest=(str,), pushed_at=(int, float))
        except ValueError:
            raise CorruptTag(repo, name) from None
        return cls(name, data["digest"], data["pushed_at"])


@dataclass(frozen=True)
class ListedManifest:
    """A manifest in one repository, with the tags of that repository naming it."""

    repository: str
    record: ManifestRecord
    tags: tuple[TagRecord, ...]

    @property
    def key(self) -> str:
        """`<repository>@<digest>`: the listing's order, and where a next page starts."""
        return f"{self.repository}@{self.record.digest}"


@dataclass(frozen=True)
class ManifestPage:
    entries: list[ListedManifest]
    # etcd revision every record of the page was read at
    revision: int
    # whether manifests remain after the page
    more: bool
    # `<repository>@<digest>` of the last record read, damaged or not: where the next page
    # starts (None when nothing was read)
    last: str | None = None


class CorruptRecord(DataLoss):
    """A record in etcd that cannot be read (damaged by hand, by a bug or by an older
    version): a reader of that one record reports it (DATA_LOSS), listings skip it with a log
    line (`skipped`), and GC never needs it to decide (see each kind for the way out)."""

    def __init__(
        self, kind: str, name: str, remedy: str, metadata: dict[str, object], reason: str
    ) -> None:
        super().__init__(
            f"the record of {kind} {name} is damaged; {remedy}",
            reason=reason,
            metadata=metadata,
            resource=(kind, name),
        )

    def skipped(self) -> None:
        log.warning("skipping a damaged record: %s", self)


class CorruptManifest(CorruptRecord):
    """Listings skip it; GC rebuilds it from the manifest's blob."""

    def __init__(self, repo: str, digest: str) -> None:
        super().__init__(
            "manifest",
            f"{repo}@{digest}",
            "delete the manifest by its digest and push it again",
            {"repository": repo, "digest": digest},
            "MANIFEST_RECORD_CORRUPT",
        )
        self.repository = repo
        self.digest = digest


class CorruptTag(CorruptRecord):
    """Listings skip it; DeleteTag removes it, a push of the tag rewrites it."""

    def __init__(self, repo: str, tag: str) -> None:
        super().__init__(
            "tag",
            f"{repo}:{tag}",
            "delete the tag and push it again",
            {"repository": repo, "tag": tag},
            "TAG_RECORD_CORRUPT",
        )


class CorruptRepository(CorruptRecord):
    """Listings and search skip it (its manifests and tags still read); the next push or
    UpdateRepository rewrites it whole, private, with no description or labels."""

    def __init__(self, repo: str) -> None:
        super().__init__(
            "repository",
            repo,
            "push to it or update it (`berth registry set`) to rewrite it",
            {"repository": repo},
            "REPOSITORY_RECORD_CORRUPT",
        )


def _manifest_json(record: ManifestRecord) -> dict[str, Any]:
    value: dict[str, Any] = {
        "media_type": record.media_type,
        "size": record.size,
        "references": list(record.references),
        "created_at": record.created_at,
    }
    # Only when set: records of manifests with no subject stay as they were.
    if record.subject:
        value["subject"] = record.subject
    if record.artifact_type:
        value["artifact_type"] = record.artifact_type
    return value


def manifest_record(digest: str, value: bytes | dict[str, Any], repo: str = "") -> ManifestRecord:
    """The record from its etcd value; CorruptManifest when it is not one."""
    try:
        data = _fields(value, media_type=(str,), size=(int,), references=(list,))
        data = _fields(data, created_at=(int, float))
        if not all(isinstance(r, str) for r in data["references"]):
            raise ValueError("a reference that is not a string")
        subject, artifact_type = data.get("subject", ""), data.get("artifact_type", "")
        if not isinstance(subject, str) or not isinstance(artifact_type, str):
            raise ValueError("a subject or artifact type that is not a string")
    except ValueError:
        raise CorruptManifest(repo, digest) from None
    return ManifestRecord(
        digest,
        data["media_type"],
        data["size"],
        tuple(data["references"]),
        data["created_at"],
        subject,
        artifact_type,
    )


_DECODE = json.JSONDecoder().decode


def _fields(value: bytes | dict[str, Any], **kinds: tuple[type, ...]) -> dict[str, Any]:
    """A record's JSON object from its raw value (or the object itself), with each field
    named in `kinds` present and of one of its types; ValueError otherwise."""
    # One decoder on the text: json.loads would guess the encoding of bytes first, a cost in
    # every listing's loop (records are UTF-8; other bytes fail as UnicodeDecodeError, a
    # ValueError).
    data = _DECODE(value.decode()) if isinstance(value, bytes) else value  # JSONDecodeError too
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    for name, types in kinds.items():
        # bool is an int to isinstance, and never a right value here
        if not isinstance(data.get(name), types) or isinstance(data[name], bool):
            raise ValueError(f"field {name} missing or of the wrong kind")
    return data


T = TypeVar("T")


def readable(entries: Sequence[Entry], parse: Callable[[Entry], T]) -> list[T]:
    """The records of `entries` that parse; a damaged one is skipped with a log line, so it
    never hides every other."""
    records = []
    for entry in entries:
        try:
            records.append(parse(entry))
        except CorruptRecord as exc:
            exc.skipped()
    return records


# A write to a repository's records that other writers keep coming first to (every tag write
# rewrites the record's count) tries again after a random wait that doubles, for this long in
# all: many pushes of tags to one repository at once all land, a busy machine included.
WRITE_BUDGET_SECONDS = 15.0
FIRST_WRITE_WAIT = 0.002
MAX_WRITE_WAIT = 0.2


@dataclass
class RepoWrite:
    """What a write to a repository's records does besides the record itself: `ops` and
    `compares` in the same transaction, the change of its tag count, and whether the record
    is written (every write that puts or deletes a tag key must write it)."""

    ops: list[Op] = field(default_factory=list)
    compares: list[Compare] = field(default_factory=list)
    tags_added: int = 0
    write_record: bool = True
    # Whether a tag or manifest record changes: the names-changed marker goes last (the image
    # service's view of the names waits for its revision: berthd.common.state.registry).
    names_changed: bool = False


@dataclass(frozen=True)
class RecordPage(Generic[T]):
    """Up to a page of readable records, the key of the last record read (damaged or not:
    where the next page starts), the revision they were read at, and whether keys remain
    after it."""

    records: list[T]
    last: str | None
    revision: int
    more: bool


class Metadata:
    def __init__(self, store: Store) -> None:
        self.store = store

    # Repositories -------------------------------------------------------------

    async def get_repo(self, repo: str) -> RepoRecord | None:
        """The record with its tag count, None if there is none; CorruptRepository if it is
        damaged. One read (for a record from before counts, once: a count and a write too)."""
        entry = await self.store.get(repo_key(repo))
        if entry is None:
            return None
        return await self._with_count(entry, RepoRecord.from_json(repo, entry.value))

    async def count_tags(self, repo: str) -> int:
        """The repository's tag keys, damaged ones included, counted by etcd."""
        return await self.store.count(f"{TAGS}{repo}@")

    async def _with_count(self, entry: Entry, record: RepoRecord) -> RepoRecord:
        """`record` (read as `entry`) with its tag count: one without (written before counts
        existed) is counted and written back, once, unless it changed meanwhile (a tag write
        rewrote it; the count read is still the answer of this read)."""
        if record.counted:
            return record
        record.tag_count = await self.count_tags(record.name)
        record.counted = True
        ok, _ = await self.store.txn(
            [self.store.unchanged(entry.key, entry.mod_revision)],
            [self.store.op_put(entry.key, record.to_json())],
        )
        if ok:
            log.info("counted the tags of repository %s once: %d", record.name, record.tag_count)
        return record

    async def _counted(self, records: list[RepoRecord]) -> list[RepoRecord]:
        """Records of a listing, each with its count: the rare one without is read again and
        counted (`_with_count`); a listing of counted records reads nothing more."""
        result = []
        for record in records:
            if not record.counted:
                recounted = await self.get_repo(record.name)
                if recounted is None:
                    continue  # deleted since the listing read it
                record = recounted
            result.append(record)
        return result

    async def require_repo(self, repo: str) -> RepoRecord:
        record = await self.get_repo(repo)
        if record is None:
            raise name_unknown(repo)
        return record

    async def list_repos(self, start_after: str | None, limit: int) -> RecordPage[RepoRecord]:
        """Up to `limit` readable repositories after `start_after` (damaged ones skipped),
        with their tag counts; `last` is a repository name."""
        page = await self._page(
            REPOS, repo_key(start_after) if start_after else None, limit, _repo_of
        )
        last = page.last[len(REPOS) :] if page.last else None
        return RecordPage(await self._counted(page.records), last, page.revision, page.more)

    async def all_repos(self) -> list[RepoRecord]:
        """Every readable repository (damaged ones skipped), with its tag count."""
        return await self._counted(readable([e async for e in self.store.iterate(REPOS)], _repo_of))

    async def _page(
        self,
        prefix: str,
        after_key: str | None,
        limit: int,
        parse: Callable[[Entry], T],
        revision: int = 0,
    ) -> RecordPage[T]:
        """Up to `limit` (0: all) readable records under `prefix` after the key `after_key`,
        all read at one revision: reads on past damaged records until the page is full or
        the keys end, so a page of damaged records is never an empty page or a lost cursor."""
        records: list[T] = []
        start = after_key + "\0" if after_key else prefix
        last = None
        while True:
            want = limit - len(records) if limit else 0
            page = await self.store.range(start, prefix_end(prefix), limit=want, revision=revision)
            revision = page.revision
            records += readable(page.entries, parse)
            if page.entries:
                last = page.entries[-1].key
            if not page.more or not page.entries or (limit and len(records) >= limit):
                return RecordPage(records, last, revision, page.more)
            start = page.entries[-1].key + "\0"

    async def update_repo(
        self, repo: str, change: Callable[[RepoRecord], None], *, create: bool = False
    ) -> RepoRecord:
        """Apply `change(record)` in one compare-and-swap transaction; NAME_UNKNOWN when there
        is no record and not `create`."""

        async def plan(record: RepoRecord | None) -> RepoWrite:
            if record is None:
                raise name_unknown(repo)
            change(record)
            return RepoWrite()

        record = await self._transact(repo, plan, create=create)
        assert record is not None
        return record

    async def _transact(
        self,
        repo: str,
        plan: Callable[[RepoRecord | None], Awaitable[RepoWrite]],
        *,
        create: bool,
        conflict: dict[str, object] | None = None,
    ) -> RepoRecord | None:
        """One write to a repository's records, in one transaction compared on the
        repository record's mod revision, retried when another writer came first. `plan`
        gets the record as it stands (None: there is none and not `create`), counted, and
        says what else the transaction does; the record is written back with its count
        changed unless the plan says not to (every tag put or delete writes it, which is what
        keeps counts exact: see the module's docstring)."""
        key = repo_key(repo)
        deadline = time.monotonic() + WRITE_BUDGET_SECONDS
        wait = FIRST_WRITE_WAIT
        while True:
            entry = await self.store.get(key)
            record = await self._for_write(repo, entry, create)
            write = await plan(record)
            compares = [self.store.unchanged(key, entry.mod_revision if entry else 0)]
            ops = list(write.ops)
            if record is not None and write.write_record:
                record.tag_count = max(0, record.tag_count + write.tags_added)
                ops.append(self.store.op_put(key, record.to_json()))
            if write.names_changed:
                ops.append(op_names_changed(self.store))
            ok, _ = await self.store.txn([*compares, *write.compares], ops)
            if ok:
                return record
            if time.monotonic() + wait > deadline:
                raise Aborted(
                    f"repository {repo} is being updated concurrently; try again",
                    reason="CONCURRENT_UPDATE",
                    metadata={"repository": repo, **(conflict or {})},
                )
            # Random, so the writers that collided do not collide again in step.
            await asyncio.sleep(random.uniform(0, wait))
            wait = min(wait * 2, MAX_WRITE_WAIT)

    async def _for_write(self, repo: str, entry: Entry | None, create: bool) -> RepoRecord | None:
        """The record to change, with a known tag count: a new one (`create`), a damaged one
        started over (a write is how it is repaired: private, no description or labels) and
        one from before counts get their tags counted (exact: a tag write since would have
        changed the record, and the transaction's compare fails)."""
        if entry is None and not create:
            return None
        record = None
        if entry is not None:
            try:
                record = RepoRecord.from_json(repo, entry.value)
            except CorruptRepository as exc:
                log.warning("rewriting a damaged record: %s", exc)
        if record is None:
            now = time.time()
            record = RepoRecord(repo, now, now, counted=False)
        if not record.counted:
            record.tag_count = await self.count_tags(repo)
            record.counted = True
        return record

    async def recount_tags(self) -> int:
        """Count every repository's tag keys again, from one read of them all at one
        revision, and write back each count that differs unless its record changed since:
        puts right counts that hand edits (a tag key made or deleted outside the registry)
        made wrong. GC runs it. Returns how many counts were put right."""
        first = await self.store.range(REPOS, prefix_end(REPOS), limit=1)
        revision = first.revision
        counts: dict[str, int] = defaultdict(int)
        async for entry in self.store.iterate_range(TAGS, prefix_end(TAGS), revision=revision):
            counts[split_child_key(entry.key, TAGS)[0]] += 1
        fixed = 0
        async for entry in self.store.iterate_range(REPOS, prefix_end(REPOS), revision=revision):
            try:
                record = _repo_of(entry)
            except CorruptRepository:
                continue  # its next write rewrites it whole, counted
            if record.counted and record.tag_count == counts.get(record.name, 0):
                continue
            record.tag_count, record.counted = counts.get(record.name, 0), True
            ok, _ = await self.store.txn(
                [self.store.unchanged(entry.key, entry.mod_revision)],
                [self.store.op_put(entry.key, record.to_json())],
            )
            if ok:
                log.warning(
                    "tag count of repository %s put right: %d", record.name, record.tag_count
                )
                fixed += 1
        return fixed

    # Manifests and tags ---------------------------------------------------------

    async def put_manifest(
        self, repo: str, record: ManifestRecord, tag: str | None, queue: QueueOps | None = None
    ) -> None:
        """Record a manifest (and its tag), bump the repository's last push and count a new
        tag, atomically; `queue` adds its webhook events to the same transaction."""

        async def plan(repository: RepoRecord | None) -> RepoWrite:
            assert repository is not None  # created when missing
            repository.last_push_at = record.created_at
            write = RepoWrite(
                [self.store.op_put(manifest_key(repo, record.digest), _manifest_json(record))],
                names_changed=True,
            )
            if tag is not None:
                key = tag_key(repo, tag)
                existing = await self.store.get(key)
                value = {"digest": record.digest, "pushed_at": record.created_at}
                write.ops.append(self.store.op_put(key, value))
                write.compares.append(
                    self.store.unchanged(key, existing.mod_revision if existing else 0)
                )
                write.tags_added = 0 if existing else 1
            if queue is not None:
                await queue(write.ops, write.compares)
            return write

        await self._transact(repo, plan, create=True)

    async def get_manifest(self, repo: str, digest: str) -> ManifestRecord | None:
        """The record, None if there is none; CorruptManifest if it is damaged."""
        entry = await self.store.get(manifest_key(repo, digest))
        return manifest_record(digest, entry.value, repo) if entry is not None else None

    async def get_manifests(self, names: Sequence[tuple[str, str]]) -> list[ManifestRecord | None]:
        """The records of many (repository, digest) pairs, in order, in a few transactions; a
        damaged one is None, as a listing skips it (GetManifest of it reports it)."""
        entries = await self.store.get_many([manifest_key(repo, d) for repo, d in names])
        records: list[ManifestRecord | None] = []
        for (repo, digest), entry in zip(names, entries, strict=True):
            try:
                records.append(manifest_record(digest, entry.value, repo) if entry else None)
            except CorruptManifest as exc:
                exc.skipped()
                records.append(None)
        return records

    async def has_manifest(self, repo: str, digest: str) -> bool:
        """Whether a record exists, damaged or not."""
        return await self.store.get(manifest_key(repo, digest)) is not None

    async def get_tag(self, repo: str, tag: str) -> TagRecord | None:
        """The record, None if there is none; CorruptTag if it is damaged."""
        entry = await self.store.get(tag_key(repo, tag))
        return TagRecord.from_json(repo, tag, entry.value) if entry is not None else None

    async def list_tags(
        self, repo: str, start_after: str | None, limit: int
    ) -> RecordPage[TagRecord]:
        """Up to `limit` (0: all) readable tags after `start_after` (damaged ones skipped);
        `last` is a tag name."""
        page = await self._page(
            f"{TAGS}{repo}@", tag_key(repo, start_after) if start_after else None, limit, _tag_of
        )
        last = split_child_key(page.last, TAGS)[1] if page.last else None
        return RecordPage(page.records, last, page.revision, page.more)

    async def delete_tag(self, repo: str, tag: str, queue: QueueOps | None = None) -> str:
        """Delete a tag (a damaged one too) and count it out, atomically (with `queue`'s webhook
        events); returns the digest it named ("" for a damaged record: what it named is
        unknown)."""
        deleted: list[Entry] = []

        async def plan(repository: RepoRecord | None) -> RepoWrite:
            entry = await self.store.get(tag_key(repo, tag))
            if entry is None:
                raise NotFound(
                    f"tag {tag} not found in repository {repo}",
                    reason="TAG_UNKNOWN",
                    metadata={"repository": repo, "tag": tag},
                    resource=("tag", f"{repo}:{tag}"),
                )
            deleted[:] = [entry]
            write = RepoWrite(
                [self.store.op_delete(entry.key)],
                [self.store.unchanged(entry.key, entry.mod_revision)],
                tags_added=-1,
                names_changed=True,
            )
            if queue is not None:
                await queue(write.ops, write.compares)
            return write

        await self._transact(repo, plan, create=False, conflict={"tag": tag})
        try:
            return TagRecord.from_json(repo, tag, deleted[0].value).digest
        except CorruptTag:
            return ""  # deleting it is how it is cleared

    async def delete_manifest(
        self, repo: str, digest: str, queue: QueueOps | None = None
    ) -> list[str]:
        """Delete a manifest and every tag pointing at it, and count those out, atomically
        (with `queue`'s webhook events); returns those tags."""
        deleted: list[str] = []

        async def plan(repository: RepoRecord | None) -> RepoWrite:
            tags = [t for t in (await self.list_tags(repo, None, 0)).records if t.digest == digest]
            deleted[:] = [t.name for t in tags]
            write = RepoWrite(
                [
                    self.store.op_delete(manifest_key(repo, digest)),
                    *(self.store.op_delete(tag_key(repo, t.name)) for t in tags),
                ],
                [
                    self.store.value_is(
                        tag_key(repo, t.name),
                        encode({"digest": t.digest, "pushed_at": t.pushed_at}),
                    )
                    for t in tags
                ],
                tags_added=-len(tags),
                write_record=bool(tags),
                names_changed=True,
            )
            if queue is not None:
                await queue(write.ops, write.compares)
            return write

        await self._transact(repo, plan, create=False, conflict={"digest": digest})
        return deleted

    async def all_manifests(self) -> list[tuple[str, str, ManifestRecord | None, Entry]]:
        """Every manifest record as (repository, digest, record, entry); the record is None
        when it is damaged (the caller decides: GC rebuilds it from the blob)."""
        result: list[tuple[str, str, ManifestRecord | None, Entry]] = []
        async for entry in self.store.iterate(MANIFESTS):
            repo, digest = split_child_key(entry.key, MANIFESTS)
            try:
                record: ManifestRecord | None = manifest_record(digest, entry.value, repo)
            except CorruptManifest:
                record = None
            result.append((repo, digest, record, entry))
        return result

    async def repair_manifest(self, repo: str, record: ManifestRecord, damaged: Entry) -> bool:
        """Replace a damaged record with `record`, unless it changed since it was read."""
        ok, _ = await self.store.txn(
            [self.store.unchanged(damaged.key, damaged.mod_revision)],
            [self.store.op_put(damaged.key, _manifest_json(record)), op_names_changed(self.store)],
        )
        return ok

    async def list_manifests(
        self, repo: str | None, after: str | None, limit: int, revision: int = 0
    ) -> ManifestPage:
        """Up to `limit` manifests of `repo` (None: every repository) in `<repo>@<digest>`
        order after the key `after`, each with its tags, all read at `revision` (0: now).

        Two kinds of range read: one for the manifests, then the tags of the repositories
        the page spans (in batches), at the same revision, so tags and manifests agree.
        Tag keys sort by repository exactly as manifest keys do, so that range holds the
        page's repositories and no other with tags."""
        prefix = f"{MANIFESTS}{repo}@" if repo else MANIFESTS
        after_key = MANIFESTS + after if after else None
        page = await self._page(prefix, after_key, limit, _listed_manifest, revision)
        manifests: list[tuple[str, ManifestRecord]] = page.records
        tags: dict[tuple[str, str], list[TagRecord]] = defaultdict(list)
        if manifests:
            first, last = manifests[0][0], manifests[-1][0]
            span = self.store.iterate_range(
                tag_key(first, ""), prefix_end(tag_key(last, "")), revision=page.revision
            )
            for tag_repo, tag in readable([e async for e in span], _repo_and_tag_of):
                tags[tag_repo, tag.digest].append(tag)
        entries = [
            ListedManifest(r, record, tuple(tags.get((r, record.digest), ())))
            for r, record in manifests
        ]
        last_key = page.last[len(MANIFESTS) :] if page.last else None
        return ManifestPage(entries, page.revision, page.more, last_key)

    async def repo_exists_at(self, repo: str, revision: int) -> bool:
        page = await self.store.range(repo_key(repo), repo_key(repo) + "\0", revision=revision)
        return bool(page.entries)

    # Blob links -------------------------------------------------------------------

    async def link_blob(self, repo: str, digest: str, size: int) -> None:
        """The blob belongs to the repository: its link, and the same by blob, in one txn."""
        await self.store.txn(
            [],
            [
                self.store.op_put(link_key(repo, digest), {"size": size, "linked_at": time.time()}),
                self.store.op_put(holder_key(digest, repo), {}),
            ],
        )

    async def is_linked(self, repo: str, digest: str) -> bool:
        return await self.store.get(link_key(repo, digest)) is not None

    async def linked_repos(self, digest: str) -> list[str]:
        """Every repository holding the blob: one read of its holders (a link written before
        holders were kept is found once GC has indexed it: `index_holders`)."""
        prefix = f"{HOLDERS}{digest}@"
        return [e.key[len(prefix) :] async for e in self.store.iterate(prefix)]

    async def unlink_everywhere(self, digests: set[str]) -> int:
        removed = 0
        async for entry in self.store.iterate(LINKS):
            if split_child_key(entry.key, LINKS)[1] in digests:
                removed += await self.store.delete(entry.key)
        for digest in digests:
            await self.store.delete_prefix(f"{HOLDERS}{digest}@")
        return removed

    async def index_holders(self) -> int:
        """Holder entries for the links that have none (written before holders were kept),
        and none left for a link that is gone: one pass over each family. Returns how many
        it wrote."""
        links = set()
        async for entry in self.store.iterate(LINKS):
            repo, digest = split_child_key(entry.key, LINKS)
            links.add((digest, repo))
        held = set()
        async for entry in self.store.iterate(HOLDERS):
            digest, _, repo = entry.key[len(HOLDERS) :].partition("@")
            held.add((digest, repo))
        for digest, repo in held - links:
            # Unless linked meanwhile (GC's unlink and a new link race): then it stays.
            if not await self.is_linked(repo, digest):
                await self.store.delete(holder_key(digest, repo))
        for digest, repo in links - held:
            await self.store.put_json(holder_key(digest, repo), {})
        return len(links - held)


def _repo_of(entry: Entry) -> RepoRecord:
    return RepoRecord.from_json(entry.key[len(REPOS) :], entry.value)


def _tag_of(entry: Entry) -> TagRecord:
    return _repo_and_tag_of(entry)[1]


def _repo_and_tag_of(entry: Entry) -> tuple[str, TagRecord]:
    repo, name = split_child_key(entry.key, TAGS)
    return repo, TagRecord.from_json(repo, name, entry.value)


def _listed_manifest(entry: Entry) -> tuple[str, ManifestRecord]:
    repo, digest = split_child_key(entry.key, MANIFESTS)
    return repo, manifest_record(digest, entry.value, repo)
