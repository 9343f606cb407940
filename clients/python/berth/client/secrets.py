"""Typed client for the cluster's SecretService: create, list and remove secrets.

A secret's value goes in once and never comes back out through this client: only the node a
container is placed on receives it (GetContainerSecrets, which other callers are refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from berth.client.base import GrpcClient
from berth.client.containers import all_pages, time_of
from berth.cluster.v1 import secrets_pb2 as pb
from berth.cluster.v1 import secrets_pb2_grpc

# Swarm's limit on a secret's value, which the cluster enforces.
MAX_SECRET_BYTES = 500 * 1024


@dataclass(frozen=True)
class SecretInfo:
    """A secret without its value."""

    id: str
    name: str
    labels: dict[str, str]
    created_at: datetime | None
    created_by: str


def secret_info(s: Any) -> SecretInfo:
    return SecretInfo(
        id=s.secret_id,
        name=s.name,
        labels=dict(s.labels),
        created_at=time_of(s, "created_at"),
        created_by=s.created_by,
    )


class SecretClient(GrpcClient):
    SERVICE = "cluster"
    OPTION = "--host or BERTH_HOST"

    def __init__(self, address: str, *, timeout: float | None = 60.0) -> None:
        super().__init__(address, timeout=timeout)
        self._stub = secrets_pb2_grpc.SecretServiceStub(self._channel)

    def create(self, name: str, data: bytes, labels: dict[str, str] | None = None) -> SecretInfo:
        """Store a secret (at most 500 KiB); the cluster encrypts it at rest."""
        request = pb.CreateSecretRequest(name=name, data=data, labels=labels or {})
        return secret_info(self._call(self._stub.CreateSecret, request).secret)

    def list(self, labels: dict[str, str] | None = None) -> list[SecretInfo]:
        """Every secret (with all of `labels`), by name."""
        request = pb.ListSecretsRequest(labels=labels or {})
        found = all_pages(lambda r: self._call(self._stub.ListSecrets, r), request, "secrets")
        return [secret_info(s) for s in found]

    def remove(self, secret: str) -> SecretInfo:
        """Remove a secret by name, id or unique id prefix; FAILED_PRECONDITION (SECRET_IN_USE)
        while a container or service names it."""
        request = pb.RemoveSecretRequest(secret=secret)
        return secret_info(self._call(self._stub.RemoveSecret, request).secret)
