"""The per-node assignment index's keys and the writes every desired-record writer uses."""

from __future__ import annotations

import pytest

from berthd.common.containers import ContainerConfig
from berthd.common.state.containers import (
    DesiredContainer,
    assigned_id,
    assignment_key,
    op_delete_desired,
    op_put_desired,
)
from berthd.common.store import Store

CID = "c" * 64


def test_keys_and_ids() -> None:
    assert assignment_key("n1", CID) == f"cluster/assignments/n1/{CID}"
    assert assigned_id("n1", assignment_key("n1", CID)) == CID
    assert assigned_id("n2", assignment_key("n1", CID)) is None
    assert assigned_id("n1", "cluster/assignments-ready") is None
    with pytest.raises(ValueError):
        assignment_key("a/b", CID)


def test_a_record_is_written_with_its_key_and_a_move_deletes_the_old_one() -> None:
    store = Store("127.0.0.1:1", "/t/")  # never connected: ops are only built
    record = DesiredContainer(CID, "web", "n1", ContainerConfig("busybox"))
    written = [store.written(op) for op in op_put_desired(store, record)]
    assert [(key, value is None) for key, value in written] == [
        (f"cluster/containers/{CID}", False),
        (assignment_key("n1", CID), False),
    ]
    moved = DesiredContainer(CID, "web", "n2", ContainerConfig("busybox"))
    keys = [store.written(op) for op in op_put_desired(store, moved, record)]
    assert keys[-1] == (assignment_key("n1", CID), None)
    deleted = [store.written(op) for op in op_delete_desired(store, moved)]
    assert deleted == [(f"cluster/containers/{CID}", None), (assignment_key("n2", CID), None)]
