"""berthd.common.rpc.calls: another service's status codes as the caller's domain errors."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from berth.cluster.v1 import cluster_pb2 as cpb
from berthd.common.containers import ContainerConfig
from berthd.common.errors import (
    Aborted,
    BerthError,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    Unavailable,
)
from berthd.common.rpc import cluster as cluster_rpc
from berthd.common.rpc.calls import domain_error, retryable
from berthd.common.rpc.cluster import ClusterApi
from berthd.common.rpc.node import NodeApi


def rpc_error(code: grpc.StatusCode, details: str) -> AioRpcError:
    return AioRpcError(code, Metadata(), Metadata(), details)


@pytest.mark.parametrize(
    ("code", "details", "prefix", "kind", "message"),
    [
        (grpc.StatusCode.NOT_FOUND, "No such image: x", False, NotFound, "No such image: x"),
        (grpc.StatusCode.NOT_FOUND, "blob unknown", True, NotFound, "registry: blob unknown"),
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            "node  n1\n is down",
            False,
            FailedPrecondition,
            "node n1 is down",
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9: "
            "Failed to connect to remote host: Connection refused",
            True,
            Unavailable,
            "cannot reach the registry at 127.0.0.1:9 (Connection refused)",
        ),
        # The peer's own UNAVAILABLE answer is shown as it is, with the peer's name.
        (
            grpc.StatusCode.UNAVAILABLE,
            "node n2 did not report",
            True,
            Unavailable,
            "registry: node n2 did not report",
        ),
        (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "Deadline Exceeded",
            True,
            DeadlineExceeded,
            "the registry at 127.0.0.1:9 did not answer in time",
        ),
        (grpc.StatusCode.INTERNAL, "", False, BerthError, "the registry at 127.0.0.1:9 failed"),
    ],
)
def test_status_codes_become_domain_errors(code, details, prefix, kind, message) -> None:
    error = domain_error(rpc_error(code, details), "registry", "127.0.0.1:9", prefix)
    assert type(error) is kind
    assert str(error).startswith(message)


def test_codes_without_a_domain_class_are_kept() -> None:
    error = domain_error(rpc_error(grpc.StatusCode.CANCELLED, "gone"), "node", "n:1")
    assert type(error) is BerthError
    assert error.code == grpc.StatusCode.CANCELLED
    assert BerthError.code == grpc.StatusCode.UNKNOWN  # the class default is untouched


def test_only_a_peer_never_reached_is_retried() -> None:
    refused = "failed to connect to all addresses; last error: Connection refused"
    assert retryable(rpc_error(grpc.StatusCode.UNAVAILABLE, refused))
    assert not retryable(rpc_error(grpc.StatusCode.UNAVAILABLE, "no node is ready"))
    assert not retryable(rpc_error(grpc.StatusCode.NOT_FOUND, refused))


def test_a_named_node_is_named_in_its_errors() -> None:
    """The cluster relays a node's failures (logs, exec, stats) naming the node."""
    refused = "failed to connect to all addresses; last error: Connection refused"
    node = NodeApi("127.0.0.1:9", node_id="n1")
    error = node.error(rpc_error(grpc.StatusCode.UNAVAILABLE, refused), "127.0.0.1:9")
    assert isinstance(error, Unavailable)
    assert str(error) == "node n1: cannot reach the node at 127.0.0.1:9 (Connection refused)"
    cancelled = node.error(rpc_error(grpc.StatusCode.CANCELLED, "gone"), "127.0.0.1:9")
    assert (cancelled.code, str(cancelled)) == (grpc.StatusCode.CANCELLED, "node n1: gone")
    unnamed = NodeApi("127.0.0.1:9").error(rpc_error(grpc.StatusCode.NOT_FOUND, "x"), "a")
    assert str(unnamed) == "x"


class RacingCluster(ClusterApi):
    """The real client's run, on a cluster whose first `aborts` answers are ABORTED."""

    def __init__(self, aborts: int) -> None:
        super().__init__("127.0.0.1:9")
        self.aborts = aborts
        self.request_ids: list[str] = []

    async def unary(self, method: str, request: Any, **kw: Any) -> Any:
        assert method == "RunContainer"
        self.request_ids.append(request.request_id)
        if len(self.request_ids) <= self.aborts:
            raise Aborted("too many concurrent placements; try again")
        return cpb.RunContainerResponse(container=cpb.Container(id="c1", node_id="n1"))


async def test_run_tries_again_after_aborted_with_the_same_request_id() -> None:
    cluster = RacingCluster(aborts=2)
    container = await cluster.run(ContainerConfig("busybox"))
    assert container.id == "c1" and len(cluster.request_ids) == 3
    assert len(set(cluster.request_ids)) == 1  # a retry, never a second container


async def test_run_gives_up_aborted_after_its_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_rpc, "MAX_BACKOFF", 0.01)
    cluster = RacingCluster(aborts=100)
    with pytest.raises(Aborted):
        await cluster.run(ContainerConfig("busybox"))
    assert len(cluster.request_ids) == cluster_rpc.RUN_ATTEMPTS
