"""Typed client for the builder service (berth.builder.v1).

`build` streams the build context as a tar made on the fly: a thread walks the context
directory (after `.dockerignore`, see berth.dockerignore: the builder applies it too, so this
only saves bytes) and writes the tar into ~1 MiB chunks that gRPC sends while the thread reads
on; no temporary file. The builder's progress comes back as small event dataclasses (a step's
change, a line of its output, progress of what is no step: the context as it arrives, the
export, warnings), and the call ends with the image.
"""

from __future__ import annotations

import os
import queue
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, cast

import grpc

from berth.builder.v1 import builder_pb2 as pb
from berth.builder.v1 import builder_pb2_grpc
from berth.client.base import GrpcClient
from berth.client.containers import time_of
from berth.dockerignore import DEFAULT_DOCKERFILE, Matcher, context_matcher, walk_context
from berth.enums.containers import LOG_STREAMS
from berth.enums.progress import PROGRESS_STATES, PROGRESS_UNITS
from berth.errors import BerthClientError
from berth.types.v1 import progress_pb2

CHUNK_SIZE = 1024 * 1024
QUEUE_DEPTH = 4  # chunks made ahead of gRPC: the tar thread never runs far ahead
PRUNE_TIMEOUT = 600.0  # pruning a large cache deletes many keys

StepStatus = Literal["", "RUNNING", "CACHED", "DONE", "FAILED"]


# --- what goes in and comes out -----------------------------------------------------------


@dataclass
class BuildOptions:
    """What `docker build` takes besides the context; see BuildOptions in builder.proto."""

    dockerfile: str = DEFAULT_DOCKERFILE  # its path inside the context
    build_args: dict[str, str] = field(default_factory=dict)
    target: str = ""
    tags: list[str] = field(default_factory=list)
    no_cache: bool = False
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildStep:
    """A step changed: RUNNING, CACHED, DONE or FAILED."""

    number: int  # from 1, across the stages being built
    total: int
    stage: str  # its AS name, `stage-<index>` in a multi-stage build, else ""
    instruction: str
    line: int  # in the Dockerfile
    status: StepStatus
    layer_digest: str = ""  # of the layer the step added, once done or cached
    duration: float | None = None  # seconds, once cached, done or failed
    exit_code: int | None = None  # of a RUN whose command exited non-zero


@dataclass(frozen=True)
class BuildOutput:
    """A line a step's process wrote, newline included (the last bytes may have none)."""

    step: int
    stream: str  # "stdout" or "stderr"
    data: bytes


@dataclass(frozen=True)
class BuildProgress:
    """Progress of something that belongs to no step: "context" (the context as the builder
    receives it, `current` bytes), "export", "warning/<n>" (`message` says it)."""

    id: str
    state: str  # "DOWNLOADING", "RUNNING", "DONE", ...
    current: int = 0
    total: int = 0
    unit: str = ""  # "bytes", "items" or ""
    message: str = ""
    duration: float | None = None  # seconds, once done


BuildEvent = BuildStep | BuildOutput | BuildProgress


@dataclass(frozen=True)
class BuildResult:
    digest: str  # manifest digest
    id: str  # image id: the config digest
    tags: list[str]
    cached_steps: int
    total_steps: int


@dataclass(frozen=True)
class CacheEntry:
    key: str
    instruction: str
    layer_digest: str  # "" for a step that changed only the config
    size: int
    created_at: datetime | None
    last_used_at: datetime | None
    uses: int


@dataclass(frozen=True)
class BuildCache:
    entries: list[CacheEntry]  # most recently used first
    total_bytes: int  # of the distinct layers the whole cache holds


@dataclass(frozen=True)
class PruneReport:
    deleted: int
    reclaimed_bytes: int


def _seconds(progress: progress_pb2.Progress) -> float | None:
    if not progress.HasField("duration"):
        return None
    return progress.duration.ToTimedelta().total_seconds()


def _step(e: pb.BuildStep) -> BuildStep:
    return BuildStep(
        number=e.number,
        total=e.total,
        stage=e.stage,
        instruction=e.instruction,
        line=e.line,
        # Upper case, as BuildKit prints a step's state.
        status=cast(StepStatus, PROGRESS_STATES.name(e.progress.state, "").upper()),
        layer_digest=e.layer_digest,
        duration=_seconds(e.progress),
        exit_code=e.exit_code if e.HasField("exit_code") else None,
    )


def _output(o: pb.BuildOutput) -> BuildOutput:
    return BuildOutput(o.step, LOG_STREAMS.name(o.stream, "stdout"), o.data)


def _progress(p: progress_pb2.Progress) -> BuildProgress:
    return BuildProgress(
        id=p.id,
        state=PROGRESS_STATES.name(p.state, "").upper(),
        current=p.current,
        total=p.total,
        unit=PROGRESS_UNITS.name(p.unit, ""),
        message=p.message,
        duration=_seconds(p),
    )


def _result(r: pb.BuildResult) -> BuildResult:
    return BuildResult(r.digest, r.id, list(r.tags), r.cached_steps, r.total_steps)


def _cache_entry(e: pb.CacheEntry) -> CacheEntry:
    return CacheEntry(
        e.key,
        e.instruction,
        e.layer_digest,
        e.size,
        time_of(e, "created_at"),
        time_of(e, "last_used_at"),
        e.uses,
    )


# --- the context tar ----------------------------------------------------------------------


def write_context_tar(out: Any, context_dir: Path | None, matcher: Matcher) -> None:
    """The context as a tar stream into out (anything with write): regular files, directories
    and symlinks with their modes and mtimes, owned by 0:0 (ownership is the Dockerfile's to
    say, with --chown). None is the empty context. Other file types are left out."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        if context_dir is None:
            return
        for entry in walk_context(context_dir, matcher):
            info = tarfile.TarInfo(entry.path)
            mode = entry.lstat.st_mode
            info.mode = stat.S_IMODE(mode)
            info.mtime = int(entry.lstat.st_mtime)
            if stat.S_ISREG(mode):
                with open(entry.source, "rb") as source:
                    info.size = os.fstat(source.fileno()).st_size
                    tar.addfile(info, source)
                continue
            if stat.S_ISDIR(mode):
                info.type = tarfile.DIRTYPE
            elif stat.S_ISLNK(mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(entry.source)
            else:
                continue  # sockets, fifos, devices: Docker's context has no use for them
            tar.addfile(info)


def context_tar(context_dir: Path | None, dockerfile: str | None = DEFAULT_DOCKERFILE) -> bytes:
    """The tar `build` would send for context_dir, in one piece (for tests and small tools)."""
    matcher = context_matcher(context_dir, dockerfile) if context_dir else Matcher([])
    parts: list[bytes] = []
    chunker = _Chunker(parts.append)
    write_context_tar(chunker, context_dir, matcher)
    chunker.flush()
    return b"".join(parts)


class _Chunker:
    """A write-only file that hands on what it is given in CHUNK_SIZE pieces."""

    def __init__(self, emit: Callable[[bytes], None]) -> None:
        self._emit = emit
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        while len(self._buffer) >= CHUNK_SIZE:
            self._emit(bytes(self._buffer[:CHUNK_SIZE]))
            del self._buffer[:CHUNK_SIZE]
        return len(data)

    def flush(self) -> None:
        if self._buffer:
            self._emit(bytes(self._buffer))
            self._buffer.clear()


class _Stopped(Exception):
    """The build ended: the tar thread stops making chunks nobody will send."""


_END = object()


class ContextStream:
    """Chunks of the context tar, made by a thread while gRPC sends the ones before.

    A failure to read the context ends the chunks early, is kept in `error` and calls
    `on_error` (the build call's cancel), so it is reported as itself, not as a cut stream."""

    def __init__(self, context_dir: Path | None, matcher: Matcher) -> None:
        self._context_dir = context_dir
        self._matcher = matcher
        self._queue: queue.Queue[object] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="berth-context", daemon=True)
        self._started = 0.0
        self.on_error: Callable[[], object] | None = None
        self.error: Exception | None = None
        self.size = 0
        self.seconds: float | None = None  # set once every chunk went out

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def chunks(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is _END:
                self.seconds = time.monotonic() - self._started
                return
            if isinstance(item, Exception):
                self.error = item
                if self.on_error is not None:
                    self.on_error()
                return
            assert isinstance(item, bytes)
            self.size += len(item)
            yield item

    def close(self) -> None:
        """Stop the thread, and release a reader still waiting for a chunk."""
        self._stop.set()
        self._drain()
        if self._thread.is_alive():
            self._thread.join()
        self._drain()
        self._queue.put(_END)

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def _put(self, item: object) -> None:
        # After close() drained the queue, at most one more put fits before this check.
        if self._stop.is_set():
            raise _Stopped
        self._queue.put(item)

    def _produce(self) -> None:
        try:
            chunker = _Chunker(self._put)
            write_context_tar(chunker, self._context_dir, self._matcher)
            chunker.flush()
            self._put(_END)
        except _Stopped:
            return
        except Exception as exc:  # any failure is the reader's to report
            try:
                self._put(exc)
            except _Stopped:
                return


def _describe(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def _requests(options: pb.BuildOptions, context: ContextStream) -> Iterator[pb.BuildRequest]:
    yield pb.BuildRequest(options=options)
    for chunk in context.chunks():
        yield pb.BuildRequest(context=chunk)


# --- the client ---------------------------------------------------------------------------


class BuilderClient(GrpcClient):
    SERVICE = "builder"

    def __init__(self, address: str, *, timeout: float | None = 60.0) -> None:
        super().__init__(address, timeout=timeout)
        self._stub = builder_pb2_grpc.BuilderServiceStub(self._channel)

    def build(
        self,
        context_dir: Path | None,
        options: BuildOptions | None = None,
        *,
        dockerfile_text: str | None = None,
        on_event: Callable[[BuildEvent], None] | None = None,
        deadline: float | None = None,
    ) -> BuildResult:
        """Build an image from context_dir (None: an empty context) like `docker build`.

        The Dockerfile is options.dockerfile inside the context, or dockerfile_text when given
        (`-f -`, or a file outside the context). on_event sees the progress, in this thread.
        A build has no deadline unless `deadline` gives one, in seconds for the whole call
        (then DEADLINE_EXCEEDED, and the builder stops the build)."""
        options = options or BuildOptions()
        if dockerfile_text is None:
            _check_dockerfile(context_dir, options.dockerfile)
        in_context = options.dockerfile if dockerfile_text is None else None
        matcher = context_matcher(context_dir, in_context) if context_dir else Matcher([])
        message = pb.BuildOptions(
            dockerfile=in_context or "",
            dockerfile_content=dockerfile_text or "",
            build_args=options.build_args,
            target=options.target,
            tags=options.tags,
            no_cache=options.no_cache,
            labels=options.labels,
        )
        emit = on_event or (lambda event: None)
        context = ContextStream(context_dir, matcher)
        context.start()
        try:
            call = self._stub.Build(_requests(message, context), timeout=deadline)
        except BaseException:
            context.close()
            raise
        context.on_error = call.cancel
        if context.error is not None:  # failed before on_error was set
            call.cancel()
        result: BuildResult | None = None
        try:
            for response in call:
                kind = response.WhichOneof("event")
                if kind == "result":
                    result = _result(response.result)
                elif kind == "step":
                    emit(_step(response.step))
                elif kind == "output":
                    emit(_output(response.output))
                elif kind == "progress":
                    emit(_progress(response.progress))
        except grpc.RpcError as err:
            if context.error is not None:
                raise BerthClientError(
                    f"cannot send the build context: {_describe(context.error)}",
                    "FAILED_PRECONDITION",
                ) from context.error
            raise self._error(err) from err
        finally:
            call.cancel()  # a no-op once the build ended; stops it on Ctrl-C
            context.close()
        if result is None:
            raise BerthClientError(f"the builder at {self.address} sent no image", "UNKNOWN")
        return result

    def list_cache(self, page_size: int = 0) -> BuildCache:
        """The whole cache, most recently used first (read `page_size` entries a call; 0:
        the builder's default)."""
        entries: list[CacheEntry] = []
        token = ""
        while True:
            request = pb.ListCacheRequest(page_size=page_size, page_token=token)
            reply = self._call(self._stub.ListCache, request)
            entries += [_cache_entry(e) for e in reply.entries]
            token = reply.next_page_token
            if not token:
                return BuildCache(entries, reply.total_bytes)

    def prune_cache(self, unused_for: timedelta | None = None) -> PruneReport:
        """Delete the cache entries unused for at least unused_for; None or 0: all of them."""
        request = pb.PruneCacheRequest()
        if unused_for:
            request.unused_for.FromTimedelta(unused_for)
        reply = self._call(self._stub.PruneCache, request, timeout=PRUNE_TIMEOUT)
        return PruneReport(reply.deleted, reply.reclaimed_bytes)


def _check_dockerfile(context_dir: Path | None, dockerfile: str) -> None:
    """Fail before connecting when the Dockerfile is not where options say."""
    if context_dir is None:
        raise BerthClientError(
            "an empty context holds no Dockerfile: pass its text", "INVALID_ARGUMENT"
        )
    if not (context_dir / dockerfile).is_file():
        raise BerthClientError(
            f"cannot find the Dockerfile {dockerfile} in the build context {context_dir}",
            "INVALID_ARGUMENT",
        )


__all__ = [
    "BuildCache",
    "BuildEvent",
    "BuildOptions",
    "BuildOutput",
    "BuildProgress",
    "BuildResult",
    "BuildStep",
    "BuilderClient",
    "CacheEntry",
    "PruneReport",
]
