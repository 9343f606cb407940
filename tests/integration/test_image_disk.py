"""The image service on a full disk: its scratch directory on a real size-limited tmpfs.

Loading an archive or importing a tarball that does not fit answers RESOURCE_EXHAUSTED
(STORAGE_FULL) naming the scratch directory, leaves no spool file behind, and works once
space is freed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from berthd.common.errors import BerthError, ResourceExhausted
from berthd.common.rpc.registry import RegistryApi
from berthd.common.store import Store
from berthd.image.archive import load_images
from berthd.image.catalog import Catalog
from berthd.image.commit import import_tarball

from .conftest import ServiceProcess
from .disks import small_tmpfs
from .images import busybox_layer
from .test_image_archive import BUSYBOX, file_chunks, save_to
from .test_image_catalog import chunks_of

pytestmark = pytest.mark.integration


@pytest.fixture
def small_scratch() -> Iterator[Path]:
    """An 8 MiB tmpfs, unmounted at teardown; the scratch directory is inside it."""
    with small_tmpfs("berth-image-disk-", "size=8m") as mount:
        yield mount


def fill(mount: Path) -> Path:
    filler = mount / "filler"
    with open(filler, "ab", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 65536)
        except OSError as err:
            assert err.errno == 28
        try:
            while True:
                out.write(b"\0")
        except OSError as err:
            assert err.errno == 28
    return filler


def assert_storage_full(error: BerthError, scratch: Path) -> None:
    assert isinstance(error, ResourceExhausted), error
    assert error.reason == "STORAGE_FULL", error
    assert f"the image service's scratch directory {scratch} is full" in str(error), error
    assert "Errno" not in str(error)


async def test_load_and_import_on_a_full_disk_are_storage_full_and_leave_no_spool(
    store: Store, registry: ServiceProcess, busybox: str, small_scratch: Path, tmp_path: Path
) -> None:
    roomy = Catalog(store, RegistryApi(registry.address), tmp_path / "scratch")
    archive = await save_to(roomy, [BUSYBOX], "docker", tmp_path / "busybox.tar")
    tarball = busybox_layer()
    scratch = small_scratch / "scratch"
    catalog = Catalog(store, RegistryApi(registry.address), scratch)
    scratch.mkdir()
    filler = fill(small_scratch)

    with pytest.raises(BerthError) as load:
        await load_images(catalog, file_chunks(archive))
    assert_storage_full(load.value, scratch)
    assert os.listdir(scratch) == []

    with pytest.raises(BerthError) as imported:
        await import_tarball(catalog, chunks_of(tarball, 65536), "full/imported:1", "", [], "-")
    assert_storage_full(imported.value, scratch)
    assert os.listdir(scratch) == []

    filler.unlink()
    _, references = await load_images(catalog, file_chunks(archive))
    assert references == [BUSYBOX]
    detail = await import_tarball(
        catalog, chunks_of(tarball, 65536), "full/imported:1", "", [], "-"
    )
    assert detail.digest
    assert os.listdir(scratch) == []
    await roomy.close()
    await catalog.close()
