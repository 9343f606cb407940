"""A service instance's TLS: its certificate from the cluster CA, the server credentials of its
gRPC port, the client credentials of its channels and of etcd, and renewal at two thirds of the
certificate's life without a restart.

Where the certificate comes from (flags, each with an environment variable):

- `--tls-cert/--tls-key` files (written by `berthd up`, or by an operator);
- with `--tls-ca-key` (the CA's key: `berthd up` and the tests) the instance issues its own
  certificate when the files are missing or not given, and renews it by signing a new one (the
  files, when given, are rewritten). Without the CA key the instance asks its `signer` when it
  has one (a node that joined with a join token asks the cluster: berthd.node.join), else it
  re-reads its files at renewal time: whatever rotates them (an operator) is picked up.

The server side uses grpc's dynamic SSL credentials: grpc asks for the current certificate at
each new TLS handshake, so connections made after a renewal get the new certificate while open
connections and streams carry on. Channels to other services are remade with the new client
certificate (`generation`), and the etcd client reconnects with it on its next connection.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import logging
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from berthd.common.config import add_flag
from berthd.common.security.ca import (
    DEFAULT_LIFETIME,
    CertificateAuthority,
    Issued,
    certificate_identity,
    validity,
)

log = logging.getLogger("berthd.tls")

# grpc's auth context key that carries the verified peer certificate.
PEER_CERT_KEY = "x509_pem_cert"


def add_tls_flags(parser: argparse.ArgumentParser, service: str) -> None:
    """--tls-ca (shared, BERTH_TLS_CA), --tls-ca-key (BERTH_TLS_CA_KEY), and this instance's
    --tls-cert/--tls-key (per service: BERTH_<SERVICE>_TLS_CERT, so a shell that configures a
    client certificate in BERTH_TLS_CERT does not hand it to services)."""
    add_flag(parser, "--tls-ca", default="", help="the cluster CA certificate (PEM file)")
    add_flag(
        parser,
        "--tls-cert",
        default="",
        scope=service,
        help="this instance's certificate (PEM file); issued with --tls-ca-key when missing",
    )
    add_flag(parser, "--tls-key", default="", scope=service, help="this instance's key (PEM)")
    add_flag(
        parser,
        "--tls-ca-key",
        default="",
        help="the CA's private key: issue and renew this instance's certificate itself "
        "(local clusters)",
    )
    add_flag(
        parser,
        "--tls-lifetime",
        default=DEFAULT_LIFETIME.total_seconds(),
        type=float,
        help="lifetime in seconds of certificates this instance issues itself (default 24 h); "
        "renewed at two thirds of it",
    )


def hosts_for(*addresses: str | None) -> list[str]:
    """SAN hosts for the addresses an instance listens on and advertises."""
    hosts: list[str] = []
    for address in addresses:
        if not address:
            continue
        host = address.rpartition(":")[0].strip("[]") or address
        if host in ("0.0.0.0", "::", ""):
            hosts += [socket.gethostname(), socket.getfqdn()]
        else:
            hosts.append(host)
    return [*hosts, "localhost", "127.0.0.1"]


class InstanceCredentials:
    """The certificate of one service instance, current at any moment, and the credentials
    made from it."""

    def __init__(
        self,
        identity: str,
        hosts: list[str],
        ca_path: str,
        cert_path: str = "",
        key_path: str = "",
        ca_key_path: str = "",
        lifetime: float = DEFAULT_LIFETIME.total_seconds(),
    ) -> None:
        if not ca_path:
            raise ValueError(
                "TLS is required: pass --tls-ca (the cluster CA) and either --tls-cert/--tls-key "
                "or --tls-ca-key (see docs/security.md)"
            )
        self.identity = identity
        self.hosts = hosts
        self.ca_pem = Path(ca_path).read_bytes()
        self.cert_path = Path(cert_path) if cert_path else None
        self.key_path = Path(key_path) if key_path else None
        self.ca = (
            CertificateAuthority.load(Path(ca_path), Path(ca_key_path)) if ca_key_path else None
        )
        self.lifetime = datetime.timedelta(seconds=lifetime)
        self._lock = threading.Lock()
        # Called after each renewal (the store reconnects to etcd with the new certificate).
        self.on_renew: list[Callable[[], Awaitable[None]]] = []
        # Without the CA key: who signs a renewal (a joined node asks the cluster); it returns
        # the new certificate and its key. None: re-read the files.
        self.signer: Callable[[], Awaitable[Issued]] | None = None
        self.generation = 0
        self.current = self._obtain(initial=True)

    # -- obtaining a certificate ---------------------------------------------------------

    def _files_present(self) -> bool:
        return bool(
            self.cert_path and self.key_path and self.cert_path.exists() and self.key_path.exists()
        )

    def _read_files(self) -> Issued:
        assert self.cert_path and self.key_path
        cert_pem = self.cert_path.read_bytes()
        not_before, not_after = validity(cert_pem)
        return Issued(cert_pem, self.key_path.read_bytes(), not_before, not_after)

    def _obtain(self, initial: bool) -> Issued:
        if initial and self._files_present():
            issued = self._read_files()
            if issued.not_after > _now() + self.lifetime / 10:
                return issued
            if self.ca is None:
                if issued.not_after <= _now():
                    raise ValueError(
                        f"the certificate {self.cert_path} expired at "
                        f"{issued.not_after.isoformat()}: give the instance a new one"
                    )
                return issued
        if self.ca is not None:
            issued = self.ca.issue(self.identity, self.hosts, self.lifetime)
            if self.cert_path and self.key_path:
                issued.write(self.cert_path, self.key_path)
            return issued
        if self._files_present():
            return self._read_files()
        raise ValueError(
            f"no certificate for {self.identity}: pass --tls-cert and --tls-key, or --tls-ca-key "
            "to issue one"
        )

    def renew(self) -> Issued | None:
        """A new certificate: signed here with the CA key, else re-read from the files; None
        when the files still hold the current certificate (nobody rotated them yet)."""
        issued = self._obtain(initial=False)
        if issued.cert_pem == self.current.cert_pem:
            left = self.current.not_after - _now()
            log.warning(
                "certificate due for renewal but its files were not rotated",
                extra={"identity": self.identity, "seconds_left": int(left.total_seconds())},
            )
            return None
        return self._install(issued)

    async def renew_async(self) -> Issued | None:
        """`renew`, or, without the CA key and with a signer, the certificate the signer
        obtains, written to the files."""
        if self.ca is not None or self.signer is None:
            return await asyncio.to_thread(self.renew)
        issued = await self.signer()
        if self.cert_path and self.key_path:
            await asyncio.to_thread(issued.write, self.cert_path, self.key_path)
        return self._install(issued)

    def _install(self, issued: Issued) -> Issued:
        with self._lock:
            self.current = issued
            self.generation += 1
        log.info(
            "certificate renewed",
            extra={"identity": self.identity, "not_after": issued.not_after.isoformat()},
        )
        return issued

    async def keep_renewed(self) -> None:
        """Renew at two thirds of each certificate's life, until cancelled."""
        while True:
            delay = (self.current.renew_at() - _now()).total_seconds()
            await asyncio.sleep(max(delay, 1.0))
            try:
                renewed = await self.renew_async()
            except Exception:
                log.exception("certificate renewal failed; retrying in 10 s")
                await asyncio.sleep(10)
                continue
            if renewed is None:
                # Look at the files again a few times before the certificate expires.
                left = (self.current.not_after - _now()).total_seconds()
                await asyncio.sleep(max(min(left / 10, 60.0), 1.0))
                continue
            for hook in self.on_renew:
                try:
                    await hook()
                except Exception:
                    log.exception("after the certificate renewal")

    # -- credentials ---------------------------------------------------------------------

    def _server_config(self) -> grpc.ServerCertificateConfiguration:
        issued = self.current
        return grpc.ssl_server_certificate_configuration(
            [(issued.key_pem, issued.cert_pem)], root_certificates=self.ca_pem
        )

    def config_fetcher(self) -> Callable[[], grpc.ServerCertificateConfiguration | None]:
        """What grpc calls before each new handshake on one port: a new configuration after a
        renewal, else None. Each port keeps its own served generation."""
        with self._lock:
            served = [self.generation]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            with self._lock:
                if served[0] == self.generation:
                    return None
                served[0] = self.generation
            return self._server_config()

        return fetch

    def server_credentials(self, require_client_auth: bool = True) -> grpc.ServerCredentials:
        """Credentials for one listening port. Without client auth (the public port) callers
        present no certificate."""
        return grpc.dynamic_ssl_server_credentials(
            self._server_config(),
            self.config_fetcher(),
            require_client_authentication=require_client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client credentials with the current certificate (for channels and etcd)."""
        issued = self.current
        return grpc.ssl_channel_credentials(self.ca_pem, issued.key_pem, issued.cert_pem)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def peer_identity(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> str | None:
    """`service:<name>`, `node:<id>` or `user:<name>` from the caller's verified certificate,
    or None when the caller presented none. grpc puts a certificate in the auth context only
    after verifying it against the CA."""
    try:
        certs = context.auth_context().get(PEER_CERT_KEY)
    except Exception:  # a call the client already cancelled
        return None
    if not certs:
        return None
    return _identity_of(certs[0])


@functools.lru_cache(maxsize=256)
def _identity_of(cert_pem: bytes) -> str | None:
    """Parsing a certificate per RPC would cost more than the RPC: connections reuse a few."""
    try:
        return certificate_identity(cert_pem)
    except ValueError:
        return None
