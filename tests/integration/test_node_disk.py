"""The node agent on a full disk: a real size-limited tmpfs as its --data-dir.

A pull or a container create that runs out of space answers RESOURCE_EXHAUSTED (STORAGE_FULL)
with a message naming the data directory, leaves no partial layer directory, download or
record behind, and works again once space is freed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from berth.client import ContainerConfig, NodeClient, RegistryClient
from berth.client.node import PullProgress
from berth.errors import BerthClientError

from .conftest import NodeProcess, ServiceProcess, Services
from .disks import small_tmpfs
from .images import busybox_layer, push_image, tar_of

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


@dataclass
class SmallDisk:
    mount: Path
    agent: NodeProcess

    @property
    def data_dir(self) -> Path:
        return self.agent.data_dir

    def fill(self, leave: int = 0) -> None:
        """Use the tmpfs's blocks (outside the agent's tree) until about `leave` bytes are
        free; inodes stay free, so files can be created and then fail to grow."""
        free = os.statvfs(self.mount)
        size = max(free.f_bavail * free.f_frsize - leave, 0)
        with open(self.mount / "filler", "ab", buffering=0) as out:
            try:
                while size > 0:
                    size -= out.write(b"\0" * min(size, MIB)) or 0
                if not leave:
                    while True:
                        out.write(b"\0" * 4096)
            except OSError as err:
                assert err.errno == 28

    def free(self) -> None:
        (self.mount / "filler").unlink()

    def leftovers(self) -> dict[str, list[str]]:
        """Everything a failed pull could have left: layers, downloads, image records."""
        found = {}
        for sub in ("layers", "downloads", "images"):
            directory = self.data_dir / sub
            found[sub] = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
        return found


@pytest.fixture
def small_disk(services: Services, registry: ServiceProcess) -> Iterator[SmallDisk]:
    """A node agent whose data directory is a 24 MiB tmpfs; the agent (and its containers)
    go and the tmpfs is unmounted at teardown."""
    with small_tmpfs("berth-node-disk-", "size=24m") as mount:
        agent = NodeProcess(services, mount / "node", f"test-{uuid.uuid4().hex[:8]}", registry)
        agent.start()
        disk = SmallDisk(mount, agent)
        try:
            yield disk
        finally:
            (mount / "filler").unlink(missing_ok=True)
            agent.cleanup()


def assert_storage_full(error: BerthClientError, disk: SmallDisk) -> None:
    assert error.code == "RESOURCE_EXHAUSTED", error
    assert error.reason == "STORAGE_FULL", error
    assert f"the node's data directory {disk.data_dir} is full" in str(error), error
    assert "Errno" not in str(error) and "internal" not in str(error).lower()


def test_a_pull_onto_a_full_disk_is_storage_full_and_leaves_nothing(
    small_disk: SmallDisk, client: RegistryClient, tmp_path: Path
) -> None:
    disk = small_disk
    # 6 MiB that do not compress: the downloads fit in 10 MiB, with the unpacked layers not.
    big = tar_of({"data.bin": os.urandom(6 * MIB)})
    push_image(client, "test/big", "1", [busybox_layer(), big], tmp_path)
    push_image(client, "test/busybox", "1", [busybox_layer()], tmp_path)
    with NodeClient(disk.agent.address) as node:
        before = disk.leftovers()

        # No room to download at all.
        disk.fill()
        with pytest.raises(BerthClientError) as download:
            node.pull("test/big:1")
        assert_storage_full(download.value, disk)
        assert disk.leftovers() == before
        disk.free()

        # Room for the download, not for unpacking it next to the download.
        disk.fill(leave=10 * MIB)
        events: list[PullProgress] = []
        with pytest.raises(BerthClientError) as unpack:
            node.pull("test/big:1", events.append)
        assert_storage_full(unpack.value, disk)
        # It was the unpacking that failed: the big layer's download was whole, its
        # extraction began and never completed.
        big_layer = {e.layer for e in events if e.state == "Extracting" and e.total > 5 * MIB}
        assert len(big_layer) == 1
        assert not [e for e in events if e.layer in big_layer and e.state == "Pull complete"]
        left = disk.leftovers()
        assert left["downloads"] == [] and left["images"] == []
        assert not [name for name in left["layers"] if name.startswith(".tmp-")]
        assert len(left["layers"]) <= 1  # the busybox layer may have made it, whole
        assert [i.references for i in node.images()] == []

        # A container cannot be created either; nothing of it stays.
        disk.free()
        node.pull("test/busybox:1")
        disk.fill()
        with pytest.raises(BerthClientError) as create:
            node.create(ContainerConfig("test/busybox:1", command=["true"], name="full"))
        assert_storage_full(create.value, disk)
        assert node.list(all=True) == []
        assert list((disk.data_dir / "containers").iterdir()) == []

        # Once space is freed, everything works.
        disk.free()
        image = node.pull("test/big:1")
        assert image.references == ["test/big:1"]
        container = node.create(ContainerConfig("test/big:1", command=["true"], name="full"))
        assert [c.id for c in node.list(all=True)] == [container.id]
        assert disk.leftovers()["downloads"] == []
