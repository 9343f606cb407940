"""Where berth clients find the cluster CA and their certificate (berth.tls)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from berth.errors import BerthClientError, from_rpc_error
from berth.tls import channel_credentials, client_files


def test_the_state_directory_is_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in ("BERTH_TLS_CA", "BERTH_TLS_CERT", "BERTH_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BERTH_STATE_DIR", str(tmp_path))
    tls = tmp_path / "tls"
    assert client_files() == client_files(tmp_path)
    assert client_files().ca == tls / "ca.crt" and client_files().cert is None
    with pytest.raises(BerthClientError, match="cannot read the cluster CA certificate"):
        channel_credentials()
    tls.mkdir()
    for name in ("client.crt", "client.key"):
        (tls / name).write_text("x")
    found = client_files()
    assert (found.cert, found.key) == (tls / "client.crt", tls / "client.key")


def test_the_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BERTH_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("BERTH_TLS_CA", "/etc/berth/ca.crt")
    monkeypatch.setenv("BERTH_TLS_CERT", "/etc/berth/me.crt")
    monkeypatch.setenv("BERTH_TLS_KEY", "/etc/berth/me.key")
    found = client_files()
    assert (found.ca, found.cert, found.key) == (
        Path("/etc/berth/ca.crt"),
        Path("/etc/berth/me.crt"),
        Path("/etc/berth/me.key"),
    )


def test_tls_failures_read_as_such() -> None:
    handshake = (
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls "
        "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:"
        "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK"
    )
    err = AioRpcError(grpc.StatusCode.UNAVAILABLE, Metadata(), Metadata(), handshake)
    message = str(from_rpc_error(err, address="127.0.0.1:1", service="cluster"))
    assert message.startswith(
        "TLS handshake with the cluster at 127.0.0.1:1 failed (CERTIFICATE_VERIFY_FAILED: "
        "unable to get local issuer certificate); check that --tls-ca or BERTH_TLS_CA"
    )
    closed = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:x:1: Socket closed"
    err = AioRpcError(grpc.StatusCode.UNAVAILABLE, Metadata(), Metadata(), closed)
    assert "may have refused this client's certificate" in str(from_rpc_error(err, address="x"))
