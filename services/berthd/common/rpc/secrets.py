"""The cluster's SecretService as a node agent calls it: a container's secrets, for the node
the container is placed on (the cluster checks the node's certificate)."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from berth.cluster.v1 import secrets_pb2 as pb
from berth.cluster.v1 import secrets_pb2_grpc as pb_grpc
from berthd.common.rpc.calls import ServiceApi


@dataclass(frozen=True)
class SecretFile:
    """One file of /run/secrets: the reference with its defaults filled in, and the value
    (kept out of repr, so it never reaches a log line by accident)."""

    name: str
    target: str
    mode: int
    uid: int
    gid: int
    data: bytes = field(repr=False)


class SecretApi(ServiceApi[pb_grpc.SecretServiceStub]):
    SERVICE = "cluster"

    def stub(self, channel: grpc.aio.Channel) -> pb_grpc.SecretServiceStub:
        return pb_grpc.SecretServiceStub(channel)

    async def container_secrets(self, container_id: str) -> list[SecretFile]:
        request = pb.GetContainerSecretsRequest(container_id=container_id)
        reply = await self.unary("GetContainerSecrets", request, idempotent=True)
        return [
            SecretFile(
                name=s.reference.name,
                target=s.reference.target or s.reference.name,
                mode=s.reference.mode or 0o444,
                uid=s.reference.uid,
                gid=s.reference.gid,
                data=s.data,
            )
            for s in reply.secrets
        ]
