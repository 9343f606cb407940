"""The cluster's JoinService as a node agent calls it: join with a join token (on the cluster's
public port, before the node has a certificate), then renew with its current certificate."""

from __future__ import annotations

import grpc

from berth.cluster.v1 import join_pb2 as pb
from berth.cluster.v1 import join_pb2_grpc as pb_grpc
from berthd.common.rpc.calls import ServiceApi

# Signing is quick; a cluster that does not answer in this time is not going to.
TIMEOUT = 30.0


class JoinApi(ServiceApi[pb_grpc.JoinServiceStub]):
    SERVICE = "cluster"

    def stub(self, channel: grpc.aio.Channel) -> pb_grpc.JoinServiceStub:
        return pb_grpc.JoinServiceStub(channel)

    async def join(self, join_token: str, node_id: str, csr_pem: bytes) -> pb.JoinNodeResponse:
        """A certificate for `node:<node_id>` for the CSR. Retried only while the cluster
        cannot be reached (signing twice would be harmless anyway)."""
        request = pb.JoinNodeRequest(
            join_token=join_token, node_id=node_id, csr_pem=csr_pem.decode()
        )
        return await self.unary("JoinNode", request, idempotent=True, timeout=TIMEOUT)

    async def renew(self, csr_pem: bytes) -> pb.RenewNodeCertificateResponse:
        """A fresh certificate for the calling node (the channel's client certificate)."""
        request = pb.RenewNodeCertificateRequest(csr_pem=csr_pem.decode())
        return await self.unary("RenewNodeCertificate", request, idempotent=True, timeout=TIMEOUT)
