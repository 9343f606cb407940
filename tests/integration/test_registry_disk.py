"""The registry on a full disk: a real size-limited tmpfs as its --data-dir.

Every call that writes to the disk answers RESOURCE_EXHAUSTED (STORAGE_FULL) with a message
naming the data directory, leaves nothing half-written, and everything works again once space
is freed; GC runs clean throughout.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from berth.client import RegistryClient
from berth.errors import BerthClientError, from_rpc_error
from berth.registry.v1 import registry_pb2 as pb
from berthd.common.store import Store

from .conftest import ServiceProcess, Services
from .disks import small_tmpfs
from .test_registry import OCI_MANIFEST, age, blob_files, image, push_bytes, sha, stub

pytestmark = pytest.mark.integration


@dataclass
class SmallDisk:
    mount: Path
    data_dir: Path
    registry: ServiceProcess

    def fill(self) -> None:
        """Use every block, then every inode, of the tmpfs (outside the registry's tree)."""
        filler = self.mount / "filler"
        filler.mkdir(exist_ok=True)
        fd = os.open(filler / "blocks", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as err:
            assert err.errno == 28
        try:
            while True:
                os.write(fd, b"\0")
        except OSError as err:
            assert err.errno == 28
        finally:
            os.close(fd)
        n = 0
        try:
            while True:
                (filler / f"inode-{n}").touch()
                n += 1
        except OSError as err:
            assert err.errno == 28

    def free(self) -> None:
        subprocess.run(["rm", "-rf", str(self.mount / "filler")], check=True)


@pytest.fixture
def small_disk(services: Services) -> Iterator[SmallDisk]:
    """A registry whose data directory is a 16 MiB tmpfs with 400 inodes; the registry is
    stopped and the tmpfs unmounted at teardown."""
    with small_tmpfs("berth-full-disk-", "size=16m,nr_inodes=400") as mount:
        data_dir = mount / "registry"
        registry = services.registry(data_dir)
        try:
            yield SmallDisk(mount, data_dir, registry)
        finally:
            registry.stop()


def error_of(err: grpc.RpcError) -> BerthClientError:
    return from_rpc_error(err, address="", service="registry")


def assert_storage_full(error: BerthClientError, disk: SmallDisk) -> None:
    assert error.code == "RESOURCE_EXHAUSTED", error
    assert error.reason == "STORAGE_FULL", error
    assert f"the registry's data directory {disk.data_dir} is full" in str(error), error
    assert "Errno" not in str(error) and "internal" not in str(error).lower()


def session_dirs(disk: SmallDisk) -> list[Path]:
    return sorted((disk.data_dir / "uploads").iterdir())


def test_a_full_disk_is_storage_full_leaves_nothing_half_written_and_recovers(
    small_disk: SmallDisk, tmp_path: Path
) -> None:
    disk = small_disk
    rpc = stub(disk.registry.address)
    with RegistryClient(disk.registry.address) as client:
        # Before the disk fills: an image, and an upload with 3000 of its 5000 bytes.
        layer = os.urandom(5000)
        manifest, blobs = image([b"first layer"])
        for blob in blobs:
            push_bytes(client, "lib/full", blob, tmp_path)
        client.put_manifest("lib/full", "v1", OCI_MANIFEST, manifest)
        pending = rpc.StartUpload(pb.StartUploadRequest(repository="lib/full")).upload_id
        rpc.WriteUpload(
            iter([pb.WriteUploadRequest(upload_id=pending, offset=0, data=layer[:3000])])
        )
        disk.fill()

        with pytest.raises(grpc.RpcError) as start:
            rpc.StartUpload(pb.StartUploadRequest(repository="lib/full"))
        assert_storage_full(error_of(start.value), disk)

        with pytest.raises(grpc.RpcError) as write:
            rpc.WriteUpload(
                iter([pb.WriteUploadRequest(upload_id=pending, offset=3000, data=layer[3000:])])
            )
        written = error_of(write.value)
        assert_storage_full(written, disk)
        # What the disk took is stored: the client resumes from the offset reported.
        stored = int(written.metadata["offset"])
        assert 3000 <= stored < 5000
        assert rpc.GetUpload(pb.GetUploadRequest(upload_id=pending)).offset == stored

        # A blob committed now needs a new directory entry: none is left.
        with pytest.raises(grpc.RpcError) as commit:
            rpc.CommitUpload(pb.CommitUploadRequest(upload_id=pending, digest=sha(layer[:stored])))
        assert_storage_full(error_of(commit.value), disk)

        other_manifest, other_blobs = image([b"first layer", b"another"])
        with pytest.raises(BerthClientError) as put:
            client.put_manifest("lib/full", "v2", OCI_MANIFEST, manifest + b" ")
        assert_storage_full(put.value, disk)
        # A new tag for a manifest already stored needs no disk: it works on a full one.
        assert client.put_manifest("lib/full", "also-v1", OCI_MANIFEST, manifest) == sha(manifest)

        # GC on a full disk runs clean (it only deletes).
        report = client.garbage_collect(grace_seconds=3600)
        assert report.deleted == []

        # Nothing half-written: the one session, whole; no staging left behind.
        assert [p.name for p in session_dirs(disk)] == [pending]
        info = json.loads((disk.data_dir / "uploads" / pending / "info.json").read_text())
        assert info["repository"] == "lib/full"
        assert client.get_manifest("lib/full", "v1").content == manifest
        with pytest.raises(BerthClientError) as missing:
            client.get_manifest("lib/full", "v2")
        assert missing.value.code == "NOT_FOUND"

        disk.free()

        # Everything works again: the session resumes where the disk stopped and commits.
        rpc.WriteUpload(
            iter([pb.WriteUploadRequest(upload_id=pending, offset=stored, data=layer[stored:])])
        )
        rpc.CommitUpload(pb.CommitUploadRequest(upload_id=pending, digest=sha(layer)))
        assert client.stat_blob("lib/full", sha(layer)).size == 5000
        for blob in other_blobs:
            push_bytes(client, "lib/full", blob, tmp_path)
        client.put_manifest("lib/full", "v2", OCI_MANIFEST, other_manifest)
        assert client.get_manifest("lib/full", "v2").content == other_manifest
        report = client.garbage_collect(grace_seconds=3600)
        assert report.deleted == [] and report.uploads_removed == 0
        assert session_dirs(disk) == []
        assert sha(layer) in blob_files(disk.data_dir)


def test_a_disk_turned_read_only_is_storage_error_publishes_nothing_and_recovers(
    small_disk: SmallDisk, tmp_path: Path
) -> None:
    """A real filesystem failing under the registry (remounted read-only, as ext4 does on an
    I/O error with errors=remount-ro): UNAVAILABLE STORAGE_ERROR, nothing published."""
    disk = small_disk
    rpc = stub(disk.registry.address)
    with RegistryClient(disk.registry.address) as client:
        manifest, blobs = image([b"before the failure"])
        for blob in blobs:
            push_bytes(client, "lib/ro", blob, tmp_path)
        client.put_manifest("lib/ro", "v1", OCI_MANIFEST, manifest)
        subprocess.run(["mount", "-o", "remount,ro", str(disk.mount)], check=True)
        try:
            with pytest.raises(grpc.RpcError) as start:
                rpc.StartUpload(pb.StartUploadRequest(repository="lib/ro"))
            error = error_of(start.value)
            assert (error.code, error.reason) == ("UNAVAILABLE", "STORAGE_ERROR"), error
            assert "Errno" not in str(error) and "internal" not in str(error).lower()
            with pytest.raises(BerthClientError) as put:  # its blobs are there: it needs the disk
                client.put_manifest("lib/ro", "v2", OCI_MANIFEST, manifest + b" ")
            assert (put.value.code, put.value.reason) == ("UNAVAILABLE", "STORAGE_ERROR")
            # What was stored before still reads, stats included (they refresh a blob's age).
            assert client.get_manifest("lib/ro", "v1").content == manifest
            assert client.stat_blob("lib/ro", sha(blobs[0])).size == len(blobs[0])
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(disk.mount)], check=True)
        with pytest.raises(BerthClientError) as missing:
            client.get_manifest("lib/ro", "v2")
        assert missing.value.code == "NOT_FOUND"
        assert session_dirs(disk) == []
        push_bytes(client, "lib/ro", b"after the disk is back", tmp_path)
        assert client.garbage_collect(grace_seconds=3600).uploads_removed == 0


def put_raw(endpoint: str, prefix: str, key: str, value: bytes) -> None:
    async def put() -> None:
        store = Store(endpoint, prefix)
        await store.connect()
        try:
            await store.put(key, value)
        finally:
            await store.close()

    asyncio.run(put())


def age_tree(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (old, old))


def test_gc_removes_damaged_upload_sessions_and_still_collects(
    registry: ServiceProcess, tmp_path: Path
) -> None:
    """What a full disk left before: a session with an empty info.json broke every GC after
    it had deleted blobs. Now GC skips it, removes it once old, and collects the rest."""
    data_dir = tmp_path / "registry-data"
    rpc = stub(registry.address)
    with RegistryClient(registry.address) as client:
        orphan = push_bytes(client, "lib/gc", b"referenced by nothing", tmp_path)
        age(data_dir, [orphan], 7200)
        uploads = data_dir / "uploads"
        empty = rpc.StartUpload(pb.StartUploadRequest(repository="lib/gc")).upload_id
        (uploads / empty / "info.json").write_bytes(b"")
        (uploads / "0123abcd").mkdir()  # no files at all: a creation cut short
        (uploads / ".new-4567cdef").mkdir()  # today's staging, never renamed
        young = rpc.StartUpload(pb.StartUploadRequest(repository="lib/gc")).upload_id
        (uploads / young / "info.json").write_bytes(b'{"repository": ')
        for name in (empty, "0123abcd", ".new-4567cdef"):
            age_tree(uploads / name, 7200)

        with pytest.raises(grpc.RpcError) as damaged:
            rpc.GetUpload(pb.GetUploadRequest(upload_id=empty))
        error = error_of(damaged.value)
        assert (error.code, error.reason) == ("NOT_FOUND", "UPLOAD_UNKNOWN")
        assert "is damaged" in str(error) and "start the upload again" in str(error)

        report = client.garbage_collect(grace_seconds=3600)
        assert [b.digest for b in report.deleted] == [orphan]
        assert report.uploads_removed == 3
        # The young damaged session stays until it is older than the grace period.
        assert sorted(p.name for p in uploads.iterdir()) == [young]
        assert client.garbage_collect(grace_seconds=3600).deleted == []


def test_gc_rebuilds_a_damaged_manifest_record_or_stops_before_deleting(
    registry: ServiceProcess, etcd_endpoint: str, etcd_prefix: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "registry-data"
    with RegistryClient(registry.address) as client:
        manifest, blobs = image([b"kept layer"])
        for blob in blobs:
            push_bytes(client, "lib/rec", blob, tmp_path)
        digest = client.put_manifest("lib/rec", "v1", OCI_MANIFEST, manifest)
        orphan = push_bytes(client, "lib/rec", b"garbage", tmp_path)
        age(data_dir, list(blob_files(data_dir)), 7200)
        key = f"registry/manifests/lib/rec@{digest}"
        put_raw(etcd_endpoint, etcd_prefix, key, b"")

        with pytest.raises(BerthClientError) as read:
            client.get_manifest("lib/rec", "v1")
        assert (read.value.code, read.value.reason) == ("DATA_LOSS", "MANIFEST_RECORD_CORRUPT")
        assert list(client.iter_manifests("lib/rec")) == []  # skipped, not a failed listing

        # The record is rebuilt from the manifest's blob: its layers are kept.
        report = client.garbage_collect(grace_seconds=3600)
        assert [b.digest for b in report.deleted] == [orphan]
        assert client.get_manifest("lib/rec", "v1").content == manifest
        assert set(blob_files(data_dir)) == {digest, *(sha(b) for b in blobs)}

        # A damaged record whose blob is gone too: GC stops, and has deleted nothing.
        lost = sha(b"a manifest nobody has")
        put_raw(etcd_endpoint, etcd_prefix, f"registry/manifests/lib/rec@{lost}", b"{")
        garbage = push_bytes(client, "lib/rec", b"more garbage", tmp_path)
        age(data_dir, [garbage], 7200)
        before = blob_files(data_dir)
        with pytest.raises(BerthClientError) as stopped:
            client.garbage_collect(grace_seconds=3600)
        assert (stopped.value.code, stopped.value.reason) == (
            "DATA_LOSS",
            "MANIFEST_RECORD_CORRUPT",
        )
        assert "nothing was deleted" in str(stopped.value)
        assert blob_files(data_dir) == before
        # The way out the message names: delete it by digest, then GC runs clean.
        assert client.delete_manifest("lib/rec", lost).digest == lost
        assert [b.digest for b in client.garbage_collect(grace_seconds=3600).deleted] == [garbage]
