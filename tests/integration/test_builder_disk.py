"""The builder on a full disk: its scratch directory on a real size-limited tmpfs.

A build whose context or layers do not fit answers RESOURCE_EXHAUSTED (STORAGE_FULL) naming
the scratch directory, leaves nothing in scratch, and builds once space is freed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from berthd.builder.cache import BuildCache
from berthd.builder.executor import Builder
from berthd.builder.model import BuildEvent, BuildOptions, StepEvent
from berthd.builder.runner import Runner
from berthd.common.errors import BerthError, ResourceExhausted
from berthd.common.images import ImageStore
from berthd.common.rpc.cluster import ClusterApi
from berthd.common.rpc.registry import RegistryApi
from berthd.common.state.build_cache import CACHE_REPOSITORY
from berthd.common.store import Store

from .conftest import ServiceProcess
from .disks import small_tmpfs
from .images import tar_of

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 16 MiB tmpfs, unmounted at teardown."""
    with small_tmpfs("berth-builder-disk-", "size=16m") as mount:
        yield mount


def fill(mount: Path, leave: int) -> Path:
    """Use the tmpfs's blocks until about `leave` bytes are free (0: none at all)."""
    filler = mount / "filler"
    free = os.statvfs(mount)
    size = max(free.f_bavail * free.f_frsize - leave, 0)
    with open(filler, "ab", buffering=0) as out:
        try:
            while size > 0:
                size -= out.write(b"\0" * min(size, MIB)) or 0
            while not leave:
                out.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == 28
    return filler


async def chunks_of(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def assert_storage_full(error: BerthError, scratch: Path) -> None:
    assert isinstance(error, ResourceExhausted), error
    assert error.reason == "STORAGE_FULL", error
    assert f"the builder's scratch directory {scratch} is full" in str(error), error
    assert "Errno" not in str(error)


async def test_a_build_on_a_full_disk_is_storage_full_and_leaves_nothing(
    store: Store, registry: ServiceProcess, small_disk: Path
) -> None:
    scratch = small_disk / "scratch"
    scratch.mkdir()
    images = ImageStore(RegistryApi(registry.address))
    # FROM scratch and COPY run no container: the runner's cluster is never called.
    runner = Runner(ClusterApi("127.0.0.1:1"), CACHE_REPOSITORY)
    builder = Builder(store, images, BuildCache(store), runner, scratch, 64 * MIB)
    # 3 MiB that do not compress: the context fits in 4 MiB, the context and its layer do not.
    context = tar_of({"big.bin": os.urandom(3 * MIB)})
    options = BuildOptions(
        dockerfile_content="FROM scratch\nCOPY big.bin /big.bin\n", tags=["full/built:1"]
    )

    filler = fill(small_disk, leave=0)
    with pytest.raises(BerthError) as context_full:
        await builder.build(options, chunks_of(context), lambda event: None)
    assert_storage_full(context_full.value, scratch)
    assert os.listdir(scratch) == []
    filler.unlink()

    filler = fill(small_disk, leave=4 * MIB)
    events: list[BuildEvent] = []
    with pytest.raises(BerthError) as layer_full:
        await builder.build(options, chunks_of(context), events.append)
    # The context was in: it was the COPY's layer that did not fit.
    assert [e.instruction for e in events if isinstance(e, StepEvent)][-1].startswith("COPY")
    assert_storage_full(layer_full.value, scratch)
    assert os.listdir(scratch) == []
    filler.unlink()

    result = await builder.build(options, chunks_of(context), lambda event: None)
    assert result.tags == ["full/built:1"]
    assert os.listdir(scratch) == []
