"""Typed client for the image service (berth.image.v1): the cluster's image catalog.

Mirrors the other clients: plain Python values and dataclasses in and out, gRPC errors as
`BerthClientError`. Unary calls have a deadline; streams (commit, import, save, load, pull,
push) have none, since their duration grows with the data. Uploads (import, load) move in 1 MiB
chunks, the first message carrying the options, while the service streams back its progress
(berth.types.v1.Progress, as `ProgressEvent`s) and then the result.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, BinaryIO, NamedTuple

import grpc

from berth.client.base import GrpcClient
from berth.client.containers import time_of
from berth.client.registry import ImageReference, Progress
from berth.enums import Wording
from berth.enums.image import ARCHIVE_FORMATS
from berth.enums.progress import PROGRESS_STATES, PROGRESS_UNITS, PULL_WORDS, PUSH_WORDS
from berth.errors import BerthClientError
from berth.image.v1 import image_pb2 as pb
from berth.image.v1 import image_pb2_grpc
from berth.reference import Reference
from berth.types.v1 import progress_pb2

CHUNK_SIZE = 1 << 20
# A pull's or push's progress ids for the image config start with this (then the digest).
CONFIG_PREFIX = "config:"
LIST_PAGE = 1000

Source = str | os.PathLike[str] | BinaryIO


# --- values -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSummary:
    """One row of the catalog: an image under one of its tags (tag "" when untagged)."""

    repository: str
    tag: str
    digest: str  # manifest digest
    id: str  # config digest, Docker's image id
    created: datetime | None
    size: int
    shared_size: int
    hosts: list[str]
    containers: int


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HistoryStep:
    layer: str  # digest of the layer the step added; "" for an empty step
    created: datetime | None
    created_by: str
    size: int
    comment: str
    empty_layer: bool
    author: str


@dataclass(frozen=True)
class ImageDetails:
    digest: str
    id: str
    repo_tags: list[str]
    repo_digests: list[str]
    media_type: str
    manifest: bytes
    config: dict[str, Any]  # the image config document, parsed
    layers: list[Layer]  # bottom first
    diff_ids: list[str]
    history: list[HistoryStep]  # oldest first
    created: datetime | None
    size: int
    hosts: list[str]
    platform: str  # "linux/amd64"
    origin: str  # commit, import, load, pull; "" when pushed to the registry directly
    origin_detail: str


@dataclass(frozen=True)
class TransferProgress:
    """One blob's progress in a pull or push; `state` in Docker's words for that direction."""

    digest: str
    state: str
    current: int
    total: int
    config: bool = False  # the image config: Docker shows no line for it
    mounted_from: str = ""  # a push's cross-repository mount: the remote repository


@dataclass(frozen=True)
class ProgressEvent:
    """One berth.types.v1.Progress of a long operation: `id` the item (a stage, "upload"),
    `state` a name of berth.enums.image.PROGRESS_STATES ("running", "done", ...), `unit`
    "bytes", "items" or ""; `total` 0 when unknown."""

    id: str
    state: str
    current: int
    total: int
    unit: str
    message: str


@dataclass(frozen=True)
class CommitProgress:
    stage: str  # resolve, export, write
    state: str  # running, done
    message: str


@dataclass(frozen=True)
class Credentials:
    """For an external registry: a user and password (or token), or an identity token."""

    username: str = ""
    password: str = ""
    identity_token: str = ""


class Removal(NamedTuple):
    """What removing one image did, in Docker's words."""

    untagged: list[str]  # repository:tag references
    deleted: list[str]  # the manifest, then blobs no other image uses


class PruneResult(NamedTuple):
    removed: list[Removal]
    reclaimed_bytes: int


class LoadResult(NamedTuple):
    images: list[ImageDetails]
    references: list[str]


class PullResult(NamedTuple):
    image: ImageDetails
    local_reference: str


class PushedImage(NamedTuple):
    digest: str  # of the pushed manifest
    size: int


@dataclass(frozen=True)
class ExternalReference:
    """`[HOST[:PORT]/]REPO[:TAG][@DIGEST]`: host None names berth's own registry."""

    host: str | None
    name: ImageReference

    def __str__(self) -> str:
        return f"{self.host}/{self.name}" if self.host else str(self.name)


def parse_external_reference(text: str) -> ExternalReference:
    """Parse `[HOST[:PORT]/]REPO[:TAG][@DIGEST]` with the shared grammar (berth.reference):
    by Docker's rule the first component names a host when it has a '.' or a ':' or is
    `localhost`. Raises berth.reference.InvalidReference (code INVALID_ARGUMENT)."""
    ref = Reference.parse(text, default_tag=None)
    return ExternalReference(ref.registry, ImageReference(ref.repository, ref.tag, ref.digest))


# --- conversions ------------------------------------------------------------------------------


def _summary(i: pb.Image) -> ImageSummary:
    return ImageSummary(
        repository=i.repository,
        tag=i.tag,
        digest=i.digest,
        id=i.id,
        created=time_of(i, "created_at"),
        size=i.size,
        shared_size=i.shared_size,
        hosts=list(i.hosts),
        containers=i.containers,
    )


def _step(h: pb.HistoryEntry) -> HistoryStep:
    return HistoryStep(
        layer=h.layer,
        created=time_of(h, "created_at"),
        created_by=h.created_by,
        size=h.size,
        comment=h.comment,
        empty_layer=h.empty_layer,
        author=h.author,
    )


def _config(d: pb.ImageDetail) -> dict[str, Any]:
    if not d.config:
        return {}
    try:
        config = json.loads(d.config)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise BerthClientError(f"image {d.id or d.digest} has a config that is not a JSON object")
    return config


def _details(d: pb.ImageDetail) -> ImageDetails:
    return ImageDetails(
        digest=d.digest,
        id=d.id,
        repo_tags=list(d.repo_tags),
        repo_digests=list(d.repo_digests),
        media_type=d.media_type,
        manifest=d.manifest,
        config=_config(d),
        layers=[Layer(x.media_type, x.digest, x.size, dict(x.annotations)) for x in d.layers],
        diff_ids=list(d.diff_ids),
        history=[_step(h) for h in d.history],
        created=time_of(d, "created_at"),
        size=d.size,
        hosts=list(d.hosts),
        platform=d.platform,
        origin=d.origin,
        origin_detail=d.origin_detail,
    )


def _credentials(c: Credentials | None) -> pb.Credentials | None:
    if c is None:
        return None
    return pb.Credentials(username=c.username, password=c.password, identity_token=c.identity_token)


def _event(p: progress_pb2.Progress) -> ProgressEvent:
    return ProgressEvent(
        p.id,
        PROGRESS_STATES.name(p.state, ""),
        p.current,
        p.total,
        PROGRESS_UNITS.name(p.unit, ""),
        p.message,
    )


def _transfer(p: progress_pb2.Progress, words: Wording) -> TransferProgress:
    """A blob's Progress in a pull or push: id its digest ("config:" before it for the
    config); a push's MOUNTED says where from in its message ("Mounted from x")."""
    config = p.id.startswith(CONFIG_PREFIX)
    digest = p.id.removeprefix(CONFIG_PREFIX)
    mounted_from = ""
    if p.state == progress_pb2.PROGRESS_STATE_MOUNTED and p.message.startswith("Mounted from "):
        mounted_from = p.message.removeprefix("Mounted from ")
    return TransferProgress(digest, words(p.state, "?"), p.current, p.total, config, mounted_from)


def _size_of(f: BinaryIO) -> int:
    """Bytes a regular file (or a seekable stream) holds from its current position; 0
    (unknown) for pipes."""
    try:
        info = os.fstat(f.fileno())
        return info.st_size - f.tell() if stat.S_ISREG(info.st_mode) else 0
    except (OSError, ValueError, AttributeError):
        pass
    try:
        if not f.seekable():
            return 0
        here = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(here)
        return end - here
    except (OSError, ValueError, AttributeError):
        return 0


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(CHUNK_SIZE):
        yield chunk


def _upload_progress(
    progress: Callable[[ProgressEvent], None] | None, size: int
) -> Callable[[progress_pb2.Progress], None]:
    """The service's progress of an upload, as events; the service cannot know the size of
    the bytes still to come, so the bytes received ("upload") get the file's size as total
    when it is known (not for a pipe)."""

    def report(p: progress_pb2.Progress) -> None:
        if progress is None:
            return
        event = _event(p)
        if event.id == "upload" and not event.total and size:
            event = ProgressEvent(
                event.id, event.state, event.current, size, event.unit, event.message
            )
        progress(event)

    return report


# --- the client -------------------------------------------------------------------------------


class ImageClient(GrpcClient):
    SERVICE = "image service"
    OPTION = "--image-service or BERTH_IMAGE"

    def __init__(self, address: str, *, timeout: float | None = 60.0) -> None:
        super().__init__(address, timeout=timeout)
        self._stub = image_pb2_grpc.ImageServiceStub(self._channel)

    # The catalog ------------------------------------------------------------------------

    def images(
        self, reference: str = "", all: bool = False, dangling: bool = False
    ) -> list[ImageSummary]:
        """Newest first, one entry per tag; untagged images with `all`, only them with
        `dangling`. Every page of the listing."""
        return list(self.iter_images(reference, all, dangling))

    def iter_images(
        self,
        reference: str = "",
        all: bool = False,
        dangling: bool = False,
        page_size: int = LIST_PAGE,
    ) -> Iterator[ImageSummary]:
        """images(), fetched a page at a time."""
        token = ""
        while True:
            request = pb.ListImagesRequest(
                reference=reference,
                all=all,
                dangling_only=dangling,
                page_size=page_size,
                page_token=token,
            )
            reply = self._call(self._stub.ListImages, request)
            yield from (_summary(i) for i in reply.images)
            token = reply.next_page_token
            if not token:
                return

    def inspect(self, image: str) -> ImageDetails:
        reply = self._call(self._stub.GetImage, pb.GetImageRequest(image=image))
        return _details(reply.image)

    def history(self, image: str) -> list[HistoryStep]:
        """Newest step first, as `docker history` shows it."""
        reply = self._call(self._stub.GetImageHistory, pb.GetImageHistoryRequest(image=image))
        return [_step(h) for h in reply.entries]

    def tag(self, source: str, target: str) -> str:
        """Name source also target; returns the manifest digest target now names."""
        request = pb.TagImageRequest(source=source, target=target)
        return self._call(self._stub.TagImage, request).digest

    def remove(self, image: str, force: bool = False) -> Removal:
        """Untag a reference (deleting the image with its last tag), or delete an image named
        by digest or id with all its tags."""
        reply = self._call(self._stub.RemoveImage, pb.RemoveImageRequest(image=image, force=force))
        return Removal(list(reply.untagged), list(reply.deleted))

    def prune(self, all: bool = False) -> PruneResult:
        reply = self._call(self._stub.PruneImages, pb.PruneImagesRequest(all=all), timeout=600)
        removed = [Removal(list(r.untagged), list(r.deleted)) for r in reply.removed]
        return PruneResult(removed, reply.reclaimed_bytes)

    # Making images ----------------------------------------------------------------------

    def commit(
        self,
        container: str,
        reference: str = "",
        author: str = "",
        message: str = "",
        pause: bool = True,
        changes: Iterable[str] = (),
        progress: Callable[[CommitProgress], None] | None = None,
    ) -> ImageDetails:
        request = pb.CommitContainerRequest(
            container=container,
            reference=reference,
            author=author,
            message=message,
            pause=pause,
            changes=list(changes),
        )
        for event in self._stream(self._stub.CommitContainer, request):
            if event.HasField("image"):
                return _details(event.image)
            if progress is not None and event.HasField("progress"):
                p = event.progress
                progress(CommitProgress(p.id, PROGRESS_STATES.name(p.state, ""), p.message))
        raise BerthClientError(f"commit of {container} ended without an image", "UNKNOWN")

    def import_image(
        self,
        source: Source,
        reference: str = "",
        message: str = "",
        changes: Iterable[str] = (),
        source_name: str = "",
        progress: Callable[[ProgressEvent], None] | None = None,
    ) -> ImageDetails:
        """A root filesystem tarball (plain, gzip, bzip2 or xz) as a single-layer image.
        progress sees the service's events: "upload" (bytes received; total is 0 for a pipe),
        then "layer"."""
        options = pb.ImportImageOptions(
            reference=reference, message=message, changes=list(changes), source=source_name
        )
        with ExitStack() as stack:
            f = _open(source, stack)
            report = _upload_progress(progress, _size_of(f))
            requests = _with_first(
                pb.ImportImageRequest(options=options),
                (pb.ImportImageRequest(data=c) for c in _chunks(f)),
            )
            for reply in self._exchange(self._stub.ImportImage, requests):
                if reply.HasField("image"):
                    return _details(reply.image)
                report(reply.progress)
        raise BerthClientError("import ended without an image", "UNKNOWN")

    def load(
        self,
        source: Source,
        reference: str = "",
        progress: Callable[[ProgressEvent], None] | None = None,
    ) -> LoadResult:
        """A docker-archive or OCI-layout tar into the catalog; `reference` names images the
        archive leaves unnamed. progress sees the service's events: "upload" (bytes received;
        total is 0 for a pipe), then "images" (names stored)."""
        options = pb.LoadImagesOptions(reference=reference)
        with ExitStack() as stack:
            f = _open(source, stack)
            report = _upload_progress(progress, _size_of(f))
            requests = _with_first(
                pb.LoadImagesRequest(options=options),
                (pb.LoadImagesRequest(data=c) for c in _chunks(f)),
            )
            for reply in self._exchange(self._stub.LoadImages, requests):
                if reply.HasField("result"):
                    result = reply.result
                    return LoadResult([_details(i) for i in result.images], list(result.references))
                report(reply.progress)
        raise BerthClientError("load ended without a result", "UNKNOWN")

    # Moving images ----------------------------------------------------------------------

    def save(
        self,
        images: Iterable[str],
        fmt: str,
        out: BinaryIO,
        progress: Progress | None = None,
    ) -> int:
        """Write the images as one archive (fmt: docker-archive or oci-archive) to out;
        returns the bytes written."""
        if fmt not in ARCHIVE_FORMATS.names:
            raise BerthClientError(
                f'unknown archive format "{fmt}": use {" or ".join(ARCHIVE_FORMATS.names)}',
                "INVALID_ARGUMENT",
            )
        request = pb.SaveImagesRequest(images=list(images), format=ARCHIVE_FORMATS.value(fmt))
        written = total = 0
        for reply in self._stream(self._stub.SaveImages, request):
            if reply.HasField("progress"):
                total = reply.progress.total or total
                continue
            out.write(reply.data)
            written += len(reply.data)
            if progress is not None:
                progress(written, max(total, written))
        return written

    def pull(
        self,
        image: str,
        credentials: Credentials | None = None,
        insecure: bool = False,
        local_reference: str = "",
        progress: Callable[[TransferProgress], None] | None = None,
    ) -> PullResult:
        """Copy an image from an external registry (`HOST[:PORT]/name[:tag]`) into berth's."""
        request = pb.PullImageRequest(
            image=image,
            credentials=_credentials(credentials),
            insecure=insecure,
            local_reference=local_reference,
        )
        for event in self._stream(self._stub.PullImage, request):
            if event.HasField("result"):
                return PullResult(_details(event.result.image), event.result.local_reference)
            if progress is not None and event.HasField("progress"):
                progress(_transfer(event.progress, PULL_WORDS))
        raise BerthClientError(f"pull of {image} ended without a result", "UNKNOWN")

    def push(
        self,
        image: str,
        destination: str,
        credentials: Credentials | None = None,
        insecure: bool = False,
        progress: Callable[[TransferProgress], None] | None = None,
        request_id: str = "",
    ) -> PushedImage:
        """Copy an image of the catalog to an external registry (`HOST[:PORT]/name[:tag]`).
        A `request_id` (a UUID, say) makes a retry safe: a second push with it returns the
        first one's result without pushing again."""
        request = pb.PushImageRequest(
            image=image,
            destination=destination,
            credentials=_credentials(credentials),
            insecure=insecure,
            request_id=request_id,
        )
        for event in self._stream(self._stub.PushImage, request):
            if event.HasField("result"):
                return PushedImage(event.result.digest, event.result.size)
            if progress is not None and event.HasField("progress"):
                progress(_transfer(event.progress, PUSH_WORDS))
        raise BerthClientError(f"push of {image} ended without a result", "UNKNOWN")

    # Plumbing ---------------------------------------------------------------------------

    def _exchange(self, method: Any, requests: Iterator[Any]) -> Iterator[Any]:
        """A bidirectional call without a deadline: `requests` go up while the replies come
        back. gRPC reads `requests` on its own thread and, should reading fail, would end the
        stream as if the data were complete and log the error: here a failed read cancels the
        call (so the server never takes a truncated archive for a whole one) and is raised as
        it was."""
        failure: list[Exception] = []
        started = threading.Event()
        calls: list[Any] = []

        def guarded() -> Iterator[Any]:
            try:
                yield from requests
            except Exception as exc:
                failure.append(exc)
                started.wait()
                calls[0].cancel()

        call = method(guarded())
        calls.append(call)
        started.set()
        try:
            yield from call
        except grpc.RpcError as err:
            if failure:
                raise failure[0] from None
            raise self._error(err) from err
        except BaseException:
            call.cancel()  # Ctrl-C, or the caller stopped reading: do not leave it running
            raise
        finally:
            call.cancel()  # a no-op once the call ended


def _open(source: Source, stack: ExitStack) -> BinaryIO:
    """A path is opened here (so a missing file fails before any call); a file is used as is."""
    if isinstance(source, str | os.PathLike):
        return stack.enter_context(open(source, "rb"))
    return source


def _with_first(first: Any, rest: Iterable[Any]) -> Iterator[Any]:
    yield first
    yield from rest
