"""How a client finds the cluster's CA and its credential, like kubectl's kubeconfig.

Every berth port speaks TLS with certificates from the cluster CA. A client needs:

- the CA certificate: --tls-ca, else $BERTH_TLS_CA, else `<state dir>/tls/ca.crt`;
- a credential: a token ($BERTH_TOKEN, else the one `berth login --token` stored), sent as
  `authorization: Bearer <token>` on every call; and/or a client certificate and key:
  $BERTH_TLS_CERT and $BERTH_TLS_KEY, else `<state dir>/tls/client.crt` and `client.key` (the
  `user:admin` credential `berthd up` writes, mode 0600). A token wins over the certificate.

A service's main port asks for a client certificate (mutual TLS); its public port does not, and
serves token and anonymous callers (berth.config picks that port for a token caller).

The state directory is the one `berthd up` uses (BERTH_STATE_DIR, see berth.config).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from berth.config import cluster_token, default_state_dir
from berth.errors import BerthClientError

# Benchmarks only (bench/security.py): every berth process and client of a `berthd up` started
# with this variable set to 1 speaks plaintext, without certificates or tokens, so the cost of
# security can be measured against the same build without it. Never set it anywhere else.
PLAINTEXT_ENV = "BERTH_INSECURE_PLAINTEXT_FOR_BENCHMARKS"

TLS_DIR = "tls"
CA_FILE = "ca.crt"
CLIENT_CERT = "client.crt"
CLIENT_KEY = "client.key"


@dataclass(frozen=True)
class ClientFiles:
    ca: Path
    cert: Path | None
    key: Path | None


def client_files(state_dir: Path | None = None) -> ClientFiles:
    """The CA and client certificate files, by the rule in the module docstring."""
    tls = Path(state_dir or default_state_dir()) / TLS_DIR
    ca = os.environ.get("BERTH_TLS_CA")
    cert = os.environ.get("BERTH_TLS_CERT")
    key = os.environ.get("BERTH_TLS_KEY")
    ca_path = Path(ca).expanduser() if ca else tls / CA_FILE
    if cert and key:
        return ClientFiles(ca_path, Path(cert).expanduser(), Path(key).expanduser())
    if (tls / CLIENT_CERT).exists() and (tls / CLIENT_KEY).exists():
        return ClientFiles(ca_path, tls / CLIENT_CERT, tls / CLIENT_KEY)
    return ClientFiles(ca_path, None, None)


_cache: dict[tuple, grpc.ChannelCredentials] = {}


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BerthClientError(
            f"cannot read the {what} {path}: {exc.strerror or exc}; start a local cluster with "
            "`berthd up`, or point --tls-ca / BERTH_TLS_CA (and BERTH_TLS_CERT, BERTH_TLS_KEY) "
            "at the cluster's files",
            "FAILED_PRECONDITION",
        ) from exc


def channel_credentials(state_dir: Path | None = None) -> grpc.ChannelCredentials:
    """TLS credentials for a channel to any berth service (cached per set of files)."""
    files = client_files(state_dir)
    stamp = tuple(
        (str(p), p.stat().st_mtime_ns if p.exists() else 0)
        for p in (files.ca, files.cert, files.key)
        if p is not None
    )
    token = cluster_token()
    creds = _cache.get((stamp, token))
    if creds is None:
        ca = _read(files.ca, "cluster CA certificate")
        cert = _read(files.cert, "client certificate") if files.cert else None
        key = _read(files.key, "client key") if files.key else None
        creds = grpc.ssl_channel_credentials(ca, key, cert)
        if token:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(token)
            )
        _cache[(stamp, token)] = creds
    return creds


def plaintext_mode() -> bool:
    """Whether this process runs in the benchmark-only plaintext mode (PLAINTEXT_ENV)."""
    return os.environ.get(PLAINTEXT_ENV) == "1"


def secure_channel(address: str, options: list | tuple = ()) -> grpc.Channel:
    """A blocking TLS channel to a berth service (plaintext in the benchmark-only mode)."""
    if plaintext_mode():
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, channel_credentials(), options=list(options))
