"""Typed client for the cluster's AccessService: users' tokens and who the caller is."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from berth.client.base import GrpcClient
from berth.client.containers import all_pages, time_of
from berth.cluster.v1 import access_pb2 as pb
from berth.cluster.v1 import access_pb2_grpc


@dataclass(frozen=True)
class TokenInfo:
    id: str
    name: str
    role: str
    repositories: list[str]
    created_at: datetime | None
    expires_at: datetime | None
    created_by: str


@dataclass(frozen=True)
class Identity:
    principal: str
    credential: str  # token, certificate or none
    role: str
    repositories: list[str]
    permissions: list[str]


def token_info(t: Any) -> TokenInfo:
    return TokenInfo(
        id=t.token_id,
        name=t.name,
        role=t.role,
        repositories=list(t.repositories),
        created_at=time_of(t, "created_at"),
        expires_at=time_of(t, "expires_at"),
        created_by=t.created_by,
    )


class AccessClient(GrpcClient):
    SERVICE = "cluster"
    OPTION = "--host or BERTH_HOST"

    def __init__(self, address: str, *, timeout: float | None = 60.0) -> None:
        super().__init__(address, timeout=timeout)
        self._stub = access_pb2_grpc.AccessServiceStub(self._channel)

    def create_token(
        self, name: str, role: str, repositories: list[str] | None = None, expires_in: int = 0
    ) -> tuple[TokenInfo, str]:
        """A new token and its secret (shown once: the cluster keeps only its hash)."""
        request = pb.CreateTokenRequest(
            name=name, role=role, repositories=repositories or [], expires_in_seconds=expires_in
        )
        reply = self._call(self._stub.CreateToken, request)
        return token_info(reply.token), reply.secret

    def tokens(self) -> list[TokenInfo]:
        found = all_pages(
            lambda r: self._call(self._stub.ListTokens, r), pb.ListTokensRequest(), "tokens"
        )
        return [token_info(t) for t in found]

    def delete_token(self, token: str) -> TokenInfo:
        reply = self._call(self._stub.DeleteToken, pb.DeleteTokenRequest(token=token))
        return token_info(reply.token)

    def identity(self) -> Identity:
        reply = self._call(self._stub.GetIdentity, pb.GetIdentityRequest())
        return Identity(
            principal=reply.principal,
            credential=reply.credential,
            role=reply.role,
            repositories=list(reply.repositories),
            permissions=list(reply.permissions),
        )
