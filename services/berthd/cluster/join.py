"""Nodes joining the cluster (berth.cluster.v1.JoinService): the join token, and the node
certificates the cluster signs with the CA key (docs/security.md, "Joining a node").

The token record is `cluster/join-token` (berthd.common.security.join_token), written only
here. Any cluster instance serves every call; signing needs the CA key (--tls-ca-key), which
`berthd up` gives the cluster. A certificate is always for an identity the cluster decides:
`node:<node_id>` for a join, the caller's own certificate identity for a renewal; a CSR only
supplies the public key and the hosts to name.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import time
from dataclasses import dataclass, field

import grpc

from berth.cluster.v1 import join_pb2 as pb
from berth.cluster.v1 import join_pb2_grpc
from berthd.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from berthd.common.messages import timestamp
from berthd.common.security import join_token
from berthd.common.security.ca import (
    DEFAULT_LIFETIME,
    CertificateAuthority,
    InvalidCsr,
    Issued,
    certificate_digest,
)
from berthd.common.security.join_token import JoinTokenRecord
from berthd.common.security.principal import current_principal
from berthd.common.state.endpoints import instances
from berthd.common.state.nodes import NODES
from berthd.common.store import Store

Context = grpc.aio.ServicerContext

# A node id names a key (`nodes/<id>`) and a certificate identity (`node:<id>`).
NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Longest lifetime a join token may be given (ten years): a typo in --expires should not
# overflow.
MAX_LIFETIME = 10 * 365 * 24 * 3600
MAX_CSR_BYTES = 64 * 1024


@dataclass(frozen=True)
class JoinSettings:
    """Where a new node finds the cluster."""

    join_addresses: list[str] = field(default_factory=list)
    etcd_endpoint: str = ""
    etcd_prefix: str = ""


class JoinCore:
    """`ca` is None on an instance started without the CA key: it can show and rotate the
    token, but not sign."""

    def __init__(
        self,
        store: Store,
        ca_pem: bytes,
        ca: CertificateAuthority | None,
        lifetime: datetime.timedelta = DEFAULT_LIFETIME,
        etcd_endpoint: str = "",
        etcd_prefix: str = "",
    ) -> None:
        self._store = store
        self._ca = ca
        self.ca_pem = ca_pem
        self.ca_digest = certificate_digest(ca_pem)
        self.lifetime = lifetime
        self._etcd = (etcd_endpoint, etcd_prefix)

    # -- the token ---------------------------------------------------------------------------

    async def token(self) -> JoinTokenRecord | None:
        entry = await self._store.get(join_token.KEY)
        return None if entry is None else JoinTokenRecord.decode(entry.value)

    async def rotate(self, expires_in: int) -> tuple[JoinTokenRecord, str]:
        """A new token, replacing the current one (refused from now on); the token string is
        returned once."""
        if expires_in < 0 or expires_in > MAX_LIFETIME:
            raise InvalidArgument(
                f"expires_in_seconds must be between 0 (never) and {MAX_LIFETIME}",
                reason="INVALID_JOIN_TOKEN_SPEC",
                field="expires_in_seconds",
            )
        expires_at = time.time() + expires_in if expires_in else 0.0
        record, token = join_token.new_token(self.ca_digest, current_principal().name, expires_at)
        # Two rotations at once: one wins, the other is told (its token would be dead already).
        entry = await self._store.get(join_token.KEY)
        guard = (
            self._store.absent(join_token.KEY)
            if entry is None
            else self._store.unchanged(join_token.KEY, entry.mod_revision)
        )
        ok, _ = await self._store.txn(
            [guard], [self._store.op_put(join_token.KEY, record.encode())], []
        )
        if not ok:
            raise Aborted(
                "the join token was rotated by another call at the same time; rotate again",
                reason="JOIN_TOKEN_CONFLICT",
            )
        return record, str(token)

    async def settings(self) -> JoinSettings:
        addresses = [e.public_address for e in await instances(self._store, "cluster")]
        return JoinSettings([a for a in addresses if a], *self._etcd)

    # -- certificates ------------------------------------------------------------------------

    async def join(self, token_text: str, node_id: str, csr_pem: str) -> Issued:
        """A certificate for `node:<node_id>`, for the holder of the current join token."""
        await self._check_token(token_text)
        if not NODE_ID.match(node_id):
            raise InvalidArgument(
                f"invalid node id {node_id!r}: letters, digits, '.', '_' and '-', at most 63 "
                "characters, starting with a letter or digit",
                reason="INVALID_NODE_ID",
                field="node_id",
            )
        ca = self._signer()
        if await NODES.get(self._store, node_id) is not None:
            raise AlreadyExists(
                f"node {node_id!r} is live in the cluster: a joining node needs an id of its "
                "own (--node-id), or the node must stop and its registration expire first",
                reason="NODE_ID_IN_USE",
                resource=("node", node_id),
            )
        return await self._sign(ca, csr_pem, f"node:{node_id}")

    async def renew(self, csr_pem: str) -> Issued:
        """A fresh certificate for the calling node: the identity is the caller's verified
        certificate's, whatever the CSR says."""
        principal = current_principal()
        if principal.via != "certificate" or not principal.name.startswith("node:"):
            raise PermissionDenied(
                f"{principal.name} may not renew a node certificate: only a node, with its "
                "current certificate, renews its own",
                reason="NODE_CERTIFICATE_REQUIRED",
                metadata={"principal": principal.name},
            )
        return await self._sign(self._signer(), csr_pem, principal.name)

    async def _check_token(self, text: str) -> JoinTokenRecord:
        try:
            token = join_token.parse(text)
        except join_token.MalformedJoinToken as exc:
            raise Unauthenticated(str(exc), reason="JOIN_TOKEN_INVALID") from None
        record = await self.token()
        if record is None or not record.matches(token):
            raise Unauthenticated(
                "the join token is not valid: it was rotated away, belongs to another cluster, "
                "or was never made; get the current one with `berth node join-token --rotate`",
                reason="JOIN_TOKEN_INVALID",
            )
        if record.expired():
            raise Unauthenticated(
                "the join token expired; make a new one with `berth node join-token --rotate`",
                reason="JOIN_TOKEN_EXPIRED",
            )
        return record

    def _signer(self) -> CertificateAuthority:
        if self._ca is None:
            raise FailedPrecondition(
                "this cluster instance cannot sign certificates: it was started without the "
                "CA key (--tls-ca-key)",
                reason="CA_KEY_MISSING",
            )
        return self._ca

    async def _sign(self, ca: CertificateAuthority, csr_pem: str, identity: str) -> Issued:
        if not csr_pem or len(csr_pem) > MAX_CSR_BYTES:
            raise InvalidArgument(
                "csr_pem must hold a PEM certificate signing request",
                reason="INVALID_CSR",
                field="csr_pem",
            )
        try:
            # Signing is CPU work: off the event loop.
            return await asyncio.to_thread(ca.sign_csr, csr_pem.encode(), identity, self.lifetime)
        except InvalidCsr as exc:
            raise InvalidArgument(str(exc), reason="INVALID_CSR", field="csr_pem") from None


# -- servicer ----------------------------------------------------------------------------------


def token_message(record: JoinTokenRecord) -> pb.JoinToken:
    return pb.JoinToken(
        ca_digest=record.ca_digest,
        created_at=timestamp(record.created_at or None),
        expires_at=timestamp(record.expires_at or None),
        created_by=record.created_by,
    )


def settings_message(settings: JoinSettings) -> pb.JoinSettings:
    return pb.JoinSettings(
        join_addresses=settings.join_addresses,
        etcd_endpoint=settings.etcd_endpoint,
        etcd_prefix=settings.etcd_prefix,
    )


class JoinServicer(join_pb2_grpc.JoinServiceServicer):
    def __init__(self, core: JoinCore) -> None:
        self._core = core

    async def GetJoinToken(
        self, request: pb.GetJoinTokenRequest, context: Context
    ) -> pb.GetJoinTokenResponse:
        record = await self._core.token()
        return pb.GetJoinTokenResponse(
            token=token_message(record) if record is not None else None,
            ca_digest=self._core.ca_digest,
            settings=settings_message(await self._core.settings()),
        )

    async def RotateJoinToken(
        self, request: pb.RotateJoinTokenRequest, context: Context
    ) -> pb.RotateJoinTokenResponse:
        record, token = await self._core.rotate(request.expires_in_seconds)
        return pb.RotateJoinTokenResponse(
            token=token_message(record),
            join_token=token,
            settings=settings_message(await self._core.settings()),
        )

    async def JoinNode(self, request: pb.JoinNodeRequest, context: Context) -> pb.JoinNodeResponse:
        issued = await self._core.join(request.join_token, request.node_id, request.csr_pem)
        return pb.JoinNodeResponse(
            certificate_pem=issued.cert_pem.decode(),
            ca_certificate_pem=self._core.ca_pem.decode(),
            expires_at=timestamp(issued.not_after.timestamp()),
        )

    async def RenewNodeCertificate(
        self, request: pb.RenewNodeCertificateRequest, context: Context
    ) -> pb.RenewNodeCertificateResponse:
        issued = await self._core.renew(request.csr_pem)
        return pb.RenewNodeCertificateResponse(
            certificate_pem=issued.cert_pem.decode(),
            ca_certificate_pem=self._core.ca_pem.decode(),
            expires_at=timestamp(issued.not_after.timestamp()),
        )
