"""The builder's spool on a full disk: closing it deletes its file, whatever the flush says."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest

from berthd.builder.spool import Spool


def test_a_spool_that_hit_a_full_disk_is_deleted_on_close(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "layerfiles-")
    # /dev/full: every write that reaches it fails with ENOSPC, as on a full scratch disk.
    spool._file.close()
    spool._file = open("/dev/full", "wb")  # noqa: SIM115 - the spool closes it
    with pytest.raises(OSError) as full:
        spool.add(io.BytesIO(b"x" * 10), 10, "a file")
    assert full.value.errno == errno.ENOSPC
    spool.close()  # the bytes still buffered fail to flush again: no matter
    assert list(tmp_path.iterdir()) == []
