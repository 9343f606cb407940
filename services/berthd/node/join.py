"""A node agent joining the cluster with a join token, and renewing the certificate it got.

`berthd node --join ADDRESS --join-token TOKEN --tls-ca ca.crt --tls-cert node.crt --tls-key
node.key`: when the certificate files are missing (or hold an expired certificate), the node
checks that the token was made for the CA in --tls-ca (the digest in the token), makes an EC
P-256 key and a CSR, sends them with the token to the cluster's public port (TLS verified
against the CA, no client certificate: it has none yet), and writes the certificate it gets and
its key (mode 0600). Then it starts as usual. It renews at two thirds of the certificate's life
by sending a new CSR to the cluster over mutual TLS with its current certificate
(InstanceCredentials.signer).
"""

from __future__ import annotations

import argparse
import datetime
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from berthd.common.endpoints import service_address
from berthd.common.errors import BerthError
from berthd.common.rpc.channels import public_channels
from berthd.common.rpc.join import JoinApi
from berthd.common.security import join_token
from berthd.common.security.ca import (
    Issued,
    certificate_digest,
    certificate_identity,
    make_csr,
    validity,
)
from berthd.common.security.tls import InstanceCredentials, hosts_for
from berthd.common.store import Store

log = logging.getLogger("berthd.node.join")


class JoinError(RuntimeError):
    """Joining failed; the message is the one line berthd prints."""


def needs_join(args: argparse.Namespace) -> bool:
    """Whether this start must join: a join token, no CA key to issue a certificate here, and
    no certificate that is still valid in the files."""
    if not args.join_token or args.tls_ca_key:
        return False
    if not args.tls_cert or not args.tls_key:
        raise JoinError(
            "--join-token needs --tls-cert and --tls-key: the files the node's certificate and "
            "key are written to"
        )
    cert, key = Path(args.tls_cert), Path(args.tls_key)
    if not (cert.exists() and key.exists()):
        return True
    try:
        _, not_after = validity(cert.read_bytes())
    except ValueError:
        return True  # not a certificate: replace it
    return not_after <= datetime.datetime.now(datetime.UTC)


async def join(args: argparse.Namespace) -> Issued:
    """Get the node's certificate from the cluster with the join token and write the files."""
    if not args.join:
        raise JoinError("--join-token needs --join: the cluster's public address host:port")
    if not args.tls_ca:
        raise JoinError("--join-token needs --tls-ca: the cluster's CA certificate (ca.crt)")
    try:
        token = join_token.parse(args.join_token)
    except join_token.MalformedJoinToken as exc:
        raise JoinError(str(exc)) from None
    try:
        ca_pem = Path(args.tls_ca).read_bytes()
        digest = certificate_digest(ca_pem)
    except OSError as exc:
        raise JoinError(f"cannot read the CA certificate {args.tls_ca}: {exc.strerror}") from None
    except ValueError:
        raise JoinError(f"{args.tls_ca} is not a PEM certificate") from None
    # Checked before the token leaves this host: a CA that is not the one the token was made
    # for means the wrong cluster (or someone in the middle).
    if digest != token.ca_digest:
        raise JoinError(
            f"the join token was made for another CA (sha256 {token.ca_digest[:12]}...) than "
            f"{args.tls_ca} (sha256 {digest[:12]}...): the token is not sent; use the cluster's "
            "CA certificate"
        )
    identity = f"node:{args.node_id}"
    csr_pem, key_pem = make_csr(
        identity, hosts_for(args.listen, args.advertise, args.public_listen)
    )
    channels = public_channels(ca_pem)
    try:
        reply = await JoinApi(args.join, channels).join(str(token), args.node_id, csr_pem)
    except BerthError as exc:
        reason = f" ({exc.reason})" if exc.reason != exc.code.name else ""
        raise JoinError(
            f"node {args.node_id} cannot join the cluster at {args.join}: {exc}{reason}"
        ) from None
    finally:
        await channels.close()
    cert_pem = reply.certificate_pem.encode()
    if certificate_identity(cert_pem) != identity or not _same_key(cert_pem, key_pem):
        raise JoinError(f"the cluster at {args.join} sent a certificate that is not for {identity}")
    not_before, not_after = validity(cert_pem)
    issued = Issued(cert_pem, key_pem, not_before, not_after)
    issued.write(Path(args.tls_cert), Path(args.tls_key))
    return issued


def log_joined(args: argparse.Namespace, issued: Issued) -> None:
    """Once logging is set up (the server does it): the join is the first thing to say."""
    log.info(
        "joined the cluster",
        extra={
            "identity": f"node:{args.node_id}",
            "cluster": args.join,
            "not_after": issued.not_after.isoformat(),
        },
    )


def renewal_signer(
    store: Store, credentials: InstanceCredentials
) -> Callable[[], Awaitable[Issued]]:
    """The signer of a joined node's renewals: a new key and CSR, signed by the cluster (found
    in etcd: its mutual-TLS port, where the node's certificate identifies it)."""
    api = JoinApi(service_address(store, "cluster"))

    async def sign() -> Issued:
        csr_pem, key_pem = make_csr(credentials.identity, credentials.hosts)
        reply = await api.renew(csr_pem)
        cert_pem = reply.certificate_pem.encode()
        if certificate_identity(cert_pem) != credentials.identity:
            raise ValueError(f"the cluster renewed a certificate not for {credentials.identity}")
        not_before, not_after = validity(cert_pem)
        return Issued(cert_pem, key_pem, not_before, not_after)

    return sign


def _same_key(cert_pem: bytes, key_pem: bytes) -> bool:
    cert_key = x509.load_pem_x509_certificate(cert_pem).public_key()
    own = serialization.load_pem_private_key(key_pem, password=None).public_key()
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert_key.public_bytes(*fmt) == own.public_bytes(*fmt)
