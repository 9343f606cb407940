"""berthd.common.container_messages: ContainerStatus for the node and the cluster (a spec is
converted by the container model itself: tests/unit/test_container_model.py)."""

from __future__ import annotations

from berth.types.v1 import container_pb2 as pb
from berthd.common.container_messages import container_status, state_filter


def test_container_status() -> None:
    status = container_status("exited", exit_code=3, started_at=1.5, finished_at=None)
    assert status.state == pb.CONTAINER_STATE_EXITED
    assert status.exit_code == 3
    assert status.started_at.ToNanoseconds() == 1_500_000_000
    assert not status.HasField("finished_at")
    assert container_status("").state == pb.CONTAINER_STATE_UNSPECIFIED  # not created yet
    assert state_filter(pb.CONTAINER_STATE_RUNNING) == "running"
    assert state_filter(pb.CONTAINER_STATE_UNSPECIFIED) == ""  # no filter
