"""gRPC servicer for berth.cluster.v1.SecretService: converts messages and calls SecretCore.

Values go in through CreateSecret and come out only through GetContainerSecrets, to the node
the container is placed on (berthd.cluster.secrets checks the caller).
"""

from __future__ import annotations

import grpc

from berth.cluster.v1 import secrets_pb2 as pb
from berth.cluster.v1 import secrets_pb2_grpc
from berth.types.v1 import container_pb2
from berthd.cluster.secrets import SecretCore, SecretRecord
from berthd.common.messages import timestamp
from berthd.common.pages import paginate
from berthd.common.security.principal import current_principal

Context = grpc.aio.ServicerContext


def secret_message(record: SecretRecord) -> pb.Secret:
    """A secret as callers see it: never its value."""
    return pb.Secret(
        secret_id=record.id,
        name=record.name,
        labels=record.labels,
        created_at=timestamp(record.created_at),
        created_by=record.created_by,
    )


class SecretServicer(secrets_pb2_grpc.SecretServiceServicer):
    def __init__(self, core: SecretCore) -> None:
        self.core = core

    async def CreateSecret(
        self, request: pb.CreateSecretRequest, context: Context
    ) -> pb.CreateSecretResponse:
        record = await self.core.create(
            request.name, request.data, dict(request.labels), current_principal().name
        )
        return pb.CreateSecretResponse(secret=secret_message(record))

    async def ListSecrets(
        self, request: pb.ListSecretsRequest, context: Context
    ) -> pb.ListSecretsResponse:
        records = await self.core.list(dict(request.labels))
        found, token = paginate("cluster.ListSecrets", request, records)
        return pb.ListSecretsResponse(
            secrets=[secret_message(r) for r in found], next_page_token=token
        )

    async def RemoveSecret(
        self, request: pb.RemoveSecretRequest, context: Context
    ) -> pb.RemoveSecretResponse:
        record = await self.core.remove(request.secret)
        return pb.RemoveSecretResponse(secret=secret_message(record))

    async def GetContainerSecrets(
        self, request: pb.GetContainerSecretsRequest, context: Context
    ) -> pb.GetContainerSecretsResponse:
        delivered = await self.core.container_secrets(
            request.container_id, current_principal().name
        )
        return pb.GetContainerSecretsResponse(
            secrets=[
                pb.ContainerSecret(
                    reference=container_pb2.SecretReference(
                        name=d.reference.name,
                        target=d.reference.target,
                        mode=d.reference.mode,
                        uid=d.reference.uid,
                        gid=d.reference.gid,
                    ),
                    secret_id=d.secret_id,
                    data=d.data,
                )
                for d in delivered
            ]
        )
