"""Typed client for the cluster's NetworkService: create, inspect, list and remove networks."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from berth.client.base import GrpcClient
from berth.client.containers import time_of
from berth.cluster.v1 import network_pb2 as pb
from berth.cluster.v1 import network_pb2_grpc


@dataclass(frozen=True)
class NetworkInfo:
    """A network; `slices` ({node id: CIDR}) only from `get`."""

    id: str
    name: str
    subnet: str
    internal: bool
    labels: dict[str, str]
    created_at: datetime | None
    slices: dict[str, str] = field(default_factory=dict)


def network_info(n: Any) -> NetworkInfo:
    return NetworkInfo(
        id=n.network_id,
        name=n.name,
        subnet=n.subnet,
        internal=n.internal,
        labels=dict(n.labels),
        created_at=time_of(n, "created_at"),
        slices={s.node_id: s.subnet for s in n.slices},
    )


class NetworkClient(GrpcClient):
    SERVICE = "cluster"
    OPTION = "--host or BERTH_HOST"

    def __init__(self, address: str, *, timeout: float | None = 60.0) -> None:
        super().__init__(address, timeout=timeout)
        self._stub = network_pb2_grpc.NetworkServiceStub(self._channel)

    def create(
        self,
        name: str,
        subnet: str = "",
        internal: bool = False,
        labels: dict[str, str] | None = None,
    ) -> NetworkInfo:
        """Make a network; an empty subnet picks the first free /16 of 10.89-10.199."""
        request = pb.CreateNetworkRequest(
            name=name, subnet=subnet, internal=internal, labels=labels or {}
        )
        return network_info(self._call(self._stub.CreateNetwork, request).network)

    def get(self, network: str) -> NetworkInfo:
        """A network by name, id or unique id prefix, with its nodes' slices."""
        request = pb.GetNetworkRequest(network=network)
        return network_info(self._call(self._stub.GetNetwork, request).network)

    def list(self, labels: dict[str, str] | None = None) -> list[NetworkInfo]:
        request = pb.ListNetworksRequest(labels=labels or {})
        return [network_info(n) for n in self._call(self._stub.ListNetworks, request).networks]

    def remove(self, network: str) -> NetworkInfo:
        """FAILED_PRECONDITION (NETWORK_IN_USE) while a container or service names it."""
        request = pb.RemoveNetworkRequest(network=network)
        return network_info(self._call(self._stub.RemoveNetwork, request).network)
