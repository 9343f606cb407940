"""Content-addressed blobs and resumable upload sessions on a filesystem.

Layout under the data directory (which several registry processes may share):

    blobs/sha256/<2 hex>/<64 hex>    immutable, read-only blob files
    uploads/<id>/data                bytes received so far for an upload session
    uploads/<id>/info.json           repository and start time of the session
    uploads/.new-<id>/               a session being created (renamed to <id> once whole)

A blob becomes visible only by `link()`ing a fully written, fsynced and verified upload file to
its final name, so a crash at any moment leaves either the whole blob or nothing. `link` fails if
the blob exists, which is how concurrent uploads of one blob end with exactly one copy.
The session's state lives in files, not memory, so any replica can resume or commit it; a
session appears under its id only once both files are written, so a full disk or a crash never
leaves one with an empty or partial `info.json`. A damaged session (left by an older version,
or by the disk) is reported as unknown to its client and removed by GC.

A full disk is RESOURCE_EXHAUSTED (STORAGE_FULL) and a failing one UNAVAILABLE (STORAGE_ERROR),
from every write (`berthd.common.storage`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from berth.files import fsync_dir
from berthd.common.errors import DataLoss, FailedPrecondition, NotFound, ResourceExhausted
from berthd.common.oci.digest import Digester, digest_bytes, digest_file, hex_of, parse_digest
from berthd.common.storage import Storage

log = logging.getLogger("berthd.registry.blobstore")

MAX_CHUNK_BYTES = 4 * 1024 * 1024
READ_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class BlobStat:
    digest: str
    size: int
    mtime: float


@dataclass(frozen=True)
class UploadInfo:
    upload_id: str
    repository: str
    offset: int
    started_at: float
    updated_at: float


@dataclass(frozen=True)
class BrokenUpload:
    """A directory under uploads/ that is no usable session: a damaged record, or a session
    whose creation never finished (`.new-<id>`). `name` is the directory's name."""

    name: str
    why: str
    updated_at: float


@dataclass(frozen=True)
class UploadScan:
    sessions: list[UploadInfo]
    broken: list[BrokenUpload]


STAGING = ".new-"


class _Damaged(Exception):
    """An upload session's files cannot be read as a session; the message says why."""


# A client that lost its connection resumes at once, while the server may still be finishing
# the broken stream: wait this long for that stream to let go of the session.
LOCK_WAIT_SECONDS = 5.0


def _lock(fd: int, kind: int, wait: float | None = None) -> bool:
    deadline = time.monotonic() + (LOCK_WAIT_SECONDS if wait is None else wait)
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


class UploadWriter:
    """Appends chunks to one session; holds an exclusive lock so two streams cannot interleave."""

    def __init__(self, store: BlobStore, upload_id: str) -> None:
        self._store = store
        self.upload_id = upload_id
        path = store.upload_data(upload_id)
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            raise upload_unknown(upload_id) from None
        if not _lock(self._fd, fcntl.LOCK_EX):
            os.close(self._fd)
            raise FailedPrecondition(
                f"upload {upload_id} is being written by another connection",
                reason="UPLOAD_IN_USE",
                metadata={"upload_id": upload_id},
                resource=("upload", upload_id),
            )
        self.offset = os.fstat(self._fd).st_size
        self._digester = store.take_digester(upload_id, self.offset)
        # write() and close() run in executor threads; a write still running when its caller
        # was cancelled must finish before close() releases the descriptor.
        self._mutex = threading.Lock()
        self._closed = False

    def write(self, offset: int, data: bytes) -> int:
        if len(data) > MAX_CHUNK_BYTES:
            raise ResourceExhausted(
                f"chunk of {len(data)} bytes is larger than the limit of {MAX_CHUNK_BYTES}",
                reason="CHUNK_TOO_LARGE",
                metadata={"size": len(data), "limit": MAX_CHUNK_BYTES},
                field="data",
            )
        with self._mutex:
            if self._closed:
                raise FailedPrecondition(
                    f"upload {self.upload_id}: the stream was closed",
                    reason="UPLOAD_CLOSED",
                    metadata={"upload_id": self.upload_id},
                )
            if offset != self.offset:
                raise FailedPrecondition(
                    f"upload {self.upload_id}: chunk starts at offset {offset} but "
                    f"{self.offset} bytes are stored; resume from offset {self.offset}",
                    reason="UPLOAD_OFFSET_MISMATCH",
                    metadata={
                        "upload_id": self.upload_id,
                        "offset": self.offset,
                        "requested_offset": offset,
                    },
                    resource=("upload", self.upload_id),
                )
            disk = self._store.disk
            facts = {"upload_id": self.upload_id}
            with disk.guard(f"upload {self.upload_id}", **facts, offset=self.offset):
                written = os.write(self._fd, data)
            if written != len(data):
                # A short write (disk full) leaves the stored offset where the file ends.
                self.offset += written
                raise ResourceExhausted(
                    f"upload {self.upload_id}: {disk.name} {disk.path} is full; "
                    f"{self.offset} bytes are stored: resume from there once space is freed",
                    reason="STORAGE_FULL",
                    metadata={**facts, "offset": self.offset, "directory": str(disk.path)},
                )
            if self._digester is not None:
                self._digester.update(data)
            self.offset += len(data)
            return self.offset

    def close(self) -> None:
        """Make the bytes durable and hand the running digest back for a fast commit."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            try:
                with self._store.disk.guard(
                    f"upload {self.upload_id}", upload_id=self.upload_id, offset=self.offset
                ):
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)
            if self._digester is not None:
                self._store.keep_digester(self.upload_id, self._digester)


class BlobReader:
    """One open blob, read from executor threads. The descriptor stays valid even if GC unlinks
    the file mid-read, and close() waits for a read in progress, so a read never lands on a
    descriptor number the process has since reused."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._mutex = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        with self._mutex:
            if self._fd < 0:
                raise NotFound("blob reader was closed")
            return os.pread(self._fd, length, offset)

    def close(self) -> None:
        with self._mutex:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def upload_unknown(upload_id: str) -> NotFound:
    return NotFound(
        f"upload {upload_id} not found (cancelled or committed?)",
        reason="UPLOAD_UNKNOWN",
        metadata={"upload_id": upload_id},
        resource=("upload", upload_id),
    )


def blob_unknown(digest: str, repository: str = "") -> NotFound:
    where = f" in repository {repository}" if repository else ""
    return NotFound(
        f"blob {digest} not found{where}",
        reason="BLOB_UNKNOWN",
        metadata={"digest": digest, **({"repository": repository} if repository else {})},
        resource=("blob", digest),
    )


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.disk = Storage("the registry's data directory", root)
        self.blobs = root / "blobs"
        self.uploads = root / "uploads"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.uploads.mkdir(parents=True, exist_ok=True)
        # Running sha256 of sessions written in order through this process: committing then
        # needs no second pass over the data. Sessions resumed elsewhere are re-hashed.
        self._digesters: dict[str, Digester] = {}

    # Blobs ------------------------------------------------------------------

    def path(self, digest: str) -> Path:
        hex_digest = hex_of(parse_digest(digest))
        return self.blobs / "sha256" / hex_digest[:2] / hex_digest

    def stat(self, digest: str) -> BlobStat | None:
        try:
            st = self.path(digest).stat()
        except FileNotFoundError:
            return None
        return BlobStat(digest, st.st_size, st.st_mtime)

    def touch(self, digest: str) -> None:
        """Mark a blob as recently used, so GC's grace period protects it from now on. Best
        effort on a failing disk: reads (a stat, a pull) go on working on a read-only one, and
        a write that needed the disk fails on its own (GC cannot delete there either)."""
        try:
            os.utime(self.path(digest))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if self.disk.error(exc, f"cannot mark blob {digest} as used") is None:
                raise

    def open_reader(self, digest: str) -> BlobReader:
        try:
            return BlobReader(os.open(self.path(digest), os.O_RDONLY))
        except FileNotFoundError:
            raise blob_unknown(digest) from None

    def read_all(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise blob_unknown(digest) from None

    def put(self, content: bytes) -> tuple[str, bool]:
        """Store small content (manifests) directly; returns (digest, already_existed).
        Content already stored is only touched, so re-tagging needs no free space."""
        digest = digest_bytes(content)
        self.touch(digest)
        if self.stat(digest) is not None:
            return digest, True
        upload_id = self.start("", action="cannot store the manifest")
        try:
            with (
                self.disk.guard("cannot store the manifest"),
                open(self.upload_data(upload_id), "wb") as f,
            ):
                f.write(content)
            digester = Digester()
            digester.update(content)
            self._digesters[upload_id] = digester
            stat, existed = self.commit(upload_id, digest, action="cannot store the manifest")
        except BaseException:
            with contextlib.suppress(NotFound):
                self.cancel(upload_id)
            raise
        return stat.digest, existed

    def walk(self) -> Iterator[BlobStat]:
        for path in (self.blobs / "sha256").glob("??/*"):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                yield BlobStat(f"sha256:{path.name}", st.st_size, st.st_mtime)

    def delete_if_older(self, digest: str, cutoff: float) -> bool:
        """Delete a blob unless it was touched after `cutoff` (checked just before unlinking)."""
        path = self.path(digest)
        try:
            if path.stat().st_mtime > cutoff:
                return False
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    # Upload sessions ----------------------------------------------------------

    def upload_dir(self, upload_id: str) -> Path:
        if not upload_id or not all(c in "0123456789abcdef" for c in upload_id):
            raise NotFound(
                f"upload {upload_id!r} not found",
                reason="UPLOAD_UNKNOWN",
                metadata={"upload_id": upload_id},
                resource=("upload", upload_id),
            )
        return self.uploads / upload_id

    def upload_data(self, upload_id: str) -> Path:
        return self.upload_dir(upload_id) / "data"

    def start(self, repository: str, action: str = "cannot start an upload") -> str:
        """A new session, built under a staging name and renamed into place whole."""
        upload_id = uuid.uuid4().hex
        staging = self.uploads / f"{STAGING}{upload_id}"
        info = json.dumps({"repository": repository, "started_at": time.time()}).encode()
        try:
            with self.disk.guard(action):
                staging.mkdir()
                (staging / "data").touch()
                fd = os.open(staging / "info.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    view = memoryview(info)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                fsync_dir(staging)
                os.rename(staging, self.uploads / upload_id)
                fsync_dir(self.uploads)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return upload_id

    def _read_info(self, directory: Path) -> tuple[str, float]:
        """(repository, started_at) of a session directory; _Damaged when unreadable,
        FileNotFoundError when the directory is gone."""
        if not directory.is_dir():
            raise FileNotFoundError(directory)
        try:
            meta = json.loads((directory / "info.json").read_bytes())
        except FileNotFoundError:
            if not directory.exists():
                raise
            raise _Damaged("its info.json is missing") from None
        except ValueError:
            raise _Damaged("its info.json is not valid JSON") from None
        repository = meta.get("repository") if isinstance(meta, dict) else None
        started = meta.get("started_at") if isinstance(meta, dict) else None
        if not isinstance(repository, str) or not isinstance(started, int | float):
            raise _Damaged("its info.json lacks the repository or start time")
        if not (directory / "data").is_file():
            if not directory.exists():
                raise FileNotFoundError(directory)
            raise _Damaged("its data file is missing")
        return repository, float(started)

    def info(self, upload_id: str) -> UploadInfo:
        directory = self.upload_dir(upload_id)
        try:
            repository, started_at = self._read_info(directory)
            fd = os.open(directory / "data", os.O_RDONLY)
        except FileNotFoundError:
            raise upload_unknown(upload_id) from None
        except _Damaged as exc:
            log.warning("upload session %s is damaged: %s", upload_id, exc)
            raise NotFound(
                f"upload {upload_id} is damaged ({exc}) and cannot be resumed; "
                "start the upload again",
                reason="UPLOAD_UNKNOWN",
                metadata={"upload_id": upload_id},
                resource=("upload", upload_id),
            ) from None
        try:
            # Briefly wait for a writer whose stream just broke, so the offset is final; a
            # healthy stream still writing gets its current offset.
            _lock(fd, fcntl.LOCK_SH, wait=0.5)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return UploadInfo(upload_id, repository, st.st_size, started_at, st.st_mtime)

    def open_writer(self, upload_id: str) -> UploadWriter:
        return UploadWriter(self, upload_id)

    def take_digester(self, upload_id: str, offset: int) -> Digester | None:
        digester = self._digesters.pop(upload_id, None)
        if digester is None and offset == 0:
            return Digester()
        if digester is not None and digester.size == offset:
            return digester
        return None

    def keep_digester(self, upload_id: str, digester: Digester) -> None:
        self._digesters[upload_id] = digester

    def commit(self, upload_id: str, expected: str, action: str = "") -> tuple[BlobStat, bool]:
        """Verify and publish an upload; returns the blob and whether it already existed.
        On a full disk the session stays, to be committed again once space is freed."""
        expected = parse_digest(expected)
        data = self.upload_data(upload_id)
        if not data.exists():
            raise upload_unknown(upload_id)
        with self.disk.guard(action or f"cannot commit upload {upload_id}", upload_id=upload_id):
            return self._commit(upload_id, expected, data)

    def _commit(self, upload_id: str, expected: str, data: Path) -> tuple[BlobStat, bool]:
        with open(data, "rb") as f:
            os.fsync(f.fileno())
        size = data.stat().st_size
        digester = self._digesters.pop(upload_id, None)
        # The size check matters: another replica may have extended the session since this
        # process hashed it, and a stale digest would publish its bytes under the wrong name.
        if digester is not None and digester.size == size:
            actual = digester.digest
        else:
            actual, size = digest_file(data)
        if actual != expected:
            self.cancel(upload_id)
            raise DataLoss(
                f"digest mismatch: expected {expected} but the {size} uploaded bytes hash to "
                f"{actual}; the upload was discarded",
                reason="DIGEST_MISMATCH",
                metadata={"expected": expected, "actual": actual, "size": size},
                resource=("upload", upload_id),
            )
        final = self.path(actual)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(data, 0o444)
        try:
            os.link(data, final)
            existed = False
            fsync_dir(final.parent)
        except FileExistsError:
            existed = True
        self.cancel(upload_id)
        self.touch(actual)
        st = final.stat()
        return BlobStat(actual, st.st_size, st.st_mtime), existed

    def cancel(self, upload_id: str) -> None:
        self._digesters.pop(upload_id, None)
        directory = self.upload_dir(upload_id)
        if not directory.exists():
            raise upload_unknown(upload_id)
        shutil.rmtree(directory, ignore_errors=True)

    def scan_uploads(self) -> UploadScan:
        """Every session, and every directory under uploads/ that is none (damaged, or left
        by a creation that never finished); reads only, so GC can decide before it deletes."""
        sessions: list[UploadInfo] = []
        broken: list[BrokenUpload] = []
        for directory in self.uploads.iterdir():
            name = directory.name
            try:
                if name.startswith(STAGING):
                    raise _Damaged("its creation never finished")
                self._read_info(directory)
            except _Damaged as exc:
                broken.append(BrokenUpload(name, str(exc), _newest_mtime(directory)))
                continue
            except (FileNotFoundError, NotADirectoryError):
                continue  # committed or cancelled meanwhile, or no directory
            with contextlib.suppress(NotFound):
                sessions.append(self.info(name))
        return UploadScan(sessions, broken)

    def open_uploads(self) -> list[UploadInfo]:
        return self.scan_uploads().sessions

    def remove_broken(self, name: str) -> None:
        """Remove a directory `scan_uploads` reported broken."""
        if name.startswith(STAGING):
            upload_id = name[len(STAGING) :]
            self.upload_dir(upload_id)  # checks the id's form: nothing outside uploads/
            path = self.uploads / name
        else:
            path = self.upload_dir(name)
        self._digesters.pop(name, None)
        shutil.rmtree(path, ignore_errors=True)


def _newest_mtime(directory: Path) -> float:
    """When anything in a session directory last changed (0 when it vanished)."""
    newest = 0.0
    with contextlib.suppress(OSError):
        newest = directory.stat().st_mtime
        for child in directory.iterdir():
            with contextlib.suppress(OSError):
                newest = max(newest, child.stat().st_mtime)
    return newest
