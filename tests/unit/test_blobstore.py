"""BlobStore: uploads, verification, dedup and crash safety, straight on the filesystem."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from berthd.common.errors import (
    DataLoss,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from berthd.common.storage import Storage
from berthd.registry import blobstore
from berthd.registry.blobstore import MAX_CHUNK_BYTES, BlobStore


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "data")


def upload(blobs: BlobStore, data: bytes, chunk: int = 7) -> str:
    upload_id = blobs.start("lib/x")
    writer = blobs.open_writer(upload_id)
    for start in range(0, len(data), chunk):
        writer.write(start, data[start : start + chunk])
    writer.close()
    return upload_id


def test_commit_makes_blob_visible_with_exact_content(blobs: BlobStore) -> None:
    data = os.urandom(1000)
    stat, existed = blobs.commit(upload(blobs, data), sha(data))
    assert (stat.digest, stat.size, existed) == (sha(data), 1000, False)
    assert blobs.read_all(sha(data)) == data
    reader = blobs.open_reader(sha(data))
    assert reader.read(10, 5) == data[10:15]
    reader.close()
    with pytest.raises(NotFound):
        reader.read(0, 1)
    assert blobs.open_uploads() == []


def test_wrong_digest_is_data_loss_and_nothing_visible(blobs: BlobStore) -> None:
    data = b"hello"
    upload_id = upload(blobs, data)
    with pytest.raises(DataLoss, match="hash to " + sha(data)) as mismatch:
        blobs.commit(upload_id, sha(b"other"))
    assert mismatch.value.reason == "DIGEST_MISMATCH"
    assert mismatch.value.details.metadata == {
        "expected": sha(b"other"),
        "actual": sha(data),
        "size": "5",
    }
    assert blobs.stat(sha(data)) is None
    assert blobs.stat(sha(b"other")) is None
    assert list(blobs.walk()) == []
    with pytest.raises(NotFound):
        blobs.info(upload_id)


def test_chunk_at_wrong_offset_is_refused_and_says_where_to_resume(blobs: BlobStore) -> None:
    upload_id = blobs.start("lib/x")
    writer = blobs.open_writer(upload_id)
    writer.write(0, b"abcd")
    with pytest.raises(FailedPrecondition, match="resume from offset 4") as mismatch:
        writer.write(2, b"cd")
    assert mismatch.value.reason == "UPLOAD_OFFSET_MISMATCH"
    assert mismatch.value.details.metadata == {
        "upload_id": upload_id,
        "offset": "4",
        "requested_offset": "2",
    }
    writer.close()
    assert blobs.info(upload_id).offset == 4


def test_resume_in_a_new_writer_commits_the_whole_blob(blobs: BlobStore) -> None:
    data = os.urandom(5000)
    upload_id = blobs.start("lib/x")
    first = blobs.open_writer(upload_id)
    first.write(0, data[:3000])
    first.close()
    # A process that never saw the first part (another replica) resumes: digest is recomputed.
    other = BlobStore(blobs.root)
    offset = other.info(upload_id).offset
    second = other.open_writer(upload_id)
    second.write(offset, data[offset:])
    second.close()
    stat, _ = other.commit(upload_id, sha(data))
    assert other.read_all(stat.digest) == data


def test_two_writers_on_one_session_are_refused(
    blobs: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blobstore, "LOCK_WAIT_SECONDS", 0.1)
    upload_id = blobs.start("lib/x")
    first = blobs.open_writer(upload_id)
    with pytest.raises(FailedPrecondition, match="another connection"):
        blobs.open_writer(upload_id)
    first.close()


def test_oversized_chunk_is_refused(blobs: BlobStore) -> None:
    writer = blobs.open_writer(blobs.start("lib/x"))
    with pytest.raises(ResourceExhausted):
        writer.write(0, b"x" * (MAX_CHUNK_BYTES + 1))
    writer.close()


def test_concurrent_uploads_of_one_blob_store_one_copy(blobs: BlobStore) -> None:
    data = os.urandom(200_000)
    ids = [upload(blobs, data, chunk=65536) for _ in range(8)]
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda u=u: results.append(blobs.commit(u, sha(data))[1]))
        for u in ids
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] + [True] * 7
    assert [b.digest for b in blobs.walk()] == [sha(data)]
    assert blobs.read_all(sha(data)) == data
    assert blobs.open_uploads() == []


def test_stored_blobs_are_read_only(blobs: BlobStore) -> None:
    blobs.commit(upload(blobs, b"content"), sha(b"content"))
    assert blobs.path(sha(b"content")).stat().st_mode & 0o222 == 0


def test_open_reader_survives_deletion_of_the_file(blobs: BlobStore) -> None:
    digest = blobs.put(b"still readable")[0]
    reader = blobs.open_reader(digest)
    blobs.path(digest).unlink()
    assert reader.read(0, 100) == b"still readable"
    reader.close()
    with pytest.raises(NotFound):
        blobs.open_reader(digest)


def test_delete_if_older_keeps_recently_touched_blob(blobs: BlobStore) -> None:
    digest = blobs.put(b"manifest")[0]
    old = blobs.path(digest).stat().st_mtime - 100
    os.utime(blobs.path(digest), (old, old))
    blobs.touch(digest)
    assert blobs.delete_if_older(digest, cutoff=old + 50) is False
    assert blobs.delete_if_older(digest, cutoff=old + 10_000) is True
    assert blobs.stat(digest) is None


def test_unknown_or_hostile_upload_ids_are_not_found(blobs: BlobStore) -> None:
    for bad in ("", "../../etc", "nope", "0" * 32):
        with pytest.raises(NotFound) as unknown:
            blobs.info(bad)
        assert unknown.value.reason == "UPLOAD_UNKNOWN"


def test_a_session_another_replica_extended_is_hashed_again_at_commit(tmp_path: Path) -> None:
    """Two registries share the directory: A holds the running digest of the 3000 bytes it
    received, B appends 2000 more. A's commit must hash the 5000 bytes, not trust its digest:
    without the size check a 5000-byte blob would be stored under the first 3000's digest."""
    a, b = BlobStore(tmp_path / "data"), BlobStore(tmp_path / "data")
    data = os.urandom(5000)
    for claimed in (sha(data[:3000]), sha(data)):
        upload_id = a.start("lib/x")
        writer = a.open_writer(upload_id)
        writer.write(0, data[:3000])
        writer.close()
        writer = b.open_writer(upload_id)
        writer.write(3000, data[3000:])
        writer.close()
        if claimed == sha(data):
            stat, _ = a.commit(upload_id, claimed)
            assert (stat.digest, stat.size) == (sha(data), 5000)
            assert a.read_all(sha(data)) == data
        else:
            with pytest.raises(DataLoss) as mismatch:
                a.commit(upload_id, claimed)
            assert mismatch.value.reason == "DIGEST_MISMATCH"
            assert mismatch.value.details.metadata["actual"] == sha(data)
            assert a.stat(claimed) is None


def test_sessions_appear_whole_and_damaged_ones_are_reported(blobs: BlobStore) -> None:
    upload_id = blobs.start("lib/x")
    assert [p.name for p in blobs.uploads.iterdir()] == [upload_id]  # no staging left
    assert json.loads((blobs.upload_dir(upload_id) / "info.json").read_text())["repository"] == (
        "lib/x"
    )
    (blobs.upload_dir(upload_id) / "info.json").write_text("")
    with pytest.raises(NotFound) as damaged:
        blobs.info(upload_id)
    assert damaged.value.reason == "UPLOAD_UNKNOWN"
    assert "is damaged (its info.json is not valid JSON)" in str(damaged.value)
    scan = blobs.scan_uploads()
    assert scan.sessions == [] and [b.name for b in scan.broken] == [upload_id]
    blobs.remove_broken(upload_id)
    assert list(blobs.uploads.iterdir()) == []
    with pytest.raises(NotFound):
        blobs.remove_broken("../../etc")


def test_storage_errors_name_the_directory_and_never_the_errno(tmp_path: Path) -> None:
    disk = Storage("the registry's data directory", tmp_path)
    full = disk.error(OSError(errno.ENOSPC, "No space left on device"), "cannot start an upload")
    assert isinstance(full, ResourceExhausted) and full.reason == "STORAGE_FULL"
    assert str(full) == (
        f"cannot start an upload: the registry's data directory {tmp_path} is full; "
        "free space and retry"
    )
    broken = disk.error(OSError(errno.EIO, "Input/output error"), "cannot commit upload 1")
    assert isinstance(broken, Unavailable) and broken.reason == "STORAGE_ERROR"
    assert "failed with an I/O error" in str(broken) and "Errno" not in str(broken)
    assert disk.error(FileNotFoundError(errno.ENOENT, "gone"), "x") is None
    with pytest.raises(Unavailable), disk.guard("cannot read"):
        raise OSError(errno.EIO, "Input/output error")
