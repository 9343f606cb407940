"""A container its node cannot create: the node says why in the container's status at once
(state CREATE_FAILED, a stable reason), does not try again by itself, and takes that status away
again when the container goes; WaitContainer and a followed log end at once with the reason;
StartContainer tries again."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from berth.client import ClusterClient, ContainerConfig
from berth.cluster.v1 import cluster_pb2 as pb
from berth.cluster.v1 import cluster_pb2_grpc
from berth.error_details import from_rpc_error
from berth.tls import secure_channel
from berth.types.v1 import container_pb2
from berthd.common.state.containers import STATUSES
from berthd.common.store import Store

from .conftest import NodeProcess, Services, wait_until

pytestmark = pytest.mark.integration


def _ready(c: ClusterClient) -> None:
    wait_until(lambda: c.nodes() and c.nodes()[0].state == "ready", 30, "the node")


def _failure(call) -> grpc.RpcError:
    """The error a call ends with."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


async def test_a_missing_image_fails_the_creation_at_once_with_its_reason(
    services: Services, node_agent: NodeProcess, registry, store: Store
) -> None:
    cluster = services.start("cluster")
    channel = secure_channel(cluster.address)
    stub = cluster_pb2_grpc.ClusterServiceStub(channel)
    events: list[pb.EventsResponse] = []
    stream = stub.Events(pb.EventsRequest(types=[pb.EVENT_TYPE_CONTAINER_CREATE_FAILED]))

    def follow() -> None:
        try:
            for event in stream:
                events.append(event)
        except grpc.RpcError:
            pass  # cancelled at the end

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    try:
        with ClusterClient(cluster.address) as c:
            _ready(c)
            stream.initial_metadata()  # the stream watches: it sees what follows
            ghost = c.run(ContainerConfig("test/no-such-image:1", name="ghost", command=["true"]))

            # WaitContainer ends at once: FAILED_PRECONDITION, CONTAINER_CREATE_FAILED and the
            # node's reason, not a wait for the caller's deadline (that would end
            # DEADLINE_EXCEEDED; the deadline only guards against a hang).
            error = _failure(
                lambda: list(
                    stub.WaitContainer(pb.WaitContainerRequest(container="ghost"), timeout=30)
                )
            )
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            details = from_rpc_error(error)
            assert details.reason == "CONTAINER_CREATE_FAILED"
            assert details.metadata["failure_reason"] == "IMAGE_NOT_FOUND"
            assert details.metadata["node_id"] == node_agent.node_id
            # So does a followed log.
            error = _failure(
                lambda: list(
                    stub.ContainerLogs(
                        pb.ContainerLogsRequest(container="ghost", follow=True), timeout=30
                    )
                )
            )
            assert from_rpc_error(error).reason == "CONTAINER_CREATE_FAILED"

            seen = stub.GetContainer(pb.GetContainerRequest(container="ghost")).container.status
            assert seen.state == container_pb2.CONTAINER_STATE_CREATE_FAILED
            assert seen.failure.reason == "IMAGE_NOT_FOUND"
            assert "test/no-such-image" in seen.failure.message
            info = c.inspect("ghost")
            assert (info.state, info.failure_reason) == ("create_failed", "IMAGE_NOT_FOUND")
            assert info.node_id == node_agent.node_id

            # One event, with the reason.
            wait_until(lambda: events, 10, "the CREATE_FAILED event")
            event = events[0]
            assert event.WhichOneof("payload") == "container"
            assert (event.container.container_id, event.container.name) == (ghost.id, "ghost")
            assert event.container.failure.reason == "IMAGE_NOT_FOUND"

            # The node does not try again by itself (it used to, on every pass). A later
            # container it cannot create either shows a pass went by: every pass goes over
            # every container assigned to the node, ghost first.
            reported = await STATUSES.get(store, ghost.id)
            assert reported is not None and reported.attempt == 0
            written = await store.get(STATUSES.key(ghost.id))
            assert written is not None
            marker = c.run(ContainerConfig("test/no-such-image:2", name="marker", command=["true"]))
            wait_until(
                lambda: any(e.container.container_id == marker.id for e in events),
                30,
                "the marker's CREATE_FAILED event",
            )
            again = await store.get(STATUSES.key(ghost.id))
            assert again is not None and again.mod_revision == written.mod_revision
            assert [e.container.name for e in events] == ["ghost", "marker"]

            # StartContainer does: a new attempt, which fails the same way, at once (not
            # DEADLINE_EXCEEDED).
            error = _failure(
                lambda: stub.StartContainer(pb.StartContainerRequest(container="ghost"), timeout=60)
            )
            assert from_rpc_error(error).reason == "CONTAINER_CREATE_FAILED"
            retried = await STATUSES.get(store, ghost.id)
            assert retried is not None and retried.attempt == 1
            wait_until(lambda: len(events) == 3, 10, "the second CREATE_FAILED event of ghost")
            assert events[2].container.name == "ghost"

            c.remove("ghost")  # a container that could not be created is not running
            c.remove("marker")
    finally:
        stream.cancel()
        channel.close()


async def test_the_reason_is_reported_then_cleaned_up(
    services: Services, node_agent: NodeProcess, busybox: str, store: Store
) -> None:
    cluster = services.start("cluster")
    with ClusterClient(cluster.address) as c:
        _ready(c)
        box = c.run(ContainerConfig(busybox, command=["true"], user="nobody-here"))
        wait_until(lambda: c.inspect(box.id).error, 30, "the node's report")
        seen = c.inspect(box.id)
        assert seen.state == "create_failed"
        assert seen.failure_reason == "INVALID_SPEC"
        assert "nobody-here" in seen.error
        assert seen.node_id == node_agent.node_id

        c.remove(box.id, force=True)

    for _ in range(100):  # the node notices the removal on its next pass
        if await STATUSES.get(store, box.id) is None:
            break
        await asyncio.sleep(0.1)
    assert await store.get(STATUSES.key(box.id)) is None
