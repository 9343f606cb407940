"""berth's registry as the other services call it: blobs, manifests and tags, asyncio end to end.

Blob transfers move in 1 MiB chunks and survive a broken connection: an upload asks the
registry where its session stands and goes on from there, a download goes on from the bytes
already in its `.partial` file. File reads, writes and hashing run in worker threads so the
event loop keeps serving while a large layer moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import grpc

from berth.client.registry import DeletedManifest, ManifestData
from berth.files import fsync_dir
from berth.registry.v1 import registry_pb2 as pb
from berth.registry.v1 import registry_pb2_grpc as pb_grpc
from berth.resume import (
    CHUNK_SIZE,
    committed_offset,
    digest_hasher,
    is_broken_stream,
    resume_download,
)
from berthd.common.errors import Aborted, DataLoss, FailedPrecondition, InvalidArgument, NotFound
from berthd.common.oci.digest import digest_bytes
from berthd.common.oci.manifest import Descriptor
from berthd.common.oci.reference import invalid_argument
from berthd.common.rpc.calls import ServiceApi

RESUME_ATTEMPTS = 5
LISTING_PAGE = 1000
LISTING_ATTEMPTS = 3
# A blob read into memory whole (a config) may be at most this large.
MAX_SMALL_BLOB = 16 << 20
# Manifests named per BatchGetManifests call (the registry takes up to 1000).
MAX_BATCH_MANIFESTS = 1000
# Chunks smaller than this are hashed on the event loop.
SMALL_CHUNK = 64 << 10

Progress = Callable[[int, int], None]
"""progress(bytes_done, total), called on the event loop."""
PushOutcome = Literal["exists", "mounted", "pushed"]


@dataclass(frozen=True)
class BatchedManifest:
    """One manifest of a batch read: None when its repository does not hold it; `config` the
    image config's bytes as the registry sent them (b"": not sent, read it with ReadBlob)."""

    repository: str
    manifest: ManifestData | None
    config: bytes


@dataclass(frozen=True)
class ManifestEntry:
    """A manifest in one repository, the tags naming it there and the digests it references."""

    repository: str
    digest: str
    media_type: str
    references: tuple[str, ...]
    tags: tuple[str, ...]


class RegistryApi(ServiceApi[pb_grpc.RegistryServiceStub]):
    SERVICE = "registry"
    PREFIX = True

    def stub(self, channel: grpc.aio.Channel) -> pb_grpc.RegistryServiceStub:
        return pb_grpc.RegistryServiceStub(channel)

    # --- blobs -----------------------------------------------------------------------------

    async def stat_blob(self, repository: str, digest: str) -> int | None:
        """The blob's size, or None when the repository does not hold it."""
        request = pb.StatBlobRequest(repository=repository, digest=digest)
        try:
            response = await self.unary("StatBlob", request, idempotent=True)
        except NotFound:
            return None
        return int(response.descriptor.size)

    async def mount_blob(self, repository: str, digest: str, from_repository: str = "") -> bool:
        """Link a blob the registry stores into repository; False when it must be uploaded."""
        request = pb.MountBlobRequest(
            repository=repository, digest=digest, from_repository=from_repository
        )
        return bool((await self.unary("MountBlob", request, idempotent=True)).mounted)

    async def push_blob(
        self,
        repository: str,
        source: Path,
        digest: str,
        size: int,
        progress: Progress | None = None,
        *,
        start: int = 0,
    ) -> PushOutcome:
        """Make the file's bytes available in repository as `digest`, sending them only when
        the registry lacks the blob. The blob is the `size` bytes of the file from `start` (a
        member of a spooled archive is pushed from where it lies)."""
        outcome: PushOutcome
        if await self.stat_blob(repository, digest) is not None:
            outcome = "exists"
        elif await self.mount_blob(repository, digest):
            outcome = "mounted"
        else:
            await self._upload(repository, source, digest, size, progress, start)
            outcome = "pushed"
        if progress is not None:
            progress(size, size)
        return outcome

    async def push_bytes(self, repository: str, data: bytes, media_type: str) -> Descriptor:
        """Store a small blob (a config) in repository."""
        digest = digest_bytes(data)
        if await self.stat_blob(repository, digest) is None and not await self.mount_blob(
            repository, digest
        ):
            await self._upload(repository, io.BytesIO(data), digest, len(data), None)
        return Descriptor(media_type, digest, len(data))

    async def pull_blob(
        self,
        repository: str,
        digest: str,
        dest: Path,
        progress: Progress | None = None,
        *,
        size: int | None = None,
    ) -> int:
        """Download a blob to `dest`, verifying its digest (and its `size`, the one its
        descriptor gives, before any byte moves); returns its size.

        Bytes land in `<dest>.partial`, which a later call resumes from; `dest` appears only
        once the digest matches, so it never holds a partial blob."""
        stored = await self.stat_blob(repository, digest)
        if stored is None:
            raise NotFound(f"registry: blob {digest} not found in {repository}")
        if size is not None and stored != size:
            raise size_mismatch(repository, digest, stored, size)
        size = stored
        partial = dest.with_name(dest.name + ".partial")
        with invalid_argument():
            hasher, expected, offset = await asyncio.to_thread(
                resume_download, partial, digest, size
            )
        if progress is not None:
            progress(offset, size)
        with open(partial, "ab") as out:
            async with contextlib.aclosing(self._read(repository, digest, offset, size)) as data:
                async for chunk in data:
                    await asyncio.to_thread(_append, out, hasher, chunk)
                    offset += len(chunk)
                    if progress is not None:
                        progress(offset, size)
            await asyncio.to_thread(_flush, out)
        if offset != size or hasher.hexdigest() != expected:
            partial.unlink(missing_ok=True)
            raise _mismatch(repository, digest, hasher, offset, "the partial download was deleted")
        os.replace(partial, dest)
        await asyncio.to_thread(fsync_dir, dest.parent)
        return size

    async def stream_blob(self, repository: str, digest: str, size: int) -> AsyncIterator[bytes]:
        """A blob's bytes as they arrive, hashed on the way: no copy on disk. The digest is
        known right only at the end, so a blob that does not match ends in DataLoss after its
        last bytes, and the consumer must drop what it received (a save writes atomically)."""
        with invalid_argument():
            hasher, expected = digest_hasher(digest)
        offset = 0
        async with contextlib.aclosing(self._read(repository, digest, 0, size)) as data:
            async for chunk in data:
                if len(chunk) < SMALL_CHUNK:  # a config: hashed faster than a thread starts
                    hasher.update(chunk)
                else:
                    await asyncio.to_thread(hasher.update, chunk)
                offset += len(chunk)
                yield chunk
        if offset != size or hasher.hexdigest() != expected:
            raise _mismatch(repository, digest, hasher, offset, "do not use what was received")

    async def read_blob(self, repository: str, digest: str, size: int | None = None) -> bytes:
        """A small blob (a config) in memory, verified against its digest (and its `size`,
        when a descriptor gives it: then the blob is read without asking its size first)."""
        if size is None:
            size = await self.stat_blob(repository, digest)
        if size is None:
            raise NotFound(f"registry: blob {digest} not found in {repository}")
        if size > MAX_SMALL_BLOB:
            raise InvalidArgument(
                f"blob {digest} in {repository} is {size} bytes, over {MAX_SMALL_BLOB} for a config"
            )
        return b"".join([chunk async for chunk in self.stream_blob(repository, digest, size)])

    # --- manifests and tags ----------------------------------------------------------------

    async def get_manifest(self, repository: str, reference: str) -> ManifestData:
        """A manifest by tag or digest, with its bytes exactly as pushed."""
        request = pb.GetManifestRequest(repository=repository, reference=reference)
        response = await self.unary("GetManifest", request, idempotent=True)
        return ManifestData(response.digest, response.media_type, response.content)

    async def get_manifests(
        self, names: Sequence[tuple[str, str]], include_configs: bool = False
    ) -> list[BatchedManifest]:
        """Manifests by (repository, digest), in order, with their image configs when asked:
        BatchGetManifests, as many calls as the registry needs to send them all (it stops a
        response at about 2 MiB). Nothing is verified here: the caller checks the digests."""
        results: list[BatchedManifest] = []
        while len(results) < len(names):
            batch = names[len(results) : len(results) + MAX_BATCH_MANIFESTS]
            request = pb.BatchGetManifestsRequest(
                manifests=[pb.ManifestName(repository=r, digest=d) for r, d in batch],
                include_configs=include_configs,
            )
            response = await self.unary("BatchGetManifests", request, idempotent=True)
            if not response.results:  # a registry always sends one at least: never loop
                raise DataLoss("registry: BatchGetManifests returned nothing")
            for (repository, digest), m in zip(batch, response.results, strict=False):
                manifest = ManifestData(digest, m.media_type, m.content) if m.found else None
                results.append(BatchedManifest(repository, manifest, m.config))
        return results

    async def put_manifest(
        self, repository: str, reference: str, media_type: str, content: bytes
    ) -> str:
        """Store a manifest under a tag (or its own digest); returns the manifest digest.
        Idempotent: the same bytes under the same name give the same result."""
        request = pb.PutManifestRequest(
            repository=repository, reference=reference, media_type=media_type, content=content
        )
        return str((await self.unary("PutManifest", request, idempotent=True)).digest)

    async def delete_manifest(self, repository: str, reference: str) -> DeletedManifest:
        """Delete a manifest (by digest, or the one a tag names) and every tag naming it."""
        request = pb.DeleteManifestRequest(repository=repository, reference=reference)
        response = await self.unary("DeleteManifest", request)
        return DeletedManifest(response.digest, list(response.deleted_tags))

    async def delete_tag(self, repository: str, tag: str) -> str:
        """Remove a tag; returns the digest it named (the manifest stays)."""
        request = pb.DeleteTagRequest(repository=repository, tag=tag)
        return str((await self.unary("DeleteTag", request)).digest)

    async def tag_digest(self, repository: str, tag: str) -> str | None:
        """The manifest digest `repository:tag` names now, or None."""
        try:
            return (await self.get_manifest(repository, tag)).digest
        except NotFound:
            return None

    async def list_manifests(self, repository: str = "") -> list[ManifestEntry]:
        """Every manifest of the registry (or of one repository) with its tags, page by page,
        as one consistent view (a view too old to finish is read again from the start)."""
        for attempt in range(LISTING_ATTEMPTS):
            entries: list[ManifestEntry] = []
            token = ""
            try:
                while True:
                    request = pb.ListManifestsRequest(
                        repository=repository, page_size=LISTING_PAGE, page_token=token
                    )
                    response = await self.unary("ListManifests", request, idempotent=True)
                    entries += [_manifest_entry(m) for m in response.manifests]
                    token = response.next_page_token
                    if not token:
                        return entries
            except Aborted:
                if attempt == LISTING_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    # --- internals -------------------------------------------------------------------------

    async def _upload(
        self,
        repository: str,
        source: Path | BinaryIO,
        digest: str,
        size: int,
        progress: Progress | None,
        start: int = 0,
    ) -> None:
        """One upload session: send (resuming after broken streams), commit; cancelled on
        any failure so the registry frees it."""
        session = await self.unary("StartUpload", pb.StartUploadRequest(repository=repository))
        upload_id = session.upload_id
        try:
            with _opened(source) as fileobj:
                await self._send(upload_id, fileobj, digest, size, progress, start)
            await self._commit(upload_id, digest, repository)
        except BaseException:
            await asyncio.shield(self._cancel_quietly(upload_id))
            raise

    async def _send(
        self,
        upload_id: str,
        fileobj: BinaryIO,
        digest: str,
        size: int,
        progress: Progress | None,
        start: int = 0,
    ) -> None:
        """Send the file's bytes, asking the registry where to go on after a broken stream."""
        offset: int | None = 0  # None: unknown after a broken stream
        for attempt in range(RESUME_ATTEMPTS + 1):
            try:
                if offset is None:
                    request = pb.GetUploadRequest(upload_id=upload_id)
                    offset = int((await self.unary("GetUpload", request)).offset)
                if offset < size:
                    chunks = _file_chunks(upload_id, fileobj, offset, size, progress, start)
                    offset = await self._write(upload_id, chunks)
                break
            except _Broken as broken:
                if attempt == RESUME_ATTEMPTS:
                    raise broken.error from None
                offset = None
                await asyncio.sleep(min(0.25 * 2**attempt, 4.0))
            except FailedPrecondition as refused:
                # The session holds other bytes than we thought (a write whose answer was
                # lost): the error says where it stands; go on from there.
                committed = committed_offset(refused.details)
                if attempt == RESUME_ATTEMPTS or committed is None:
                    raise
                offset = committed
        if offset != size:
            raise DataLoss(f"blob {digest}: the source ends after {offset} bytes, expected {size}")

    async def _write(self, upload_id: str, chunks: AsyncIterator[pb.WriteUploadRequest]) -> int:
        """One WriteUpload stream; returns the offset the registry holds."""
        stub, address = await self.connect()
        source = _Source(chunks)
        try:
            return int((await stub.WriteUpload(source.requests())).offset)
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as err:
            # grpc cancels the call when the request iterator fails: raise what failed.
            if source.error is not None:
                raise source.error from None
            if isinstance(err, asyncio.CancelledError):
                raise
            if is_broken_stream(err.code(), err.details()):
                raise _Broken(self.error(err, address)) from None
            raise self.error(err, address) from None

    async def _commit(self, upload_id: str, digest: str, repository: str = "") -> None:
        request = pb.CommitUploadRequest(upload_id=upload_id, digest=digest)
        try:
            await self.unary("CommitUpload", request)
        except NotFound:
            # A commit whose reply was lost leaves no session behind, but a visible blob.
            if not repository or await self.stat_blob(repository, digest) is None:
                raise

    async def _cancel_quietly(self, upload_id: str) -> None:
        """Best effort: free the registry's partial upload; the caller is already failing."""
        stub, _ = await self.connect()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.CancelUpload(pb.CancelUploadRequest(upload_id=upload_id), timeout=2.0)

    async def _read(
        self, repository: str, digest: str, offset: int, total: int
    ) -> AsyncIterator[bytes]:
        """The blob's bytes from `offset` to `total`, in order, going on after broken streams.
        Ends early only if the registry's stream does (the caller checks the size)."""
        for attempt in range(RESUME_ATTEMPTS + 1):
            if offset >= total:
                return
            stub, address = await self.connect()
            request = pb.ReadBlobRequest(repository=repository, digest=digest, offset=offset)
            call = stub.ReadBlob(request)
            try:
                async for chunk in call:
                    if chunk.offset != offset:
                        raise DataLoss(
                            f"registry sent bytes of {digest} at offset {chunk.offset}, "
                            f"expected offset {offset}"
                        )
                    if offset + len(chunk.data) > total:
                        raise DataLoss(
                            f"registry: blob {digest} in {repository} is larger than the "
                            f"{total} bytes expected"
                        )
                    offset += len(chunk.data)
                    yield chunk.data
                return
            except grpc.aio.AioRpcError as err:
                if attempt == RESUME_ATTEMPTS or not is_broken_stream(err.code(), err.details()):
                    raise self.error(err, address) from None
                await asyncio.sleep(min(0.25 * 2**attempt, 4.0))
            finally:
                call.cancel()


class _Source:
    """The requests of a client stream; an exception raised while making them (a read error,
    a failing progress callback) is kept in `error`, since grpc reports it only as a
    cancelled call."""

    def __init__(self, requests: AsyncIterator[Any]) -> None:
        self._requests = requests
        self.error: Exception | None = None

    async def requests(self) -> AsyncIterator[Any]:
        try:
            async for request in self._requests:
                yield request
        except Exception as exc:
            self.error = exc
            raise


class _Broken(Exception):
    """A stream the connection broke: resumable; `error` is what to raise if it stays broken."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def _opened(source: Path | BinaryIO) -> Iterator[BinaryIO]:
    if isinstance(source, Path):
        with open(source, "rb") as fileobj:
            yield fileobj
    else:
        yield source


async def _file_chunks(
    upload_id: str,
    fileobj: BinaryIO,
    offset: int,
    size: int,
    progress: Progress | None,
    start: int = 0,
) -> AsyncIterator[pb.WriteUploadRequest]:
    """WriteUploadRequests for bytes [offset, size) of the blob that begins at `start` in the
    file, read in a worker thread."""
    while offset < size:
        length = min(CHUNK_SIZE, size - offset)
        data = await asyncio.to_thread(_read_at, fileobj, start + offset, length)
        if not data:
            return
        yield pb.WriteUploadRequest(upload_id=upload_id, offset=offset, data=data)
        offset += len(data)
        if progress is not None:
            progress(offset, size)


def _read_at(fileobj: BinaryIO, offset: int, length: int) -> bytes:
    fileobj.seek(offset)
    return fileobj.read(length)


def size_mismatch(repository: str, digest: str, stored: int, described: int) -> DataLoss:
    """A blob whose size is not the one its descriptor gives: the image is damaged."""
    return DataLoss(
        f"blob {digest} in {repository} is {stored} bytes but its descriptor says {described}; "
        "the image is damaged: push it again",
        reason="SIZE_MISMATCH",
        metadata={
            "repository": repository,
            "digest": digest,
            "expected": described,
            "actual": stored,
        },
        resource=("blob", digest),
    )


def _mismatch(repository: str, digest: str, hasher: Any, offset: int, advice: str) -> DataLoss:
    return DataLoss(
        f"registry: blob {digest} from {repository} does not match its digest "
        f"(got {hasher.name}:{hasher.hexdigest()}, {offset} bytes); {advice}"
    )


def _append(out: BinaryIO, hasher: Any, data: bytes) -> None:
    out.write(data)
    hasher.update(data)


def _flush(out: BinaryIO) -> None:
    out.flush()
    os.fsync(out.fileno())


def _manifest_entry(message: Any) -> ManifestEntry:
    return ManifestEntry(
        repository=message.repository,
        digest=message.digest,
        media_type=message.media_type,
        references=tuple(message.references),
        tags=tuple(tag.name for tag in message.tags),
    )
