"""Where berth clients find the cluster CA and their certificate (berth.tls)."""

from __future__ import annotations

from pathlib import Path

import pytest

from berth.errors import BerthClientError
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
