"""Typed client for the cluster's JoinService: the join token new nodes join with."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from berth.client.base import GrpcClient
from berth.client.containers import time_of
from berth.cluster.v1 import join_pb2 as pb
from berth.cluster.v1 import join_pb2_grpc


@dataclass(frozen=True)
class JoinTokenInfo:
    """A join token as the cluster describes it: never its secret, except `token`, which only
    rotate_join_token fills (the one time it is shown)."""

    ca_digest: str  # SHA-256 (hex) of the CA certificate the token was made for
    created_at: datetime | None
    expires_at: datetime | None  # None: never
    created_by: str
    token: str = ""


@dataclass(frozen=True)
class JoinInfo:
    """The current join token (None when none was made yet) and where new nodes join."""

    token: JoinTokenInfo | None
    ca_digest: str  # SHA-256 (hex) of the cluster's CA certificate
    join_addresses: list[str] = field(default_factory=list)
    etcd_endpoint: str = ""
    etcd_prefix: str = ""


def _token(t: Any, secret: str = "") -> JoinTokenInfo:
    return JoinTokenInfo(
        ca_digest=t.ca_digest,
        created_at=time_of(t, "created_at"),
        expires_at=time_of(t, "expires_at"),
        created_by=t.created_by,
        token=secret,
    )


def _info(token: JoinTokenInfo | None, ca_digest: str, settings: Any) -> JoinInfo:
    return JoinInfo(
        token=token,
        ca_digest=ca_digest,
        join_addresses=list(settings.join_addresses),
        etcd_endpoint=settings.etcd_endpoint,
        etcd_prefix=settings.etcd_prefix,
    )


class JoinClient(GrpcClient):
    SERVICE = "cluster"
    OPTION = "--host or BERTH_HOST"

    def __init__(self, address: str, *, timeout: float | None = 60.0) -> None:
        super().__init__(address, timeout=timeout)
        self._stub = join_pb2_grpc.JoinServiceStub(self._channel)

    def join_token(self) -> JoinInfo:
        """The current token's description (not its secret) and where nodes join."""
        reply = self._call(self._stub.GetJoinToken, pb.GetJoinTokenRequest())
        token = _token(reply.token) if reply.HasField("token") else None
        return _info(token, reply.ca_digest, reply.settings)

    def rotate_join_token(self, expires_in: int = 0) -> JoinInfo:
        """A new token (its `token` string is set, shown this once); the previous one stops
        working at once. `expires_in` seconds, 0: never."""
        request = pb.RotateJoinTokenRequest(expires_in_seconds=expires_in)
        reply = self._call(self._stub.RotateJoinToken, request)
        return _info(_token(reply.token, reply.join_token), reply.token.ca_digest, reply.settings)
