"""gRPC servicer for berth.cluster.v1.NetworkService: converts messages, calls NetworkCore."""

from __future__ import annotations

import grpc

from berth.cluster.v1 import network_pb2 as pb
from berth.cluster.v1 import network_pb2_grpc
from berthd.cluster.networks import NetworkCore
from berthd.common.messages import timestamp
from berthd.common.state.networks import NetworkRecord

Context = grpc.aio.ServicerContext


def network_message(record: NetworkRecord, slices: dict[str, str] | None = None) -> pb.Network:
    return pb.Network(
        network_id=record.id,
        name=record.name,
        subnet=record.subnet,
        internal=record.internal,
        labels=record.labels,
        created_at=timestamp(record.created_at),
        slices=[pb.NetworkSlice(node_id=n, subnet=s) for n, s in sorted((slices or {}).items())],
    )


class NetworkServicer(network_pb2_grpc.NetworkServiceServicer):
    def __init__(self, core: NetworkCore) -> None:
        self.core = core

    async def CreateNetwork(
        self, request: pb.CreateNetworkRequest, context: Context
    ) -> pb.CreateNetworkResponse:
        record = await self.core.create(
            request.name, request.subnet, request.internal, dict(request.labels)
        )
        return pb.CreateNetworkResponse(network=network_message(record))

    async def GetNetwork(
        self, request: pb.GetNetworkRequest, context: Context
    ) -> pb.GetNetworkResponse:
        record, slices = await self.core.get(request.network)
        return pb.GetNetworkResponse(network=network_message(record, slices))

    async def ListNetworks(
        self, request: pb.ListNetworksRequest, context: Context
    ) -> pb.ListNetworksResponse:
        records = await self.core.list(dict(request.labels))
        return pb.ListNetworksResponse(networks=[network_message(r) for r in records])

    async def RemoveNetwork(
        self, request: pb.RemoveNetworkRequest, context: Context
    ) -> pb.RemoveNetworkResponse:
        record = await self.core.remove(request.network)
        return pb.RemoveNetworkResponse(network=network_message(record))
