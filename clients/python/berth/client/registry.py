"""Typed, synchronous client for berth's RegistryService.

Methods take and return plain Python values and raise BerthClientError; no protobuf message
or gRPC error reaches the caller. Blob transfers move in 1 MiB chunks and resume after a
broken connection.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

import grpc

from berth.enums.registry import VISIBILITIES
from berth.error_details import from_rpc_error as details_of
from berth.errors import BerthClientError, from_rpc_error
from berth.files import fsync_dir
from berth.reference import Reference, validate_digest, validate_repository, validate_tag
from berth.registry.v1 import registry_pb2 as pb
from berth.registry.v1 import registry_pb2_grpc as pb_grpc
from berth.resume import CHUNK_SIZE, committed_offset, is_broken_stream, resume_download
from berth.tls import secure_channel
from berth.types.v1 import progress_pb2

MAX_MESSAGE_BYTES = 16 << 20
# Unary calls get a deadline so a wedged server cannot hang the CLI; streams and GC do not,
# since their duration grows with the data.
DEFAULT_TIMEOUT = 60.0
RESUME_ATTEMPTS = 5

Progress = Callable[[int, int], None]
"""progress(bytes_done, total); during uploads it is called from a gRPC worker thread."""

T = TypeVar("T")


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int


@dataclass(frozen=True)
class PushResult:
    """outcome: "exists" (already in the repository), "mounted" (linked from another
    repository) or "pushed" (uploaded). Only "pushed" sent any bytes."""

    outcome: Literal["exists", "mounted", "pushed"]
    digest: str
    size: int


@dataclass(frozen=True)
class ManifestData:
    digest: str
    media_type: str
    content: bytes


@dataclass(frozen=True)
class DeletedManifest:
    digest: str
    deleted_tags: list[str]


@dataclass(frozen=True)
class RepositoryInfo:
    """visibility: "private" (only callers allowed to pull it see it) or "public" (anyone,
    with or without a credential)."""

    name: str
    description: str
    labels: dict[str, str]
    tag_count: int
    created_at: datetime | None
    last_push_at: datetime | None
    visibility: str = "private"


@dataclass(frozen=True)
class TagInfo:
    name: str
    digest: str
    pushed_at: datetime | None


@dataclass(frozen=True)
class GcReport:
    deleted: list[BlobInfo]
    reclaimed_bytes: int
    blobs_marked: int
    blobs_young: int
    uploads_removed: int = 0


@dataclass(frozen=True)
class GcProgress:
    """A stage of a collection: "mark" (manifests read) or "sweep" (blobs checked, of total;
    0 when unknown); done once the stage is over."""

    stage: str
    current: int
    total: int
    done: bool


@dataclass(frozen=True)
class ManifestInfo:
    """A manifest stored in one repository. references: the digests it references (an
    image's config then layers, an index's manifests); tags: the repository's tags naming it."""

    repository: str
    digest: str
    media_type: str
    size: int
    references: list[str]
    tags: list[TagInfo]
    pushed_at: datetime | None


@dataclass(frozen=True)
class ImageReference:
    """REPO[:TAG][@DIGEST] split into its parts; tag and digest are None when absent.

    Each part is checked by the shared grammar (berth.reference) when constructed."""

    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        validate_repository(self.repository)
        if self.tag is not None:
            validate_tag(self.tag)
        if self.digest is not None:
            validate_digest(self.digest)

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest, else the tag, else "latest"."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = self.repository + (f":{self.tag}" if self.tag else "")
        return text + (f"@{self.digest}" if self.digest else "")


def parse_image_reference(text: str) -> ImageReference:
    """Parse REPO[:TAG][@DIGEST], a name in one registry (no host part), with the shared
    distribution-spec grammar; a bad part raises berth.reference.InvalidReference, a
    BerthClientError with code INVALID_ARGUMENT."""
    ref = Reference.parse(text, default_tag=None, registry=False)
    return ImageReference(ref.repository, ref.tag, ref.digest)


class RegistryClient:
    """Blocking client for one registry address. Use as a context manager, or call close()."""

    def __init__(self, address: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self._timeout = timeout
        self._channel = secure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._stub = pb_grpc.RegistryServiceStub(self._channel)

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # --- blobs -----------------------------------------------------------------------------

    def stat_blob(self, repository: str, digest: str) -> BlobInfo | None:
        """The blob's digest and size, or None when the repository does not hold it."""
        try:
            response = self._stub.StatBlob(
                pb.StatBlobRequest(repository=repository, digest=digest), timeout=self._timeout
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise self._error(err) from err
        return BlobInfo(response.descriptor.digest or digest, response.descriptor.size)

    def mount_blob(self, repository: str, digest: str, from_repository: str = "") -> bool:
        """Link a blob the registry stores into repository; False when it must be uploaded."""
        request = pb.MountBlobRequest(
            repository=repository, digest=digest, from_repository=from_repository
        )
        return self._unary(self._stub.MountBlob, request).mounted

    def push_blob(
        self,
        repository: str,
        source: str | os.PathLike[str] | BinaryIO,
        digest: str,
        size: int,
        progress: Progress | None = None,
    ) -> PushResult:
        """Make the blob available in repository, sending bytes only when the registry lacks it.

        source is a path or a binary file object positioned at the blob's first byte (seekable,
        so an interrupted upload can resume).
        """
        if self.stat_blob(repository, digest) is not None:
            outcome: Literal["exists", "mounted", "pushed"] = "exists"
        elif self.mount_blob(repository, digest):
            outcome = "mounted"
        else:
            with _open_source(source) as fileobj:
                self._upload(repository, fileobj, digest, size, progress)
            outcome = "pushed"
        if progress is not None:
            progress(size, size)
        return PushResult(outcome, digest, size)

    def pull_blob(
        self,
        repository: str,
        digest: str,
        dest_path: str | os.PathLike[str],
        progress: Progress | None = None,
    ) -> int:
        """Download a blob to dest_path, verifying its digest; returns its size.

        Bytes land in `<dest>.partial`, which a later call resumes from; the file is renamed
        into place only once the digest matches, so dest_path never holds a partial blob.
        """
        # NOT_FOUND is the registry's own error here (reason BLOB_UNKNOWN, the digest).
        request = pb.StatBlobRequest(repository=repository, digest=digest)
        descriptor = self._unary(self._stub.StatBlob, request).descriptor
        info = BlobInfo(descriptor.digest or digest, descriptor.size)
        dest = Path(dest_path)
        partial = dest.with_name(dest.name + ".partial")
        hasher, expected, offset = resume_download(partial, digest, info.size)
        with open(partial, "ab") as out:
            offset = self._download(repository, digest, out, hasher, offset, info.size, progress)
            out.flush()
            os.fsync(out.fileno())
        if offset != info.size or hasher.hexdigest() != expected:
            partial.unlink(missing_ok=True)
            raise BerthClientError(
                f"blob {digest} from {repository} does not match its digest "
                f"(got {hasher.name}:{hasher.hexdigest()}, {offset} bytes); "
                "the partial download was deleted, pull again",
                "DATA_LOSS",
            )
        os.replace(partial, dest)
        fsync_dir(dest.parent)
        return info.size

    # --- manifests ---------------------------------------------------------------------------

    def put_manifest(self, repository: str, reference: str, media_type: str, content: bytes) -> str:
        """Store a manifest under a tag (or its own digest); returns the manifest digest."""
        request = pb.PutManifestRequest(
            repository=repository, reference=reference, media_type=media_type, content=content
        )
        return self._unary(self._stub.PutManifest, request).digest

    def get_manifest(self, repository: str, reference: str) -> ManifestData:
        """A manifest by tag or digest, with its bytes exactly as pushed."""
        request = pb.GetManifestRequest(repository=repository, reference=reference)
        response = self._unary(self._stub.GetManifest, request)
        return ManifestData(response.digest, response.media_type, response.content)

    def delete_manifest(self, repository: str, reference: str) -> DeletedManifest:
        """Delete a manifest (by digest, or the one a tag names) and every tag pointing at it."""
        request = pb.DeleteManifestRequest(repository=repository, reference=reference)
        response = self._unary(self._stub.DeleteManifest, request)
        return DeletedManifest(response.digest, list(response.deleted_tags))

    # --- repositories and tags ---------------------------------------------------------------

    def iter_repositories(self, page_size: int = 1000) -> Iterator[RepositoryInfo]:
        """Every repository in name order, fetched a page at a time (the largest page by
        default: a page costs a call and an etcd read that grows with the repositories after
        it, so 2000 repositories take 2 pages, not 20)."""

        def page(token: str) -> tuple[list[RepositoryInfo], str]:
            request = pb.ListRepositoriesRequest(page_size=page_size, page_token=token)
            response = self._unary(self._stub.ListRepositories, request)
            return [_repository(r) for r in response.repositories], response.next_page_token

        return _paginate(page)

    def iter_tags(self, repository: str, page_size: int = 100) -> Iterator[TagInfo]:
        """Every tag of a repository in name order, fetched a page at a time."""

        def page(token: str) -> tuple[list[TagInfo], str]:
            request = pb.ListTagsRequest(
                repository=repository, page_size=page_size, page_token=token
            )
            response = self._unary(self._stub.ListTags, request)
            return [_tag(t) for t in response.tags], response.next_page_token

        return _paginate(page)

    def iter_manifests(self, repository: str = "", page_size: int = 1000) -> Iterator[ManifestInfo]:
        """Every manifest of every repository (or of one), with its references and tags, in
        `<repository>@<digest>` order, fetched a page at a time. All pages show the registry
        as of the first one; ABORTED means that view expired: iterate again."""

        def page(token: str) -> tuple[list[ManifestInfo], str]:
            request = pb.ListManifestsRequest(
                repository=repository, page_size=page_size, page_token=token
            )
            response = self._unary(self._stub.ListManifests, request)
            entries = [
                ManifestInfo(
                    repository=m.repository,
                    digest=m.digest,
                    media_type=m.media_type,
                    size=m.size,
                    references=list(m.references),
                    tags=[_tag(t) for t in m.tags],
                    pushed_at=_timestamp(m, "pushed_at"),
                )
                for m in response.manifests
            ]
            return entries, response.next_page_token

        return _paginate(page)

    def get_repository(self, repository: str) -> RepositoryInfo:
        request = pb.GetRepositoryRequest(repository=repository)
        return _repository(self._unary(self._stub.GetRepository, request).repository)

    def update_repository(
        self,
        repository: str,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        replace_labels: bool = False,
        visibility: str | None = None,
    ) -> RepositoryInfo:
        """Set the description (None leaves it) and merge labels in, or replace them all;
        `visibility` "public" or "private" (None leaves it)."""
        request = pb.UpdateRepositoryRequest(
            repository=repository, labels=dict(labels or {}), replace_labels=replace_labels
        )
        if description is not None:
            request.description = description
        if visibility is not None:
            if visibility not in VISIBILITIES:
                names = " or ".join(VISIBILITIES.names)
                raise BerthClientError(
                    f'invalid visibility "{visibility}": {names}', "INVALID_ARGUMENT"
                )
            request.visibility = VISIBILITIES.value(visibility)
        return _repository(self._unary(self._stub.UpdateRepository, request).repository)

    def delete_tag(self, repository: str, tag: str) -> str:
        """Remove a tag; returns the digest it pointed at (the manifest stays)."""
        request = pb.DeleteTagRequest(repository=repository, tag=tag)
        return self._unary(self._stub.DeleteTag, request).digest

    def iter_search(
        self, term: str, labels: Mapping[str, str] | None = None, page_size: int = 100
    ) -> Iterator[RepositoryInfo]:
        """Every repository matching term (names first, then descriptions and labels), fetched
        a page at a time."""

        def page(token: str) -> tuple[list[RepositoryInfo], str]:
            request = pb.SearchRequest(
                term=term, labels=dict(labels or {}), page_size=page_size, page_token=token
            )
            response = self._unary(self._stub.Search, request)
            return [_repository(r) for r in response.results], response.next_page_token

        return _paginate(page)

    def search(
        self, term: str, labels: Mapping[str, str] | None = None, limit: int = 25
    ) -> list[RepositoryInfo]:
        """The best `limit` repositories matching term (names first, then descriptions and
        labels)."""
        found = self.iter_search(term, labels, page_size=min(max(limit, 1), 1000))
        return [r for _, r in zip(range(limit), found, strict=False)]

    def garbage_collect(
        self,
        dry_run: bool = False,
        grace_seconds: float | None = None,
        progress: Callable[[GcProgress], None] | None = None,
    ) -> GcReport:
        """Delete unreferenced blobs older than grace_seconds (None: the server default, 1 h;
        0: every unreferenced blob); progress, if given, sees each stage's advance."""
        request = pb.GarbageCollectRequest(dry_run=dry_run)
        if grace_seconds is not None:
            request.min_age.FromNanoseconds(int(grace_seconds * 1e9))
        try:
            for event in self._stub.GarbageCollect(request):
                if event.HasField("result"):
                    result = event.result
                    return GcReport(
                        deleted=[BlobInfo(d.digest, d.size) for d in result.deleted],
                        reclaimed_bytes=result.reclaimed_bytes,
                        blobs_marked=result.blobs_marked,
                        blobs_young=result.blobs_young,
                        uploads_removed=result.uploads_removed,
                    )
                if progress is not None and event.HasField("progress"):
                    p = event.progress
                    done = p.state == progress_pb2.PROGRESS_STATE_DONE
                    progress(GcProgress(p.id, p.current, p.total, done))
        except grpc.RpcError as err:
            raise self._error(err) from err
        raise BerthClientError("garbage collection ended without a result", "UNKNOWN")

    # --- internals ---------------------------------------------------------------------------

    def _unary(self, method: Callable[..., T], request: object, deadline: bool = True) -> T:
        try:
            return method(request, timeout=self._timeout if deadline else None)
        except grpc.RpcError as err:
            raise self._error(err) from err

    def _error(self, err: grpc.RpcError) -> BerthClientError:
        return from_rpc_error(err, address=self.address, service="registry")

    def _upload(
        self,
        repository: str,
        fileobj: BinaryIO,
        digest: str,
        size: int,
        progress: Progress | None,
    ) -> None:
        start = self._unary(self._stub.StartUpload, pb.StartUploadRequest(repository=repository))
        try:
            self._send_and_commit(start.upload_id, repository, fileobj, digest, size, progress)
        except BaseException:
            self._cancel_quietly(start.upload_id)
            raise

    def _send_and_commit(
        self,
        upload_id: str,
        repository: str,
        fileobj: BinaryIO,
        digest: str,
        size: int,
        progress: Progress | None,
    ) -> None:
        base = fileobj.tell()
        offset: int | None = 0  # None: unknown after a broken stream, ask the server
        for attempt in range(RESUME_ATTEMPTS + 1):
            try:
                if offset is None:
                    offset = self._stub.GetUpload(
                        pb.GetUploadRequest(upload_id=upload_id), timeout=self._timeout
                    ).offset
                if offset < size:
                    offset = self._write(upload_id, fileobj, base, offset, size, progress)
                if offset != size:
                    raise BerthClientError(
                        f"blob {digest}: the source ends after {offset} bytes, expected {size}",
                        "DATA_LOSS",
                    )
                commit = pb.CommitUploadRequest(upload_id=upload_id, digest=digest)
                self._stub.CommitUpload(commit, timeout=self._timeout)
                return
            except grpc.RpcError as err:
                # A commit whose reply was lost leaves no session behind, but a visible blob.
                if (
                    attempt
                    and err.code() == grpc.StatusCode.NOT_FOUND
                    and self.stat_blob(repository, digest) is not None
                ):
                    return
                if attempt == RESUME_ATTEMPTS:
                    raise self._error(err) from err
                resume = _resume_offset(err)
                if resume is not None:
                    # The session holds other bytes than this client thought (a write whose
                    # answer was lost): the error says where it stands; go on from there.
                    offset = resume
                    continue
                if not is_broken_stream(err.code(), err.details()):
                    raise self._error(err) from err
                offset = None
                time.sleep(min(0.25 * 2**attempt, 4.0))

    def _write(
        self,
        upload_id: str,
        fileobj: BinaryIO,
        base: int,
        offset: int,
        size: int,
        progress: Progress | None,
    ) -> int:
        """Send bytes [offset, size) in one WriteUpload stream; returns the committed offset."""
        reader = _ChunkReader(upload_id, fileobj, base, offset, size, progress)
        response = self._stub.WriteUpload(reader.chunks())
        if reader.error is not None:
            raise reader.error
        return response.offset

    def _download(
        self,
        repository: str,
        digest: str,
        out: BinaryIO,
        hasher: Any,
        offset: int,
        total: int,
        progress: Progress | None,
    ) -> int:
        """Append the blob's bytes from offset to out, resuming after broken streams."""
        for attempt in range(RESUME_ATTEMPTS + 1):
            if progress is not None:
                progress(offset, total)
            if offset >= total:
                return offset
            request = pb.ReadBlobRequest(repository=repository, digest=digest, offset=offset)
            try:
                for chunk in self._stub.ReadBlob(request):
                    if chunk.offset != offset or offset + len(chunk.data) > total:
                        raise BerthClientError(
                            f"registry sent {len(chunk.data)} bytes of {digest} at offset "
                            f"{chunk.offset}, expected offset {offset} of {total}",
                            "DATA_LOSS",
                        )
                    out.write(chunk.data)
                    hasher.update(chunk.data)
                    offset += len(chunk.data)
                    if progress is not None:
                        progress(offset, total)
                return offset
            except grpc.RpcError as err:
                if attempt == RESUME_ATTEMPTS or not is_broken_stream(err.code(), err.details()):
                    raise self._error(err) from err
                time.sleep(min(0.25 * 2**attempt, 4.0))
        return offset

    def _cancel_quietly(self, upload_id: str) -> None:
        """Best effort: free the server's partial upload; the caller is already failing."""
        with suppress(grpc.RpcError):
            self._stub.CancelUpload(pb.CancelUploadRequest(upload_id=upload_id), timeout=2.0)


@dataclass
class _ChunkReader:
    """Yields WriteUploadRequests from a file. A read error ends the stream early and is kept
    in `error`, so it surfaces as itself instead of as a cancelled RPC."""

    upload_id: str
    fileobj: BinaryIO
    base: int
    offset: int
    size: int
    progress: Progress | None
    error: OSError | None = field(default=None)

    def chunks(self) -> Iterator[pb.WriteUploadRequest]:
        offset = self.offset
        try:
            self.fileobj.seek(self.base + offset)
            while offset < self.size:
                data = self.fileobj.read(min(CHUNK_SIZE, self.size - offset))
                if not data:
                    return
                yield pb.WriteUploadRequest(upload_id=self.upload_id, offset=offset, data=data)
                offset += len(data)
                if self.progress is not None:
                    self.progress(offset, self.size)
        except OSError as exc:
            self.error = exc


def _resume_offset(err: grpc.RpcError) -> int | None:
    """The committed offset an UPLOAD_OFFSET_MISMATCH error reports, else None."""
    if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return None
    return committed_offset(details_of(err))


def _paginate(fetch: Callable[[str], tuple[list[T], str]]) -> Iterator[T]:
    token = ""
    while True:
        items, token = fetch(token)
        yield from items
        if not token:
            return


def _timestamp(message: Any, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    return getattr(message, name).ToDatetime(tzinfo=UTC)


def _repository(message: pb.Repository) -> RepositoryInfo:
    return RepositoryInfo(
        name=message.name,
        description=message.description,
        labels=dict(message.labels),
        tag_count=message.tag_count,
        created_at=_timestamp(message, "created_at"),
        last_push_at=_timestamp(message, "last_push_at"),
        # Never unspecified from a registry that knows visibility; private is the default.
        visibility=VISIBILITIES.name(message.visibility, "private"),
    )


def _tag(message: pb.Tag) -> TagInfo:
    return TagInfo(message.name, message.digest, _timestamp(message, "pushed_at"))


@contextmanager
def _open_source(source: str | os.PathLike[str] | BinaryIO) -> Iterator[BinaryIO]:
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as fileobj:
            yield fileobj
    else:
        yield source
