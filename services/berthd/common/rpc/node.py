"""A node agent as the other services call it: a container's state, its changes, its layer.

The cluster also streams logs, exec and stats through to a node (`stream`); given the node's
id, every error names the node ("node n1: ...").
"""

from __future__ import annotations

from typing import Any

import grpc

from berth.client.containers import ContainerInfo
from berth.client.node import container_info
from berth.node.v1 import node_pb2 as pb
from berth.node.v1 import node_pb2_grpc as pb_grpc
from berth.types.v1 import container_pb2
from berthd.common.errors import BerthError, Unavailable, error_for_code
from berthd.common.rpc.calls import Address, ServiceApi, retryable

# Packing a large upper dir and pushing it takes as long as the data.
EXPORT_TIMEOUT = 600.0
# Reading cgroups twice 0.1 s apart: a node that takes longer is reported, not waited for.
STATS_TIMEOUT = 10.0


class NodeApi(ServiceApi[pb_grpc.NodeServiceStub]):
    SERVICE = "node"

    def __init__(self, address: Address, node_id: str = "", **options: Any) -> None:
        super().__init__(address, **options)
        self.node_id = node_id

    def stub(self, channel: grpc.aio.Channel) -> pb_grpc.NodeServiceStub:
        return pb_grpc.NodeServiceStub(channel)

    def error(self, err: grpc.aio.AioRpcError, address: str) -> BerthError:
        error = super().error(err, address)
        if not self.node_id:
            return error
        message = f"node {self.node_id}: {error}"
        if retryable(err):  # the agent could not be reached at all
            return Unavailable(
                message,
                reason="NODE_UNREACHABLE",
                metadata={"node_id": self.node_id, "address": address},
            )
        return error_for_code(error.code.name, message, error.details)

    async def inspect(self, container: str) -> ContainerInfo:
        request = pb.GetContainerRequest(container=container)
        reply = await self.unary("GetContainer", request, idempotent=True)
        return container_info(reply.container)

    async def stats_many(self, containers: list[str]) -> list[container_pb2.ContainerStats]:
        """One sample of each container (ids on this node), in the order asked."""
        request = pb.BatchContainerStatsRequest(containers=containers)
        reply = await self.unary(
            "BatchContainerStats", request, idempotent=True, timeout=STATS_TIMEOUT
        )
        return [entry.sample for entry in reply.stats]

    async def has_changes(self, container: str) -> bool:
        """Whether the container's filesystem differs from its image."""
        request = pb.ContainerChangesRequest(container=container)
        reply = await self.unary("ContainerChanges", request, idempotent=True)
        return bool(reply.changes)

    async def export_layer(
        self, container: str, repository: str, pause: bool = False
    ) -> tuple[str, str, int]:
        """The node packs the container's changes as a layer and pushes it to the registry;
        returns (digest, diff_id, size). With `pause`, the container is frozen meanwhile."""
        request = pb.ExportLayerRequest(container=container, repository=repository, pause=pause)
        reply = await self.unary("ExportLayer", request, timeout=EXPORT_TIMEOUT)
        return reply.layer.digest, reply.diff_id, int(reply.layer.size)
