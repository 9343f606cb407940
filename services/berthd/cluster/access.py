"""Users' tokens (berth.cluster.v1.AccessService): made, listed and revoked by the cluster,
checked by every instance of every service (berthd.common.security.tokens)."""

from __future__ import annotations

import time

import grpc

from berth.cluster.v1 import access_pb2 as pb
from berth.cluster.v1 import access_pb2_grpc
from berthd.common.errors import AlreadyExists, InvalidArgument, NotFound
from berthd.common.messages import timestamp
from berthd.common.pages import paginate
from berthd.common.security.principal import current_principal
from berthd.common.security.tokens import TOKENS, TokenRecord, new_token
from berthd.common.store import Store

Context = grpc.aio.ServicerContext

# Longest lifetime a token may be given (ten years): a typo in --expires should not overflow.
MAX_LIFETIME = 10 * 365 * 24 * 3600


class AccessCore:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def create(
        self, name: str, role: str, repositories: list[str], expires_in: int
    ) -> tuple[TokenRecord, str]:
        if expires_in < 0 or expires_in > MAX_LIFETIME:
            raise InvalidArgument(
                f"expires_in_seconds must be between 0 (never) and {MAX_LIFETIME}",
                reason="INVALID_TOKEN_SPEC",
                field="expires_in_seconds",
            )
        expires_at = time.time() + expires_in if expires_in else 0.0
        record, secret = new_token(name, role, repositories, expires_at, current_principal().name)
        # One token per name: the name's claim key makes creation atomic across instances.
        ok, _ = await self._store.txn(
            [self._store.absent(_name_key(name))],
            [
                self._store.op_put(_name_key(name), record.id.encode()),
                TOKENS.op_put(self._store, record.id, record),
            ],
            [],
        )
        if not ok:
            raise AlreadyExists(
                f"a token named {name!r} exists; remove it first with `berth token rm {name}`",
                reason="TOKEN_NAME_IN_USE",
                resource=("token", name),
            )
        return record, secret

    async def list(self) -> list[TokenRecord]:
        records = await TOKENS.records(self._store)
        return sorted(records.values(), key=lambda r: r.name)

    async def delete(self, token: str) -> TokenRecord:
        for record in await self.list():
            if token in (record.name, record.id):
                await self._store.txn(
                    [],
                    [
                        TOKENS.op_delete(self._store, record.id),
                        self._store.op_delete(_name_key(record.name)),
                    ],
                    [],
                )
                return record
        raise NotFound(f"no token {token!r}", reason="TOKEN_NOT_FOUND", resource=("token", token))


def _name_key(name: str) -> str:
    return f"token-names/{name}"


def token_message(record: TokenRecord) -> pb.Token:
    return pb.Token(
        token_id=record.id,
        name=record.name,
        role=record.role,
        repositories=record.repositories,
        created_at=timestamp(record.created_at),
        expires_at=timestamp(record.expires_at) if record.expires_at else None,
        created_by=record.created_by,
    )


class AccessServicer(access_pb2_grpc.AccessServiceServicer):
    def __init__(self, core: AccessCore) -> None:
        self._core = core

    async def CreateToken(
        self, request: pb.CreateTokenRequest, context: Context
    ) -> pb.CreateTokenResponse:
        record, secret = await self._core.create(
            request.name, request.role, list(request.repositories), request.expires_in_seconds
        )
        return pb.CreateTokenResponse(token=token_message(record), secret=secret)

    async def ListTokens(
        self, request: pb.ListTokensRequest, context: Context
    ) -> pb.ListTokensResponse:
        page, next_token = paginate("cluster.ListTokens", request, await self._core.list())
        return pb.ListTokensResponse(
            tokens=[token_message(r) for r in page], next_page_token=next_token
        )

    async def DeleteToken(
        self, request: pb.DeleteTokenRequest, context: Context
    ) -> pb.DeleteTokenResponse:
        return pb.DeleteTokenResponse(token=token_message(await self._core.delete(request.token)))

    async def GetIdentity(
        self, request: pb.GetIdentityRequest, context: Context
    ) -> pb.GetIdentityResponse:
        principal = current_principal()
        return pb.GetIdentityResponse(
            principal=principal.name,
            credential=principal.via,
            role=principal.role,
            repositories=principal.repositories,
            permissions=sorted(p.value for p in principal.permissions),
        )
