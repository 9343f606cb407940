"""Clients made in unit tests (the CLI against unreachable or fake addresses) need TLS files
like any berth client: one CA and a client certificate for the session, in BERTH_TLS_* for each
unit test only (integration tests, which may run before and after in one session, have a CA
of their own that their servers trust)."""

from __future__ import annotations

from pathlib import Path

import pytest

from berthd.common.security.ca import CertificateAuthority


@pytest.fixture(scope="session")
def client_tls_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority.create("berth unit-test CA")
    ca.save(directory)
    ca.issue("user:test").write(directory / "client.crt", directory / "client.key")
    return directory


@pytest.fixture(autouse=True)
def client_tls_env(client_tls_files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BERTH_TLS_CA", str(client_tls_files / "ca.crt"))
    monkeypatch.setenv("BERTH_TLS_CERT", str(client_tls_files / "client.crt"))
    monkeypatch.setenv("BERTH_TLS_KEY", str(client_tls_files / "client.key"))
