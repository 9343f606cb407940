"""The registry's behaviour, independent of gRPC: uploads, blobs, manifests, tags, search.

Blob bytes live in the `BlobStore` (files); everything about names lives in etcd (`Metadata`).
Every input is validated here, so the servicer only converts messages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from berth.error_details import Violation
from berthd.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from berthd.common.oci.digest import digest_bytes, parse_digest
from berthd.common.oci.manifest import ParsedManifest, parse_manifest
from berthd.common.oci.mediatypes import CONFIG_TYPES
from berthd.common.oci.reference import (
    is_digest,
    validate_reference,
    validate_repository,
    validate_tag,
)
from berthd.common.pages import bad_token, decode_token, encode_token, page_size, scope_of
from berthd.common.store import RevisionCompacted
from berthd.registry import metrics
from berthd.registry.access import MayPull, PublicCache, sees
from berthd.registry.blobstore import (
    READ_CHUNK_BYTES,
    BlobStat,
    BlobStore,
    UploadInfo,
    blob_unknown,
)
from berthd.registry.metadata import (
    VISIBILITIES,
    CorruptManifest,
    CorruptRepository,
    ListedManifest,
    ManifestRecord,
    Metadata,
    RepoRecord,
    TagRecord,
    name_unknown,
)
from berthd.registry.webhooks import DELETE, PUSH, QueueOps, Target, Webhooks

T = TypeVar("T")


def listing_expired(revision: int) -> Aborted:
    """A page token whose etcd revision was compacted: the listing starts over."""
    return Aborted(
        f"the listing's view of the registry (etcd revision {revision}) has been "
        "compacted away; list again from the first page",
        reason="LISTING_EXPIRED",
        metadata={"revision": revision},
    )


@dataclass(frozen=True)
class StoredManifest:
    digest: str
    media_type: str
    content: bytes


@dataclass(frozen=True)
class BatchManifest:
    """One manifest of a batch read: `found` False when its repository does not hold it (or
    the caller may not pull it); `config` the image config's bytes when asked for and read."""

    repository: str
    digest: str
    found: bool
    media_type: str = ""
    content: bytes = b""
    config: bytes = b""


# Manifests one BatchGetManifests may name.
MAX_BATCH_MANIFESTS = 1000
# A batch's response stops at about this many bytes (gRPC's default message limit is 4 MiB).
BATCH_RESPONSE_BYTES = 2 << 20
# Configs larger than this are left for ReadBlob.
MAX_BATCH_CONFIG = 4 << 20


@dataclass(frozen=True)
class Chunk:
    offset: int
    data: bytes
    total_size: int


@contextmanager
def invalid(reason: str, field: str, **metadata: object) -> Iterator[None]:
    """Give a validation error (from the shared grammar) a stable reason and its request field;
    the message stays as the grammar wrote it."""
    try:
        yield
    except InvalidArgument as exc:
        if exc.reason != "INVALID_ARGUMENT":
            raise
        raise InvalidArgument(str(exc), reason=reason, field=field, metadata=metadata) from None


def checked(check: Callable[[str], T], value: str, reason: str, field: str) -> T:
    with invalid(reason, field, **{field: value}):
        return check(value)


def repository_name(name: str, field: str = "repository") -> str:
    return checked(validate_repository, name, "NAME_INVALID", field)


def digest_of(value: str, field: str = "digest") -> str:
    return checked(parse_digest, value, "DIGEST_INVALID", field)


def _last(token: str, scope: str) -> str | None:
    """The name a listing of names (repositories, tags) goes on after; None for a first page."""
    position = decode_token(token, scope)
    if position is None:
        return None
    if len(position) != 1 or not isinstance(position[0], str) or not position[0]:
        raise bad_token()
    return position[0]


def encode_manifest_token(revision: int, last: str) -> str:
    """ListManifests' token: the etcd revision every page is read at, and the
    `<repository>@<digest>` of the last record read."""
    return encode_token("manifests", revision, last)


def decode_manifest_token(token: str, repository: str) -> tuple[int, str | None]:
    """(revision, `<repo>@<digest>` to continue after), or (0, None) for a first page. A token
    must come from a listing of the same repository filter."""
    position = decode_token(token, "manifests")
    if position is None:
        return 0, None
    if len(position) != 2 or not isinstance(position[0], int) or not isinstance(position[1], str):
        raise bad_token()
    revision, last = position
    repo, _, digest = last.rpartition("@")
    if revision <= 0 or not repo or not is_digest(digest) or (repository and repo != repository):
        raise bad_token(" (it belongs to another call or other filters)")
    return revision, last


class Registry:
    """Calls that list or mount take `may_pull` (berthd.registry.access.pull_filter): None
    for a caller who may pull everything, else they show and use only the repositories the
    caller may pull and the public ones."""

    def __init__(self, blobs: BlobStore, meta: Metadata, webhooks: Webhooks | None = None) -> None:
        self.blobs = blobs
        self.meta = meta
        # Both APIs commit here, so pushes and deletes of either queue their webhook events.
        self.webhooks = webhooks
        self.is_public = PublicCache(self._read_public)

    async def _read_public(self, repository: str) -> bool:
        try:
            record = await self.meta.get_repo(repository)
        except CorruptRepository as exc:
            exc.skipped()
            return False  # private, the safe default, until a write repairs it
        return record is not None and record.public

    async def _sees(self, may_pull: MayPull | None, repository: str) -> bool:
        if may_pull is None or may_pull(repository):
            return True
        return await self.is_public(repository)

    # Uploads ----------------------------------------------------------------------

    async def start_upload(self, repository: str) -> str:
        repository_name(repository)
        return await asyncio.to_thread(self.blobs.start, repository)

    async def upload_info(self, upload_id: str) -> UploadInfo:
        return await asyncio.to_thread(self.blobs.info, upload_id)

    async def commit_upload(self, upload_id: str, digest: str) -> tuple[BlobStat, bool]:
        digest_of(digest)
        info = await self.upload_info(upload_id)
        stat, existed = await asyncio.to_thread(self.blobs.commit, upload_id, digest)
        if existed:
            metrics.BLOBS_DEDUPLICATED.inc()
        await self.meta.link_blob(info.repository, stat.digest, stat.size)
        return stat, existed

    async def cancel_upload(self, upload_id: str) -> None:
        await asyncio.to_thread(self.blobs.cancel, upload_id)

    # Blobs --------------------------------------------------------------------------

    async def stat_blob(self, repository: str, digest: str) -> BlobStat:
        repository_name(repository)
        digest = digest_of(digest)
        stat = self.blobs.stat(digest)
        if stat is None or not await self.meta.is_linked(repository, digest):
            raise blob_unknown(digest, repository)
        # A client that learns the blob exists will reference it soon: keep GC off it.
        self.blobs.touch(digest)
        return stat

    async def read_blob(
        self, repository: str, digest: str, offset: int, length: int
    ) -> AsyncIterator[Chunk]:
        stat = await self.stat_blob(repository, digest)
        if offset < 0 or length < 0:
            raise InvalidArgument(
                f"offset {offset} and length {length} must not be negative",
                reason="INVALID_RANGE",
                field="offset" if offset < 0 else "length",
            )
        if offset > stat.size:
            raise InvalidArgument(
                f"offset {offset} is past the end of {digest} ({stat.size} bytes)",
                reason="INVALID_RANGE",
                metadata={"offset": offset, "size": stat.size},
                field="offset",
            )
        end = stat.size if length == 0 else min(stat.size, offset + length)
        return self._chunks(digest, offset, end, stat.size)

    async def _chunks(self, digest: str, start: int, end: int, total: int) -> AsyncIterator[Chunk]:
        if start == end:
            yield Chunk(start, b"", total)
            return
        reader = self.blobs.open_reader(digest)

        def read(at: int) -> asyncio.Future[bytes]:
            size = min(READ_CHUNK_BYTES, end - at)
            return asyncio.ensure_future(asyncio.to_thread(reader.read, at, size))

        try:
            # Read the next chunk from disk while the current one is being sent.
            pending = read(start)
            at = start
            while at < end:
                data = await pending
                if not data:
                    raise NotFound(
                        f"blob {digest} is shorter than its recorded size",
                        reason="BLOB_UNKNOWN",
                        metadata={"digest": digest},
                        resource=("blob", digest),
                    )
                if at + len(data) < end:
                    pending = read(at + len(data))
                metrics.BYTES_SENT.inc(len(data))
                yield Chunk(at, data, total)
                at += len(data)
        finally:
            reader.close()

    async def mount_blob(
        self, repository: str, digest: str, source: str, may_pull: MayPull | None = None
    ) -> BlobStat | None:
        """Link an existing blob into `repository`; None if there is nothing to mount. The
        caller's right to pull `source` is checked before; without a source, a caller who
        may not pull everything mounts only a blob that a repository it sees holds, so a
        digest alone never opens a private repository's blob."""
        repository_name(repository)
        digest = digest_of(digest)
        if source:
            repository_name(source, "from_repository")
        # No file, nothing to mount: asked before any record is read (a pusher asks this for
        # every blob it is about to upload).
        stat = self.blobs.stat(digest)
        if stat is None:
            return None
        if source:
            if not await self.meta.is_linked(source, digest):
                return None
        elif may_pull is not None:
            for holder in await self.meta.linked_repos(digest):
                if await self._sees(may_pull, holder):
                    break
            else:
                return None
        self.blobs.touch(digest)
        await self.meta.link_blob(repository, digest, stat.size)
        return stat

    # Manifests --------------------------------------------------------------------------

    async def put_manifest(
        self, repository: str, reference: str, media_type: str, content: bytes
    ) -> tuple[str, int]:
        repository_name(repository)
        checked(validate_reference, reference, "INVALID_REFERENCE", "reference")
        with invalid("MANIFEST_INVALID", "content"):
            parsed = parse_manifest(content, media_type or None)
        digest = digest_bytes(content)
        if is_digest(reference) and reference != digest:
            raise InvalidArgument(
                f"manifest digest mismatch: reference is {reference} but the content hashes "
                f"to {digest}",
                reason="DIGEST_INVALID",
                metadata={"expected": reference, "actual": digest},
                field="reference",
            )
        missing: list[Violation] = []
        for index, blob in enumerate(parsed.required_blobs):
            where = "config" if parsed.config is not None and index == 0 else "layer"
            if self.blobs.stat(blob.digest) is None or not await self.meta.is_linked(
                repository, blob.digest
            ):
                missing.append(
                    Violation(
                        "BLOB_UNKNOWN",
                        f"blob/{blob.digest}",
                        f"{where} blob {blob.digest} is not in repository {repository}; "
                        "push or mount it before the manifest",
                    )
                )
            else:
                self.blobs.touch(blob.digest)
        for child in parsed.children:
            if not await self.meta.has_manifest(repository, child.digest):
                missing.append(
                    Violation(
                        "MANIFEST_UNKNOWN",
                        f"manifest/{child.digest}",
                        f"manifest {child.digest} listed in the index is not in repository "
                        f"{repository}; push it before the index",
                    )
                )
        if missing:
            digests = [v.subject.partition("/")[2] for v in missing]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FailedPrecondition(
                missing[0].description + more,
                reason="MANIFEST_BLOB_UNKNOWN",
                metadata={
                    "repository": repository,
                    "digest": digests[0],
                    "digests": ",".join(digests),
                },
                violations=missing,
            )
        await asyncio.to_thread(self.blobs.put, content)
        record = manifest_record_of(digest, parsed, len(content))
        tag = None if is_digest(reference) else reference
        target = Target(repository, digest, record.media_type, record.size, tag or "")
        await self.meta.put_manifest(repository, record, tag, self._queue(PUSH, target))
        return digest, len(content)

    async def resolve(self, repository: str, reference: str) -> ManifestRecord:
        repository_name(repository)
        checked(validate_reference, reference, "INVALID_REFERENCE", "reference")
        digest = reference
        if not is_digest(reference):
            tag = await self.meta.get_tag(repository, reference)
            if tag is None:
                await self.meta.require_repo(repository)
                raise manifest_unknown(
                    f"manifest unknown: {repository} has no tag {reference}",
                    repository,
                    reference,
                )
            digest = tag.digest
        record = await self.meta.get_manifest(repository, digest)
        if record is None:
            raise manifest_unknown(f"manifest unknown: {repository}@{digest}", repository, digest)
        return record

    async def get_manifest(self, repository: str, reference: str) -> StoredManifest:
        record = await self.resolve(repository, reference)
        content = await asyncio.to_thread(self.blobs.read_all, record.digest)
        return StoredManifest(record.digest, record.media_type, content)

    async def referrers(
        self, repository: str, digest: str, artifact_type: str = ""
    ) -> list[dict[str, object]]:
        """The descriptors of the repository's manifests whose `subject` is `digest` (OCI
        1.1's referrers), with `artifact_type` only those of that type; empty when none (also
        for a subject the repository does not hold, as the spec says). One pass over the
        repository's manifest records; the manifests themselves are read for their
        annotations only when they refer to the subject."""
        repository_name(repository)
        digest = digest_of(digest)
        await self.meta.require_repo(repository)
        found: list[ManifestRecord] = []
        after: str | None = None
        while True:
            page = await self.meta.list_manifests(repository, after, 1000)
            found += [
                e.record
                for e in page.entries
                if e.record.subject == digest
                and (not artifact_type or e.record.artifact_type == artifact_type)
            ]
            if not page.more or page.last is None:
                break
            after = page.last
        descriptors: list[dict[str, object]] = []
        for record in found:
            descriptor: dict[str, object] = {
                "mediaType": record.media_type,
                "digest": record.digest,
                "size": record.size,
            }
            if record.artifact_type:
                descriptor["artifactType"] = record.artifact_type
            try:
                content = await asyncio.to_thread(self.blobs.read_all, record.digest)
                annotations = parse_manifest(content, record.media_type).annotations
            except (NotFound, InvalidArgument):
                annotations = {}  # listed all the same: the record says it refers
            if annotations:
                descriptor["annotations"] = annotations
            descriptors.append(descriptor)
        return descriptors

    async def get_manifests(
        self,
        names: list[tuple[str, str]],
        include_configs: bool = False,
        may_pull: MayPull | None = None,
    ) -> list[BatchManifest]:
        """Manifests by (repository, digest), in order, with their image configs when asked:
        one etcd transaction per hundred records and one thread for the files, instead of a
        call per manifest and per config. Stops after about BATCH_RESPONSE_BYTES (at least
        one result): the caller asks again for the rest."""
        if len(names) > MAX_BATCH_MANIFESTS:
            raise InvalidArgument(
                f"{len(names)} manifests asked for, at most {MAX_BATCH_MANIFESTS} a call",
                field="manifests",
            )
        for repository, digest in names:
            repository_name(repository, "manifests")
            digest_of(digest, "manifests")
        # Once per repository: a batch names a repository once per manifest it reads there.
        shown = {repo: await self._sees(may_pull, repo) for repo in {r for r, _ in names}}
        records = [
            record if record is not None and shown[repo] else None
            for (repo, _), record in zip(names, await self.meta.get_manifests(names), strict=True)
        ]
        return await asyncio.to_thread(self._batch_files, names, records, include_configs)

    def _batch_files(
        self,
        names: list[tuple[str, str]],
        records: list[ManifestRecord | None],
        include_configs: bool,
    ) -> list[BatchManifest]:
        """The files of a batch (in a thread: they are many small reads)."""
        results: list[BatchManifest] = []
        size = 0
        for (repository, digest), record in zip(names, records, strict=True):
            if results and size >= BATCH_RESPONSE_BYTES:
                break
            try:
                content = self.blobs.read_all(digest) if record is not None else None
            except NotFound:
                content = None  # its record outlived the file: as good as gone
            if record is None or content is None:
                results.append(BatchManifest(repository, digest, False))
                continue
            config = self._config_of(content, record.media_type) if include_configs else b""
            results.append(
                BatchManifest(repository, digest, True, record.media_type, content, config)
            )
            size += len(content) + len(config)
        return results

    def _config_of(self, content: bytes, media_type: str) -> bytes:
        """An image manifest's config blob, b"" when there is none to give (the manifest is
        not an image's, the config is too large, or unreadable: the client reads it with
        ReadBlob and learns why)."""
        try:
            parsed = parse_manifest(content, media_type)
        except InvalidArgument:
            return b""
        config = parsed.config
        if config is None or config.media_type not in CONFIG_TYPES:
            return b""
        if config.size > MAX_BATCH_CONFIG:
            return b""
        try:
            data = self.blobs.read_all(config.digest)
        except NotFound:
            return b""
        return data if len(data) == config.size else b""

    async def delete_manifest(self, repository: str, reference: str) -> tuple[str, list[str]]:
        try:
            digest = (await self.resolve(repository, reference)).digest
        except CorruptManifest as exc:
            # A damaged record can still be deleted: that is how an operator clears it.
            digest = exc.digest
        queue = self._queue(DELETE, Target(repository, digest))
        tags = await self.meta.delete_manifest(repository, digest, queue)
        return digest, tags

    # Repositories and tags -------------------------------------------------------------------

    async def list_repositories(
        self, size: int, token: str, may_pull: MayPull | None = None
    ) -> tuple[list[RepoRecord], str]:
        limit = page_size(size)
        after = _last(token, "repositories")
        if may_pull is None:
            page = await self.meta.list_repos(after, limit)
            more = page.more and page.last is not None
            return page.records, encode_token("repositories", page.last) if more else ""
        # Read on past hidden repositories until one more visible than the page shows, so a
        # token (and the promise of a next page) only ever comes from a visible one.
        shown: list[RepoRecord] = []
        while len(shown) <= limit:
            batch = await self.meta.list_repos(after, limit + 1)
            shown += [r for r in batch.records if sees(may_pull, r.name, r.public)]
            if not batch.more or batch.last is None:
                break
            after = batch.last
        page = shown[:limit]
        more = len(shown) > limit
        return page, encode_token("repositories", page[-1].name) if more else ""

    async def list_manifests(
        self, repository: str, size: int, token: str, may_pull: MayPull | None = None
    ) -> tuple[list[ListedManifest], str]:
        """A page of manifests of one repository (or all), in `<repository>@<digest>` order.
        Every page of a listing is read at the etcd revision of its first page, so the pages
        together are one consistent view; once etcd has compacted that revision away, the
        listing must start over (ABORTED). A listing of every repository shows only those the
        caller sees (`may_pull`); one repository's was authorized on its name."""
        if repository:
            repository_name(repository)
        limit = page_size(size)
        revision, after = decode_manifest_token(token, repository)
        if not repository and may_pull is not None:
            return await self._visible_manifests(may_pull, limit, revision, after)
        try:
            page = await self.meta.list_manifests(repository or None, after, limit, revision)
            if (
                repository
                and not page.entries
                and after is None
                and not await self.meta.repo_exists_at(repository, page.revision)
            ):
                raise name_unknown(repository)
        except RevisionCompacted as exc:
            raise listing_expired(revision) from exc
        more = page.more and page.last is not None
        next_token = encode_manifest_token(page.revision, page.last) if more else ""
        return page.entries, next_token

    async def _visible_manifests(
        self, may_pull: MayPull, limit: int, revision: int, after: str | None
    ) -> tuple[list[ListedManifest], str]:
        """list_manifests over every repository the caller sees: read on past hidden entries
        until one more visible entry than the page holds (or the end)."""
        seen: dict[str, bool] = {}
        shown: list[ListedManifest] = []
        try:
            while len(shown) <= limit:
                page = await self.meta.list_manifests(None, after, limit + 1, revision)
                revision = page.revision
                for entry in page.entries:
                    if entry.repository not in seen:
                        seen[entry.repository] = await self._sees(may_pull, entry.repository)
                    if seen[entry.repository]:
                        shown.append(entry)
                if not page.more or page.last is None:
                    break
                after = page.last
        except RevisionCompacted as exc:
            raise listing_expired(revision) from exc
        entries = shown[:limit]
        more = len(shown) > limit
        return entries, encode_manifest_token(revision, entries[-1].key) if more else ""

    async def get_repository(self, repository: str) -> RepoRecord:
        repository_name(repository)
        return await self.meta.require_repo(repository)

    async def update_repository(
        self,
        repository: str,
        description: str | None,
        labels: dict[str, str],
        replace_labels: bool,
        visibility: str | None = None,
    ) -> RepoRecord:
        """Change what is given (None: leave it). `visibility` is "private" or "public"."""
        repository_name(repository)
        if visibility is not None and visibility not in VISIBILITIES:
            raise InvalidArgument(
                f"unknown visibility {visibility!r}: one of {', '.join(VISIBILITIES)}",
                reason="VISIBILITY_INVALID",
                field="visibility",
            )
        if description is not None and len(description) > 4096:
            raise InvalidArgument("description is longer than 4096 characters", field="description")
        for key in labels:
            if not key or len(key) > 256:
                raise InvalidArgument(
                    f"label key {key!r} must be 1 to 256 characters", field="labels"
                )

        def change(record: RepoRecord) -> None:
            if description is not None:
                record.description = description
            if replace_labels:
                record.labels = dict(labels)
            else:
                record.labels.update(labels)
            if visibility is not None:
                record.visibility = visibility

        record = await self.meta.update_repo(repository, change)
        self.is_public.forget(repository)
        return record

    async def list_tags(
        self, repository: str, size: int, token: str
    ) -> tuple[list[TagRecord], str]:
        repository_name(repository)
        await self.meta.require_repo(repository)
        limit = page_size(size)
        scope = f"tags:{repository}"
        page = await self.meta.list_tags(repository, _last(token, scope), limit)
        more = page.more and page.last is not None
        return page.records, encode_token(scope, page.last) if more else ""

    async def delete_tag(self, repository: str, tag: str) -> str:
        repository_name(repository)
        checked(validate_tag, tag, "INVALID_REFERENCE", "tag")
        queue = self._queue(DELETE, Target(repository, tag=tag))
        return await self.meta.delete_tag(repository, tag, queue)

    def _queue(self, action: str, target: Target) -> QueueOps | None:
        return self.webhooks.queue_ops(action, target) if self.webhooks else None

    async def search(
        self,
        term: str,
        labels: dict[str, str],
        size: int,
        token: str,
        may_pull: MayPull | None = None,
    ) -> tuple[list[RepoRecord], str]:
        """A page of the repositories matching term and labels that the caller sees, best
        match first."""
        limit = page_size(size)
        scope = scope_of("registry.Search", term.strip().lower(), labels)
        after = decode_token(token, scope)
        records = [r for r in await self.meta.all_repos() if sees(may_pull, r.name, r.public)]
        ranked = rank_repositories(records, term, labels)
        if after is not None:
            if len(after) != 2 or not isinstance(after[0], int) or not isinstance(after[1], str):
                raise bad_token()
            rank, name = after
            ranked = [(r, record) for r, record in ranked if (r, record.name) > (rank, name)]
        page = ranked[:limit]
        more = len(ranked) > limit
        next_token = encode_token(scope, page[-1][0], page[-1][1].name) if more else ""
        return [record for _, record in page], next_token


def manifest_record_of(digest: str, parsed: ParsedManifest, size: int) -> ManifestRecord:
    """The etcd record of a parsed manifest (also how GC rebuilds a damaged one)."""
    references = tuple(d.digest for d in (*parsed.required_blobs, *parsed.children))
    artifact_type = parsed.artifact_type or (
        parsed.config.media_type if parsed.config is not None else ""
    )
    return ManifestRecord(
        digest,
        parsed.media_type,
        size,
        references,
        time.time(),
        parsed.subject.digest if parsed.subject is not None else "",
        artifact_type or "",
    )


def manifest_unknown(message: str, repository: str, reference: str) -> NotFound:
    return NotFound(
        message,
        reason="MANIFEST_UNKNOWN",
        metadata={"repository": repository, "reference": reference},
        resource=(
            "manifest",
            f"{repository}@{reference}" if is_digest(reference) else f"{repository}:{reference}",
        ),
    )


def rank_repositories(
    records: list[RepoRecord], term: str, labels: dict[str, str]
) -> list[tuple[int, RepoRecord]]:
    """Filter by labels, then rank: a name starting with the term (0), a name containing it
    (1), a description containing it (2), a label containing it (3); ties in name order."""
    needle = term.strip().lower()
    ranked: list[tuple[int, str, RepoRecord]] = []
    for record in records:
        if any(record.labels.get(k) != v for k, v in labels.items()):
            continue
        if needle in record.name:
            rank = 0 if record.name.rsplit("/", 1)[-1].startswith(needle) else 1
        elif needle in record.description.lower():
            rank = 2
        elif any(needle in f"{k}={v}".lower() for k, v in record.labels.items()):
            rank = 3
        else:
            continue
        ranked.append((rank, record.name, record))
    ranked.sort(key=lambda item: item[:2])
    return [(rank, record) for rank, _, record in ranked]
