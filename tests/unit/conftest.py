"""Clients made in unit tests (the CLI against unreachable or fake addresses) need TLS files
like any berth client: one CA and a client certificate for the session, in BERTH_TLS_*."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from berthd.common.security.ca import CertificateAuthority

TLS_ENV = ("BERTH_TLS_CA", "BERTH_TLS_CERT", "BERTH_TLS_KEY")


@pytest.fixture(scope="session", autouse=True)
def client_tls_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    directory = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority.create("berth unit-test CA")
    ca.save(directory)
    ca.issue("user:test").write(directory / "client.crt", directory / "client.key")
    saved = {name: os.environ.get(name) for name in TLS_ENV}
    os.environ.update(
        BERTH_TLS_CA=str(directory / "ca.crt"),
        BERTH_TLS_CERT=str(directory / "client.crt"),
        BERTH_TLS_KEY=str(directory / "client.key"),
    )
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
