"""Content-addressed blobs and resumable upload sessions on a filesystem.

Layout under the data directory (which several registry processes may share):

    blobs/sha256/<2 hex>/<64 hex>    immutable, read-only blob files
    uploads/<id>/data                bytes received so far for an upload session
    uploads/<id>/info.json           repository and start time of the session

A blob becomes visible only by `link()`ing a fully written, fsynced and verified upload file to
its final name, so a crash at any moment leaves either the whole blob or nothing. `link` fails if
the blob exists, which is how concurrent uploads of one blob end with exactly one copy.
The session's state lives in files, not memory, so any replica can resume or commit it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
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
from berthd.common.oci.digest import Digester, digest_file, hex_of, parse_digest

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
            written = os.write(self._fd, data)
            if written != len(data):
                # A short write (disk full) leaves the stored offset where the file ends.
                self.offset += written
                raise ResourceExhausted(
                    f"upload {self.upload_id}: stored {written} of {len(data)} bytes (disk full?)",
                    reason="STORAGE_FULL",
                    metadata={"upload_id": self.upload_id, "offset": self.offset},
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
        """Mark a blob as recently used, so GC's grace period protects it from now on."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path(digest))

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
        """Store small content (manifests) directly; returns (digest, already_existed)."""
        upload_id = self.start("")
        with open(self.upload_data(upload_id), "wb") as f:
            f.write(content)
        digester = Digester()
        digester.update(content)
        self._digesters[upload_id] = digester
        stat, existed = self.commit(upload_id, digester.digest)
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

    def start(self, repository: str) -> str:
        upload_id = uuid.uuid4().hex
        directory = self.uploads / upload_id
        directory.mkdir()
        (directory / "data").touch()
        info = {"repository": repository, "started_at": time.time()}
        (directory / "info.json").write_text(json.dumps(info))
        return upload_id

    def info(self, upload_id: str) -> UploadInfo:
        directory = self.upload_dir(upload_id)
        try:
            meta = json.loads((directory / "info.json").read_text())
            fd = os.open(directory / "data", os.O_RDONLY)
        except FileNotFoundError:
            raise upload_unknown(upload_id) from None
        try:
            # Briefly wait for a writer whose stream just broke, so the offset is final; a
            # healthy stream still writing gets its current offset.
            _lock(fd, fcntl.LOCK_SH, wait=0.5)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return UploadInfo(
            upload_id, meta["repository"], st.st_size, meta["started_at"], st.st_mtime
        )

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

    def commit(self, upload_id: str, expected: str) -> tuple[BlobStat, bool]:
        """Verify and publish an upload; returns the blob and whether it already existed."""
        expected = parse_digest(expected)
        data = self.upload_data(upload_id)
        if not data.exists():
            raise upload_unknown(upload_id)
        with open(data, "rb") as f:
            os.fsync(f.fileno())
        size = data.stat().st_size
        digester = self._digesters.pop(upload_id, None)
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

    def open_uploads(self) -> list[UploadInfo]:
        sessions = []
        for directory in self.uploads.iterdir():
            with contextlib.suppress(NotFound):
                sessions.append(self.info(directory.name))
        return sessions
